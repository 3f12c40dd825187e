"""The shadow service's use cases, free of any transport: validate, then store + rules.

Every input is parsed and bounded before anything is written, so a rejected request changes
nothing. The gRPC servicer (and anything else that serves these use cases) only translates.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from services.shadow import credentials, domain
from services.shadow.domain import JsonObject, ShadowLimits, ShadowState, UpdateResult
from services.shadow.errors import (
    BrokerUnavailableError,
    CallerGoneError,
    DeviceNotFoundError,
    DocumentTooLargeError,
    InvalidRequestError,
    ShadowError,
    ShadowNotFoundError,
    VersionConflictError,
)
from services.shadow.fleet_filter import Comparison, FleetFilter, parse_filter
from services.shadow.store import (
    DeviceRecord,
    OutboxEvent,
    ShadowStore,
    ShadowWrite,
    StoredEvent,
)

DEFAULT_PAGE_SIZE = 100
MAX_EVENTS_PER_READ = 5000
MAX_EVENT_WAIT_SECONDS = 30.0
# Another process may write to the same database: look again this often while waiting.
EVENT_POLL_SECONDS = 0.2
_UNKNOWN_DEVICE_HASH = credentials.hash_password(credentials.new_password())
MAX_PAGE_SIZE = 1000
MAX_BATCH_READ = 1000


class BrokerAccounts(Protocol):
    """The broker's per-device accounts (Mosquitto dynamic security); raises on failure."""

    def add_device(self, device_id: str, password: str) -> None: ...

    def remove_device(self, device_id: str) -> None: ...


@dataclass(frozen=True)
class DesiredItem:
    """One item of a batch desired update, as received (the patch is still JSON text)."""

    device_id: str
    desired_json: str
    expected_version: int | None = None
    client_token: str | None = None


@dataclass(frozen=True)
class ItemResult:
    device_id: str
    status: str  # OK, NOT_FOUND, VERSION_CONFLICT, INVALID, TOO_LARGE
    version: int = 0
    message: str = ""
    unchanged: bool = False  # OK without a write (skip_unchanged and a no-op patch)


@dataclass(frozen=True)
class ShadowRead:
    """One device's answer in a batch read; `document` is GetShadow's document when FOUND."""

    device_id: str
    status: Literal["FOUND", "NO_SHADOW", "DEVICE_NOT_FOUND"]
    document: JsonObject | None = None


@dataclass(frozen=True)
class Page:
    devices: list[DeviceRecord]
    next_page_token: str
    total_count: int | None = None


def encode_page_token(last_device_id: str) -> str:
    return base64.urlsafe_b64encode(last_device_id.encode()).decode()


def decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        return domain.validate_device_id(base64.urlsafe_b64decode(token.encode()).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequestError("page_token is not one this service issued") from None


def _page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidRequestError("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class ShadowService:
    def __init__(
        self,
        store: ShadowStore,
        limits: ShadowLimits | None = None,
        max_batch_items: int = 10_000,
        clock: Callable[[], float] = time.time,
        broker_accounts: BrokerAccounts | None = None,
    ) -> None:
        self.store = store
        self.broker_accounts = broker_accounts
        self.limits = limits or ShadowLimits()
        self.max_batch_items = max_batch_items
        self.clock = clock
        self._written = threading.Condition()
        self._writes = 0  # counts committed writes, so a waiting reader misses none

    # --- devices ------------------------------------------------------------------------------

    def register_device(self, device_id: str, tags: Mapping[str, str]) -> tuple[DeviceRecord, str]:
        """Register a device; returns it with its MQTT password, which is never stored."""
        domain.validate_new_device_id(device_id)
        tags = domain.validate_tags(tags)
        password = credentials.new_password()

        def create_broker_account() -> None:
            if self.broker_accounts is not None:
                self._on_broker(lambda a: a.add_device(device_id, password))

        record = self.store.register_device(
            device_id,
            tags,
            credentials.hash_password(password),
            int(self.clock() * 1000),
            before_commit=create_broker_account,
        )
        return record, password

    def _on_broker(self, change: Callable[[BrokerAccounts], None]) -> None:
        assert self.broker_accounts is not None
        try:
            change(self.broker_accounts)
        except Exception as exc:  # any broker failure: the device change must not commit
            raise BrokerUnavailableError(f"the MQTT broker refused the change: {exc}") from exc

    def get_device(self, device_id: str) -> DeviceRecord:
        return self.store.get_device(domain.validate_device_id(device_id))

    def delete_device(self, device_id: str) -> None:
        """Delete a device and revoke its broker account (the broker disconnects it)."""

        def revoke_broker_account() -> None:
            if self.broker_accounts is not None:
                self._on_broker(lambda a: a.remove_device(device_id))

        self.store.delete_device(
            domain.validate_device_id(device_id), before_commit=revoke_broker_account
        )

    def verify_device_credentials(self, device_id: str, password: str) -> bool:
        """True only for a registered device and its own password. An unknown device costs
        the same hash computation, so timing does not tell which devices exist."""
        try:
            domain.validate_device_id(device_id)
        except InvalidRequestError:
            return False
        stored = self.store.credential_hash(device_id)
        matches = credentials.verify_password(password, stored or _UNKNOWN_DEVICE_HASH)
        return stored is not None and matches

    def list_devices(self, tags: Mapping[str, str], page_size: int, page_token: str) -> Page:
        tags = domain.validate_tags(tags)
        fleet_filter = FleetFilter(
            tuple(Comparison("tags", (key,), "==", value) for key, value in tags.items())
        )
        return self._page(fleet_filter, page_size, page_token, count=False)

    def query_fleet(self, filter_text: str, page_size: int, page_token: str, count: bool) -> Page:
        return self._page(parse_filter(filter_text), page_size, page_token, count)

    def _page(self, fleet_filter: FleetFilter, page_size: int, token: str, count: bool) -> Page:
        size = _page_size(page_size)
        after = decode_page_token(token)
        found = self.store.query_devices(fleet_filter, after, size + 1)
        next_token = encode_page_token(found[size - 1].device_id) if len(found) > size else ""
        total = self.store.count_devices(fleet_filter) if count else None
        return Page(found[:size], next_token, total)

    # --- shadows ------------------------------------------------------------------------------

    def get_shadow(self, device_id: str) -> tuple[ShadowState, JsonObject]:
        state = self.store.get_shadow(domain.validate_device_id(device_id))
        if not state.exists:
            raise ShadowNotFoundError(f"device {device_id!r} has no shadow")
        return state, domain.shadow_document(state, self.clock())

    def batch_get_shadows(self, device_ids: Sequence[str]) -> list[ShadowRead]:
        """Many devices' shadows, read with one query, in request order. 1-1000 distinct valid
        ids; anything else is refused before the database is touched."""
        if not 1 <= len(device_ids) <= MAX_BATCH_READ:
            raise InvalidRequestError(
                f"a batch read takes 1 to {MAX_BATCH_READ} device ids, got {len(device_ids)}"
            )
        seen: set[str] = set()
        for index, device_id in enumerate(device_ids):
            try:
                domain.validate_device_id(device_id)
            except InvalidRequestError as exc:
                raise type(exc)(f"device_ids[{index}]: {exc}") from None
            if device_id in seen:
                raise InvalidRequestError(
                    f"device_ids[{index}]: {device_id!r} is listed more than once"
                )
            seen.add(device_id)
        states = self.store.get_shadows(device_ids)
        now = self.clock()
        reads = []
        for device_id in device_ids:
            state = states.get(device_id)
            if state is None:
                reads.append(ShadowRead(device_id, "DEVICE_NOT_FOUND"))
            elif not state.exists:
                reads.append(ShadowRead(device_id, "NO_SHADOW"))
            else:
                reads.append(ShadowRead(device_id, "FOUND", domain.shadow_document(state, now)))
        return reads

    def update_shadow(
        self, device_id: str, request_json: str | bytes, deadline: float | None = None
    ) -> UpdateResult:
        """`deadline` (here and in every write): the `time.monotonic()` after which the caller
        has given up, so the write must not commit (`still_wanted`)."""
        domain.validate_device_id(device_id)
        request = domain.parse_update_request(request_json, self.limits)

        def change(state: ShadowState) -> tuple[ShadowWrite, UpdateResult]:
            still_wanted(deadline)
            result = domain.apply_update(state, request, self.clock(), self.limits)
            return ShadowWrite(result.current, [announce(device_id, result)]), result

        result = self.store.modify_shadow(device_id, change)
        self._notify_written()
        return result

    def delete_shadow(
        self, device_id: str, expected_version: int | None, deadline: float | None = None
    ) -> int:
        domain.validate_device_id(device_id)

        def change(state: ShadowState) -> tuple[ShadowWrite, int]:
            still_wanted(deadline)
            if not state.exists:
                raise ShadowNotFoundError(f"device {device_id!r} has no shadow")
            return ShadowWrite(domain.delete_shadow(state, expected_version), []), state.version

        return self.store.modify_shadow(device_id, change)

    def batch_update_desired(
        self,
        items: Sequence[DesiredItem],
        skip_unchanged: bool = False,
        deadline: float | None = None,
    ) -> list[ItemResult]:
        """Merge each item's desired patch into its device's shadow, all in one transaction.

        Items are independent: a bad or conflicting item gets its own result and the others
        still apply. Several items for one device apply in request order. With
        `skip_unchanged`, an item that changes nothing is not written nor announced
        (`domain.apply_update`) and its result says `unchanged`.
        """
        self._check_batch_size(len(items))

        def parse(index: int) -> domain.UpdateRequest:
            item = items[index]
            patch = domain.parse_desired_patch(item.desired_json, self.limits)
            token = domain.parse_client_token(item.client_token or None, self.limits)
            return domain.UpdateRequest({"desired": patch}, item.expected_version, token)

        device_ids = [item.device_id for item in items]
        outcomes = self._apply_batch(device_ids, parse, skip_unchanged, deadline)
        return [
            ItemResult(device_id, "OK", outcome.current.version, unchanged=outcome.unchanged)
            if isinstance(outcome, UpdateResult)
            else _failure(device_id, outcome)
            for device_id, outcome in zip(device_ids, outcomes, strict=True)
        ]

    def batch_update(
        self, items: Sequence[tuple[str, str | bytes]], deadline: float | None = None
    ) -> list[UpdateResult | ShadowError]:
        """Apply many whole update requests (device id, AWS update document) in one
        transaction: what the gateway sends for the device messages it collected. Each item
        gets its result or its own error; the others still apply, in order per device."""
        self._check_batch_size(len(items))

        def parse(index: int) -> domain.UpdateRequest:
            return domain.parse_update_request(items[index][1], self.limits)

        return self._apply_batch([device_id for device_id, _ in items], parse, deadline=deadline)

    def _check_batch_size(self, count: int) -> None:
        if count > self.max_batch_items:
            raise InvalidRequestError(
                f"a batch holds at most {self.max_batch_items} items, got {count}"
            )

    def _apply_batch(
        self,
        device_ids: Sequence[str],
        parse: Callable[[int], domain.UpdateRequest],
        skip_unchanged: bool = False,
        deadline: float | None = None,
    ) -> list[UpdateResult | ShadowError]:
        """Item i is `parse(i)` (a ShadowError refuses it) for device `device_ids[i]`. The
        items are parsed while the store locks their rows, and announced while it writes
        them (ADR 41); an item refused by parsing or by the rules changes nothing. Past
        `deadline` (checked with the rows locked) the whole batch is refused: CallerGoneError."""
        outcomes: list[UpdateResult | ShadowError] = [DeviceNotFoundError("")] * len(device_ids)
        valid: list[int] = []
        for index, device_id in enumerate(device_ids):
            try:
                domain.validate_device_id(device_id)
            except ShadowError as exc:
                outcomes[index] = exc
                continue
            valid.append(index)
        requests: dict[str, list[tuple[int, domain.UpdateRequest]]] = {}
        accepted: list[tuple[str, UpdateResult]] = []
        now = self.clock()

        def prepare() -> None:
            for index in valid:
                try:
                    request = parse(index)
                except ShadowError as exc:
                    outcomes[index] = exc
                    continue
                requests.setdefault(device_ids[index], []).append((index, request))

        def change(device_id: str, state: ShadowState) -> ShadowState | None:
            changed = False
            for index, request in requests.get(device_id, ()):
                try:
                    result = domain.apply_update(
                        state, request, now, self.limits, skip_unchanged=skip_unchanged
                    )
                except ShadowError as exc:
                    outcomes[index] = exc
                    continue
                outcomes[index] = result
                if result.unchanged:
                    continue
                state, changed = result.current, True
                accepted.append((device_id, result))
            return state if changed else None

        def announce_accepted() -> list[OutboxEvent]:
            still_wanted(deadline)
            return [announce(device_id, result) for device_id, result in accepted]

        found = self.store.modify_shadows(
            [device_ids[i] for i in valid], change, announce_accepted, prepare
        )
        self._notify_written()
        for device_id in requests.keys() - found:
            for index, _ in requests[device_id]:
                outcomes[index] = DeviceNotFoundError(f"no device {device_id!r}")
        return outcomes

    # --- the outbox ---------------------------------------------------------------------------

    def read_events(
        self, after_id: int, partition: int, partitions: int, limit: int, wait_seconds: float
    ) -> list[StoredEvent]:
        """Outbox events of a partition after `after_id`; waits up to `wait_seconds` for one."""
        if not 1 <= partitions <= 1024 or not 0 <= partition < partitions:
            raise InvalidRequestError("partition must be in [0, partitions), partitions 1-1024")
        if after_id < 0 or limit < 0:
            raise InvalidRequestError("after_id and limit must not be negative")
        limit = min(limit or 1000, MAX_EVENTS_PER_READ)
        deadline = time.monotonic() + min(max(wait_seconds, 0.0), MAX_EVENT_WAIT_SECONDS)
        while True:
            with self._written:
                seen = self._writes
            events = self.store.read_events(after_id, partition, partitions, limit)
            remaining = deadline - time.monotonic()
            if events or remaining <= 0:
                return events
            with self._written:
                if self._writes == seen:  # nothing written here since the read
                    self._written.wait(min(remaining, EVENT_POLL_SECONDS))

    def ack_events(self, event_ids: Sequence[int]) -> int:
        """The publisher has published these events: forget them."""
        if len(event_ids) > MAX_EVENTS_PER_READ:
            raise InvalidRequestError(f"acknowledge at most {MAX_EVENTS_PER_READ} events a call")
        return self.store.delete_events(event_ids)

    def _notify_written(self) -> None:
        with self._written:
            self._writes += 1
            self._written.notify_all()


def still_wanted(deadline: float | None) -> None:
    """Raise CallerGoneError once `deadline` has passed. Writes call it with their rows
    locked, just before they commit (ADR 42): a write that commits has then locked its rows
    before its caller gave up, so whatever the caller sends after giving up (a device's next
    report, say) waits for that write and lands after it, never before."""
    if deadline is not None and time.monotonic() >= deadline:
        raise CallerGoneError(
            "the caller's deadline passed before the update could be committed; nothing was written"
        )


def announce(device_id: str, result: UpdateResult) -> OutboxEvent:
    """The outbox event of an accepted update: its delta message (if any) and documents."""
    delta = (
        domain.dumps(
            domain.delta_message(
                result.current, result.timestamp, result.client_token, result.delta
            )
        )
        if result.publish_delta
        else None
    )
    return OutboxEvent(
        device_id, result.current.version, delta, domain.dumps(domain.documents_message(result))
    )


def _failure(device_id: str, exc: ShadowError) -> ItemResult:
    if isinstance(exc, VersionConflictError):
        return ItemResult(device_id, "VERSION_CONFLICT", exc.current_version, str(exc))
    if isinstance(exc, DeviceNotFoundError):
        return ItemResult(device_id, "NOT_FOUND", 0, str(exc))
    status = "TOO_LARGE" if isinstance(exc, DocumentTooLargeError) else "INVALID"
    return ItemResult(device_id, status, 0, str(exc))
