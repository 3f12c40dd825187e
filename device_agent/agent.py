"""The agent process: MQTT in, HTTP downloads, the installer, reports out.

One long-lived aiomqtt client per connection, in an explicit reconnect loop. On every
(re)connect it subscribes to its own topics, reports what it runs, and publishes
`<id>/state/get` to resync. Deltas and resync documents go through `domain.decide`; an update
runs as one task (download, verify, install, mark pending, switch), then `run` returns True:
the caller "reboots" (`__main__` re-executes the process; the boot step commits or rolls back).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import aiohttp
import aiomqtt

from device_agent import boot as bootmod
from device_agent.boot import AgentState, Outcome, StateFiles
from device_agent.config import AgentConfig
from device_agent.domain import (
    Firmware,
    Grant,
    HttpAction,
    Manifest,
    Phase,
    Target,
    Verdict,
    backoff_delay,
    canonical_json,
    classify_http,
    decide,
    firmware_report,
    origin,
    parse_grant,
    percent_of,
    should_report_progress,
    verify_content,
    verify_manifest,
)
from device_agent.errors import (
    DownloadError,
    InstallError,
    RetryableDownloadError,
    UpdateError,
)
from device_agent.installer import (
    CrashPoint,
    FilesystemInstaller,
    HookInstaller,
    Installer,
    no_crash,
    sha256_of,
)
from device_agent.report_ledger import ReportLedger

log = logging.getLogger("device_agent")

MAX_MESSAGE_BYTES = 64 * 1024
# Rejections that mean "not now" (rate limit, shadow service busy or down): sent again.
RETRYABLE_REJECTIONS = (429, 500, 503)
RESEND_SECONDS = 1.0  # the pause before a re-send is 1-2x this
MAX_ERROR_BODY_BYTES = 4096
CHUNK_BYTES = 64 * 1024
ProgressCallback = Callable[[int, int], Awaitable[None]]
# The topics the agent subscribes to, under `<device id>/`.
DELTA = "state/update/delta"
UPDATE_ACCEPTED = "state/update/accepted"  # tells whether the shadow holds the latest report
GET_ACCEPTED = "state/get/accepted"
UPDATE_REJECTED = "state/update/rejected"
GET_REJECTED = "state/get/rejected"
SUBSCRIBED = (DELTA, UPDATE_ACCEPTED, UPDATE_REJECTED, GET_ACCEPTED, GET_REJECTED)


def make_installer(config: AgentConfig, crash: CrashPoint = no_crash) -> Installer:
    factory = Firmware(config.factory_version, None)
    root = config.data_dir / "system"
    if config.installer == "hook":
        return HookInstaller(
            root,
            factory,
            install_command=config.install_command,
            activate_command=config.activate_command,
            health_command=config.health_command,
            crash=crash,
        )
    return FilesystemInstaller(root, factory, config.health_command, crash)


# --- downloads -----------------------------------------------------------------------------------


class Downloader:
    """Token, exchange, ranged download with resume, per docs/download-protocol.md."""

    def __init__(
        self, config: AgentConfig, session: aiohttp.ClientSession, crash: CrashPoint = no_crash
    ) -> None:
        self.config = config
        self.session = session
        self.crash = crash
        # HTTP Basic with the device's own credentials (aiohttp's BasicAuth is deprecated).
        credentials = f"{config.device_id}:{config.password}".encode()
        self.authorization = "Basic " + base64.b64encode(credentials).decode("ascii")
        self.partial_dir = config.data_dir / "download"

    def partial_path(self, target: Target) -> Path:
        return self.partial_dir / f"{target.artifact_id}.part"

    async def obtain(
        self, target: Target, floor: str | None, progress: ProgressCallback
    ) -> tuple[Path, Manifest]:
        """The artifact's bytes in a file, and its verified manifest; bounded retries."""
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        part = self.partial_path(target)
        grant: Grant | None = None
        manifest: Manifest | None = None
        attempt = 0
        while True:
            try:
                if grant is None or manifest is None or grant.expires_at <= time.time():
                    grant = await self._grant(target)
                    manifest = verify_manifest(
                        grant, self.config.trusted_keys, target, self.config.hardware, floor
                    )
                await self._fetch(target, grant, part, progress)
                return part, manifest
            except RetryableDownloadError as exc:
                attempt += 1
                if attempt >= self.config.retry.max_attempts:
                    raise DownloadError(
                        f"download gave up after {attempt} attempts: {exc}"
                    ) from None
                if exc.restart_grant:
                    grant = None
                delay = backoff_delay(
                    attempt - 1, self.config.retry, random.random(), exc.retry_after
                )
                log.info("download: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def _error(self, response: aiohttp.ClientResponse, what: str) -> Exception:
        body = await response.content.read(MAX_ERROR_BODY_BYTES)
        code = message = None
        with contextlib.suppress(ValueError, AttributeError):
            data = json.loads(body)
            code, message = str(data.get("error")), str(data.get("message"))
        text = f"{what}: HTTP {response.status} {code or ''} {message or ''}".strip()
        action = classify_http(response.status, code)
        if action is HttpAction.RETRY:
            retry_after = 0.0
            with contextlib.suppress(TypeError, ValueError):
                retry_after = min(float(response.headers.get("Retry-After", 0)), 300.0)
            return RetryableDownloadError(text, retry_after=retry_after)
        if action is HttpAction.NEW_GRANT:
            return RetryableDownloadError(text, restart_grant=True)
        if action is HttpAction.FROM_ZERO:
            return RetryableDownloadError(text)
        return DownloadError(text)

    async def _post_json(self, url: str, what: str, expect: int, **kwargs: Any) -> Any:
        try:
            headers = {"Authorization": self.authorization}
            async with self.session.post(url, headers=headers, **kwargs) as response:
                if response.status != expect:
                    raise await self._error(response, what)
                body = await response.content.read(64 * 1024)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableDownloadError(f"{what}: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise DownloadError(f"{what}: the answer is not JSON") from None

    async def _grant(self, target: Target) -> Grant:
        token_body = await self._post_json(f"{target.url}/token", "token request", 201)
        token = token_body.get("token") if isinstance(token_body, dict) else None
        if not isinstance(token, str) or len(token) > 1024:
            raise DownloadError("token request: the answer holds no token")
        base = target.url.split("/v1/artifacts/")[0]
        grant_body = await self._post_json(
            f"{base}/v1/downloads", "token exchange", 200, json={"token": token}
        )
        return parse_grant(grant_body, self.config.max_download_bytes)

    async def _fetch(
        self, target: Target, grant: Grant, part: Path, progress: ProgressCallback
    ) -> None:
        have = part.stat().st_size if part.exists() else 0
        if have == grant.size:
            return
        if have > grant.size:
            part.unlink()
            have = 0
        headers = {"If-Range": f'"{grant.sha256}"'}
        if have:
            headers["Range"] = f"bytes={have}-"
            log.info("download: resuming from byte %d of %d", have, grant.size)
        # Device credentials go only to the plane itself, never to a presigned S3 URL.
        if origin(grant.url) == origin(target.url):
            headers["Authorization"] = self.authorization
        try:
            async with self.session.get(grant.url, headers=headers) as response:
                if response.status == 416:
                    part.unlink(missing_ok=True)
                if response.status not in (200, 206):
                    raise await self._error(response, "download")
                start = 0
                if response.status == 206:
                    content_range = response.headers.get("Content-Range", "")
                    start = have if content_range.startswith(f"bytes {have}-") else -1
                    if start < 0:
                        part.unlink(missing_ok=True)
                        raise RetryableDownloadError("download: unexpected Content-Range")
                    log.info("download: the server resumed at byte %d", have)
                elif have:
                    log.info("download: the server sent the whole artifact; from byte 0")
                received = start
                with part.open("r+b" if start and part.exists() else "wb") as handle:
                    handle.seek(start)
                    handle.truncate()
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        received += len(chunk)
                        if received > grant.size:
                            raise DownloadError(
                                f"the server sent more than the manifest's {grant.size} bytes"
                            )
                        handle.write(chunk)
                        if received - len(chunk) == start and received < grant.size:
                            # The first chunk of this body is on disk and more is to come.
                            handle.flush()
                            self.crash("downloading")
                        await progress(received, grant.size)
                    handle.flush()
                    os.fsync(handle.fileno())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableDownloadError(f"download: {type(exc).__name__}: {exc}") from None
        if received < grant.size:
            raise RetryableDownloadError(f"download: cut short at {received} of {grant.size}")


# --- the MQTT inbox ------------------------------------------------------------------------------


class MessageQueue:
    """The incoming-message queue of one aiomqtt client (its `queue_type`): FIFO, unbounded
    unless `maxsize` > 0, the part of `asyncio.Queue` aiomqtt uses (`put_nowait`, `get`,
    `qsize`). Why not `asyncio.Queue`: it holds four deques from birth (about 3 KiB), which is
    a tenth of what a simulated device costs when thousands of agents share one process (the
    fleet simulator); this one holds nothing while no message waits. Any number of readers;
    a reader cancelled after being woken leaves the message for the next `get`."""

    __slots__ = ("_items", "_maxsize", "_waiters")

    def __init__(self, maxsize: int = 0) -> None:
        self._maxsize = maxsize
        self._items: collections.deque[aiomqtt.Message] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items is not None else 0

    def put_nowait(self, item: aiomqtt.Message) -> None:
        if 0 < self._maxsize <= self.qsize():
            raise asyncio.QueueFull
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        for waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_result(None)  # every reader re-checks; a late one waits again

    async def get(self) -> aiomqtt.Message:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
                if not self._waiters:
                    self._waiters = None
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item


# aiomqtt types `queue_type` as an asyncio.Queue class; it calls only what MessageQueue has.
MESSAGE_QUEUE = cast("type[asyncio.Queue[aiomqtt.Message]]", MessageQueue)


# --- the agent -----------------------------------------------------------------------------------


class Agent:
    """One device's agent. `run()` serves until `stop()` (returns False) or until an installed
    update wants a reboot (returns True).

    Thousands of these share one process in the fleet simulator, so a connected agent holds
    no task or event beyond what it needs: the task that runs it, the task reading the MQTT
    inbox, and the client's own. `stop()` and a finished update wake it by cancelling the
    reader (or ending the pause before a reconnect) instead of each having a waiter task."""

    def __init__(
        self,
        config: AgentConfig,
        crash: CrashPoint = no_crash,
        installer: Installer | None = None,
        files: StateFiles | None = None,
    ) -> None:
        # `installer` and `files` default to the device's own (from the config); the fleet
        # simulator passes in-memory ones.
        self.config = config
        self.crash = crash
        self.installer = installer if installer is not None else make_installer(config, crash)
        self.files = (
            files if files is not None else StateFiles(config.data_dir, config.factory_version)
        )
        self.state: AgentState = self.files.load()
        self.client: aiomqtt.Client | None = None
        self.job: asyncio.Task[None] | None = None
        self.downloader: Downloader | None = None  # the current update's
        self.connected = False  # subscribed, reported and resync asked on this connection
        self.rebooting = False  # an installed update wants the reboot
        self.stopping = False
        self._session: aiohttp.ClientSession | None = None
        self._last_percent: int | None = None
        self._resend: asyncio.Task[None] | None = None
        # Whether the shadow holds the latest report (ADR 44); a timer while it is unanswered.
        self._ledger = ReportLedger(config.report_confirm_seconds)
        self._confirm_timer: asyncio.TimerHandle | None = None
        self._token_prefix = secrets.token_hex(3)  # this process's clientTokens
        self._reports_sent = 0
        self._reader: asyncio.Task[None] | None = None  # while connected
        self._pause: asyncio.Future[None] | None = None  # while waiting to reconnect

    @property
    def running(self) -> Firmware:
        return bootmod.running(self.installer)

    # --- reports -------------------------------------------------------------------------------

    def _truth(self) -> dict[str, Any]:
        busy = self.state.memory.busy
        if busy is not None and self.state.job_phase is not None:
            return firmware_report(self.state.job_phase, self.running, busy)
        last = self.state.last
        return firmware_report(last.phase, self.running, last.target, error=last.error)

    async def _report(self, reported: dict[str, Any]) -> None:
        client = self.client
        if client is None:
            return  # reported in full on the next connect
        self._reports_sent += 1
        token = f"{self._token_prefix}-{self._reports_sent}"
        payload = json.dumps({"state": {"reported": reported}, "clientToken": token})
        loop = asyncio.get_running_loop()
        self._ledger.sent(token, loop.time())  # before: its answer may follow the PUBACK at once
        try:
            await client.publish(f"{self.config.device_id}/state/update", payload, qos=1)
        except aiomqtt.MqttError:
            return  # the connection is going: the next one reports in full
        if self._confirm_timer is None and self.client is client and not self._ledger.answered:
            self._confirm_timer = loop.call_later(
                self._ledger.current_wait(), self._check_answered, client
            )

    def _check_answered(self, client: aiomqtt.Client) -> None:
        """The confirm timer: the latest report still unanswered after its wait is sent again
        (the broker took it, but the shadow may never get it: ADR 44)."""
        self._confirm_timer = None
        if self.client is not client or self.stopping:
            return
        loop = asyncio.get_running_loop()
        due = self._ledger.due_in(loop.time())
        if due is None:
            return
        if due > 0:  # a newer report went out since the timer was set
            self._confirm_timer = loop.call_later(due, self._check_answered, client)
            return
        if self._resend is not None and not self._resend.done():
            # A re-send is on its way (of a report, or of a resync): look again after it.
            self._confirm_timer = loop.call_later(2 * RESEND_SECONDS, self._check_answered, client)
            return
        log.info("report unanswered for %.0f s; sending it again", self._ledger.current_wait())
        self._ledger.resending_overdue()
        self._resend = asyncio.create_task(self._report(self._truth()))

    def _stop_confirming(self) -> None:
        if self._confirm_timer is not None:
            self._confirm_timer.cancel()
            self._confirm_timer = None

    def _save(self, state: AgentState) -> None:
        self.state = state
        self.files.save(state)

    # --- the connection ------------------------------------------------------------------------

    def new_downloader(self, session: aiohttp.ClientSession) -> Downloader:
        """The downloader of an update (the fleet simulator wraps it to inject faults)."""
        return Downloader(self.config, session, self.crash)

    def stop(self) -> None:
        """Make `run` disconnect and return False, from any state, at once (before `run`
        too; a signal handler may call it)."""
        self.stopping = True
        if self._reader is not None:
            self._reader.cancel()
        if self._pause is not None and not self._pause.done():
            self._pause.set_result(None)

    def on_connected(self) -> None:
        """Called on each connection once subscribed, reported and resync asked (the fleet
        simulator waits for it)."""

    async def run(self, session: aiohttp.ClientSession | None = None) -> bool:
        """Boot, then serve until `stop()` (False) or an installed update wants a reboot
        (True). `session`: an HTTP session to share (the fleet simulator's); else its own."""
        self.state = await asyncio.to_thread(bootmod.boot, self.installer, self.files, self.crash)
        own_session = session is None
        if session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
            session = aiohttp.ClientSession(timeout=timeout)
        self._session = session
        try:
            backoff = 0.5
            while not self.stopping and not self.rebooting:
                try:
                    async with aiomqtt.Client(
                        self.config.mqtt_host,
                        self.config.mqtt_port,
                        username=self.config.device_id,
                        password=self.config.password,
                        identifier=self.config.device_id,
                        queue_type=MESSAGE_QUEUE,
                        protocol=aiomqtt.ProtocolVersion.V311,
                        clean_session=True,
                        keepalive=self.config.keepalive,
                    ) as client:
                        backoff = 0.5
                        await self._serve(client)
                except aiomqtt.MqttError as exc:
                    log.warning("MQTT connection lost (%s); reconnecting in %.1fs", exc, backoff)
                finally:
                    self.client = None
                    self.connected = False
                    self._stop_confirming()
                if self.stopping or self.rebooting:
                    break
                await self._pause_unless_stopped(backoff + backoff * random.random())
                backoff = min(backoff * 2, 30.0)
            if self.job is not None and not self.rebooting:
                self.job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.job
        finally:
            if own_session:
                await session.close()
        return self.rebooting

    async def _pause_unless_stopped(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        pause = self._pause = loop.create_future()
        timer = loop.call_later(seconds, _resolve, pause)
        try:
            await pause
        finally:
            timer.cancel()
            self._pause = None

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Subscribe, report, ask to resync, then read commands until the connection drops
        (MqttError), `stop()` or a reboot is due (both cancel the reader: return)."""
        for suffix in SUBSCRIBED:
            await client.subscribe(f"{self.config.device_id}/{suffix}", qos=1)
        self.client = client
        self._ledger = ReportLedger(self.config.report_confirm_seconds)  # waits start afresh
        await self._report(self._truth())
        await client.publish(f"{self.config.device_id}/state/get", "{}", qos=1)
        self.connected = True
        self.on_connected()
        if self.stopping or self.rebooting:
            return
        reader = self._reader = asyncio.create_task(self._inbound(client))
        try:
            await reader
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if not reader.cancelled() or (this is not None and this.cancelling()):
                raise  # this task itself is being cancelled, not just the reader
        finally:
            self._reader = None

    async def _inbound(self, client: aiomqtt.Client) -> None:
        prefix = f"{self.config.device_id}/"
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray) or len(payload) > MAX_MESSAGE_BYTES:
                continue
            topic = message.topic.value
            suffix = topic[len(prefix) :] if topic.startswith(prefix) else None
            if suffix not in SUBSCRIBED:
                continue
            try:
                document = json.loads(payload)
            except ValueError:
                continue
            if suffix == UPDATE_ACCEPTED:
                await self._on_accepted(document)
                continue
            if suffix in (UPDATE_REJECTED, GET_REJECTED):
                self._on_rejected(document, client, resync=suffix == GET_REJECTED)
                continue
            await self.handle(document, resync=suffix == GET_ACCEPTED)

    async def _on_accepted(self, document: Any) -> None:
        """An update of this shadow was written. When another report (an older one that
        committed late, through another gateway) was written after the latest, send the truth
        again (ADR 44)."""
        if not isinstance(document, dict):
            return
        state = document.get("state")
        reported = state.get("reported") if isinstance(state, dict) else None
        wrote_firmware = isinstance(reported, dict) and "firmware" in reported
        overwritten = self._ledger.on_accepted(
            document.get("clientToken"), document.get("version"), wrote_firmware
        )
        if self._ledger.answered:
            self._stop_confirming()  # nothing to wait for (a connected fleet holds no timers)
        if overwritten:
            log.info("an older report was written after the latest; sending it again")
            await self._report(self._truth())

    def _on_rejected(self, document: Any, client: aiomqtt.Client, resync: bool) -> None:
        """A report or resync the platform could not take now (429 rate limit, 503 shadow
        service busy or down) is sent again after a pause: what the device runs is the truth
        the shadow must end up with, and a lost final report would leave a rollout waiting.
        One re-send at a time; it sends the state as it is then (reports are whole)."""
        if not resync and isinstance(document, dict):
            self._ledger.on_rejected(document.get("clientToken"))
            if self._ledger.answered:
                self._stop_confirming()
        code = document.get("code") if isinstance(document, dict) else None
        if code not in RETRYABLE_REJECTIONS or (self._resend and not self._resend.done()):
            return
        self._resend = asyncio.create_task(self._send_again(client, resync))

    async def _send_again(self, client: aiomqtt.Client, resync: bool) -> None:
        await asyncio.sleep(RESEND_SECONDS * (1 + random.random()))
        if self.client is not client:
            return  # reconnected meanwhile: the new connection reported and resynced
        if resync:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(f"{self.config.device_id}/state/get", "{}", qos=1)
        else:
            await self._report(self._truth())

    # --- commands ------------------------------------------------------------------------------

    async def handle(self, document: Any, resync: bool) -> None:
        state = self.state
        decision = decide(
            document, state.memory, self.running, self.config.download_base_url, resync
        )
        log.info(
            "%s: %s (%s)", "resync" if resync else "delta", decision.verdict.value, decision.reason
        )
        memory = state.memory
        if decision.shadow_version is not None and decision.shadow_version > memory.shadow_version:
            memory = replace(memory, shadow_version=decision.shadow_version)
        if decision.verdict is Verdict.REJECT:
            block = document.get("state", {})
            block = block.get("desired", {}) if resync else block
            key = canonical_json({"block": block.get("firmware")}).decode()
            self._save(
                replace(
                    state,
                    memory=replace(memory, failed_block=key),
                    last=Outcome(Phase.FAILED, None, decision.reason),
                )
            )
            await self._report(firmware_report(Phase.FAILED, self.running, error=decision.reason))
            return
        if decision.verdict is Verdict.START and decision.target is not None:
            if self.job is not None and not self.job.done():
                if state.job_phase not in (Phase.DOWNLOADING, Phase.VERIFYING):
                    self._save(replace(state, memory=memory))
                    return  # past the point of no return; the resync after boot decides
                self.job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.job
                state = self.state
            memory = replace(memory, busy=decision.target, failed_block=None)
            self._save(replace(state, memory=memory, job_phase=Phase.DOWNLOADING))
            self.job = asyncio.create_task(self._update(decision.target))
            return
        if memory != state.memory:
            self._save(replace(state, memory=memory))

    # --- the update ----------------------------------------------------------------------------

    async def _phase(self, target: Target, phase: Phase) -> None:
        self._save(replace(self.state, job_phase=phase))
        await self._report(firmware_report(phase, self.running, target, percent=0))

    async def _progress(self, target: Target, received: int, size: int) -> None:
        percent = percent_of(received, size)
        if should_report_progress(self._last_percent, percent):
            self._last_percent = percent
            await self._report(
                firmware_report(Phase.DOWNLOADING, self.running, target, percent=percent)
            )

    async def _update(self, target: Target) -> None:
        self._last_percent = None
        assert self._session is not None, "an update runs within run()"
        downloader = self.downloader = self.new_downloader(self._session)
        try:
            await self._phase(target, Phase.DOWNLOADING)
            self.crash("accepted")

            async def progress(received: int, size: int) -> None:
                await self._progress(target, received, size)

            path, manifest = await downloader.obtain(target, self.state.floor, progress)
            self.crash("downloaded")
            await self._phase(target, Phase.VERIFYING)
            size = path.stat().st_size
            digest = await asyncio.to_thread(sha256_of, path)
            try:
                verify_content(manifest, size, digest)
            except UpdateError:
                path.unlink(missing_ok=True)
                raise
            self.crash("verified")
            await self._phase(target, Phase.INSTALLING)
            previous = self.installer.booted().name
            slot = self.installer.inactive()
            firmware = Firmware(target.version, target.url)
            await asyncio.to_thread(self.installer.install, slot, path, firmware, digest)
            self.crash("installed")
            bootmod.mark_pending(self.files, slot, previous, target, manifest.rollback_floor)
            self.crash("marked")
            await self._phase(target, Phase.REBOOTING)
            try:
                await asyncio.to_thread(self.installer.activate, slot)
            except InstallError:
                with contextlib.suppress(InstallError):
                    self.installer.activate(previous)
                self.files.clear_pending()
                raise
            self.crash("switched")
            self.rebooting = True
            if self._reader is not None:
                self._reader.cancel()  # leave the connection; `run` returns True
        except asyncio.CancelledError:
            self._save(
                replace(self.state, memory=replace(self.state.memory, busy=None), job_phase=None)
            )
            raise
        except UpdateError as exc:
            await self._fail(target, str(exc))
        except Exception as exc:  # a bug or an I/O error must not leave the job hanging
            log.exception("update to %s failed", target.version)
            await self._fail(target, f"internal error: {type(exc).__name__}: {exc}")

    async def _fail(self, target: Target, error: str) -> None:
        log.warning("update to %s failed: %s", target.version, error)
        if self.downloader is not None:
            self.downloader.partial_path(target).unlink(missing_ok=True)
        memory = replace(self.state.memory, busy=None, failed=target)
        self._save(
            replace(
                self.state, memory=memory, job_phase=None, last=Outcome(Phase.FAILED, target, error)
            )
        )
        await self._report(firmware_report(Phase.FAILED, self.running, target, error=error))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
