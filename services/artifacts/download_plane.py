"""The device-facing download plane (aiohttp): tokens, their exchange, one-time URL downloads.

The protocol is docs/download-protocol.md; the choice of aiohttp is docs/adr/0011. This module
only translates HTTP: it authenticates the device with the shadow service, hands plain values
to `DownloadService`, and sends bytes with `sendfile` (zero-copy) under two server-wide limits:
a cap on concurrent downloads and a token bucket on the total bytes per second.

Every error is a JSON body `{"error": code, "message": ...}`. Tokens, passwords and download
URLs never reach a log line: the access log names the route pattern, not the path.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from services.artifacts import domain
from services.artifacts.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    BadRequestError,
    RangeNotSatisfiableError,
    StorageError,
    TooManyDownloadsError,
    UnauthenticatedError,
)
from services.artifacts.service import DownloadGrant, DownloadService
from services.artifacts.shadow_client import ShadowDirectory
from services.common.observability import DOWNLOAD_BYTES, DOWNLOADS, TOKEN_EXCHANGES

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

MAX_REQUEST_BODY_BYTES = 16 * 1024
MIN_PACED_CHUNK = 16 * 1024
MAX_PACED_CHUNK = 1024 * 1024
RETRY_AFTER_SECONDS = 5
TOKEN_ROUTE = "/v1/artifacts/{artifact_id}/token"
EXCHANGE_ROUTE = "/v1/downloads"
DOWNLOAD_ROUTE = "/v1/downloads/{url_id}"
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


@dataclass(frozen=True)
class PlaneLimits:
    max_concurrent_downloads: int = 100
    max_bytes_per_second: int = 0  # 0 = no cap


class DownloadSlots:
    """At most `limit` downloads at once in this process; the next is refused, not queued
    (a queued device would hold a connection and time out anyway)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def try_acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


class Pacer:
    """The total bytes/s cap: one token bucket that every download of the process draws on."""

    def __init__(self, rate: int, clock: Clock, sleep: Sleep) -> None:
        self.chunk_bytes = max(MIN_PACED_CHUNK, min(MAX_PACED_CHUNK, rate // 10))
        self.bucket = domain.TokenBucket(rate, burst=self.chunk_bytes, now=clock())
        self.clock = clock
        self.sleep = sleep

    async def take(self, amount: int) -> None:
        wait = self.bucket.reserve(amount, self.clock())
        if wait > 0:
            await self.sleep(wait)


class AuthCache:
    """Devices whose password the shadow service confirmed in the last `ttl` seconds.

    A device calls token, exchange and download (and resumes) in a burst; this spares the
    shadow service all but the first check (docs/adr/0015). Only successes are kept, as a keyed
    hash (a per-process random key), never the password; a different password asks again. At
    most `max_entries` devices, the oldest forgotten first.
    """

    def __init__(self, ttl: float, clock: Clock, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.clock = clock
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def _digest(self, credentials: domain.DeviceCredentials) -> bytes:
        return hmac.digest(self._key, credentials.password.encode(), "sha256")

    def confirmed(self, credentials: domain.DeviceCredentials) -> bool:
        entry = self._entries.get(credentials.device_id)
        if entry is None:
            return False
        digest, expires_at = entry
        if self.clock() >= expires_at:
            del self._entries[credentials.device_id]
            return False
        return hmac.compare_digest(digest, self._digest(credentials))

    def remember(self, credentials: domain.DeviceCredentials) -> None:
        if self.ttl <= 0:
            return
        self._entries[credentials.device_id] = (self._digest(credentials), self.clock() + self.ttl)
        self._entries.move_to_end(credentials.device_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log lines with the route pattern instead of the path (which holds URL secrets)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = "-"
        match_info = getattr(request, "match_info", None)
        resource = match_info.route.resource if match_info is not None else None
        if resource is not None:
            route = resource.canonical
        self.logger.info(
            "%s %s %d %d bytes %.3fs",
            request.method,
            route,
            response.status,
            response.body_length,
            time,
        )


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": code, "message": message},
        status=status,
        headers={hdrs.CACHE_CONTROL: "no-store"},
    )


def artifact_error_response(exc: ArtifactError) -> web.Response:
    response = error_response(exc.http_status, exc.code, str(exc))
    if isinstance(exc, UnauthenticatedError):
        response.headers[hdrs.WWW_AUTHENTICATE] = 'Basic realm="ota-downloads"'
    elif isinstance(exc, TooManyDownloadsError):
        response.headers[hdrs.RETRY_AFTER] = str(RETRY_AFTER_SECONDS)
    elif isinstance(exc, RangeNotSatisfiableError):
        response.headers[hdrs.CONTENT_RANGE] = f"bytes */{exc.size}"
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ArtifactError as exc:
        return artifact_error_response(exc)
    except web.HTTPException as exc:  # aiohttp's own: no such route, method, body too large
        if exc.status < 400:
            raise
        return error_response(exc.status, HTTP_CODES.get(exc.status, "error"), exc.reason)
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as exc:
        # The type only: a message or traceback could carry a secret from the request.
        artifact_id = request.match_info.get("artifact_id")
        if artifact_id is not None and not domain.ARTIFACT_ID_PATTERN.fullmatch(artifact_id):
            artifact_id = None  # only a well-formed id reaches the log
        log.error(
            "unexpected %s while serving %s",
            type(exc).__name__,
            _route(request),
            extra={"artifact_id": artifact_id},
        )
        return error_response(500, "internal", "internal error")


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "-"


class DownloadPlane:
    def __init__(
        self,
        downloads: DownloadService,
        directory: ShadowDirectory,
        limits: PlaneLimits,
        base_url: str = "",
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        workers: int = 16,
        auth_cache_seconds: float = 30.0,
    ) -> None:
        self.downloads = downloads
        self.directory = directory
        self.base_url = base_url
        self.auth_cache = AuthCache(auth_cache_seconds, clock)
        self.slots = DownloadSlots(limits.max_concurrent_downloads)
        self.pacer = (
            Pacer(limits.max_bytes_per_second, clock, sleep)
            if limits.max_bytes_per_second > 0
            else None
        )
        # The store and the file system block: they run here, off the event loop.
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[json_errors], client_max_size=MAX_REQUEST_BODY_BYTES)
        app.router.add_post(TOKEN_ROUTE, self.issue_token)
        app.router.add_post(EXCHANGE_ROUTE, self.exchange)
        app.router.add_get(DOWNLOAD_ROUTE, self.download, allow_head=False)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _app: web.Application) -> None:
        await self.directory.close()
        self.executor.shutdown(wait=False)

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def _device(self, request: web.Request) -> str:
        credentials = domain.parse_basic_auth(request.headers.get(hdrs.AUTHORIZATION))
        if not await self._authenticate(credentials):
            raise UnauthenticatedError("unknown device or wrong password")
        return credentials.device_id

    async def _authenticate(self, credentials: domain.DeviceCredentials) -> bool:
        if self.auth_cache.confirmed(credentials):
            return True
        if not await self.directory.authenticate(credentials):
            return False
        self.auth_cache.remember(credentials)
        return True

    # --- POST /v1/artifacts/{artifact_id}/token ------------------------------------------------

    async def issue_token(self, request: web.Request) -> web.Response:
        device_id = await self._device(request)
        artifact_id = request.match_info["artifact_id"]
        if not domain.ARTIFACT_ID_PATTERN.fullmatch(artifact_id):
            raise ArtifactNotFoundError("no such artifact")
        desired = await self.directory.desired_state(device_id)
        issued = await self._blocking(self.downloads.issue_token, device_id, artifact_id, desired)
        return web.json_response(
            {"token": issued.token, "expires_in": issued.expires_in},
            status=201,
            headers={hdrs.CACHE_CONTROL: "no-store"},
        )

    # --- POST /v1/downloads ---------------------------------------------------------------------

    async def exchange(self, request: web.Request) -> web.Response:
        try:
            device_id = await self._device(request)
            token = _token_from_body(await request.read())
            grant = await self._blocking(self.downloads.exchange, device_id, token)
        except ArtifactError as exc:
            TOKEN_EXCHANGES.labels(exc.code).inc()
            raise
        TOKEN_EXCHANGES.labels("ok").inc()
        return web.json_response(self._grant_json(grant), headers={hdrs.CACHE_CONTROL: "no-store"})

    def _grant_json(self, grant: DownloadGrant) -> dict[str, Any]:
        artifact = grant.artifact
        if grant.url_secret is not None:
            url = f"{self.base_url.rstrip('/')}{EXCHANGE_ROUTE}/{grant.url_secret}"
        else:
            assert grant.remote_url is not None
            url = grant.remote_url
        return {
            "url": url,
            "expires_at": int(grant.expires_at),
            "size": artifact.size,
            "sha256": artifact.sha256,
            "manifest": artifact.manifest,
            "signature": base64.b64encode(artifact.signature).decode(),
            "key_id": artifact.key_id,
        }

    # --- GET /v1/downloads/{url_id} -------------------------------------------------------------

    async def download(self, request: web.Request) -> web.StreamResponse:
        try:
            response, complete = await self._download(request)
        except ArtifactError as exc:
            DOWNLOADS.labels(exc.code).inc()
            raise
        except ConnectionResetError:
            DOWNLOADS.labels("disconnected").inc()
            raise
        DOWNLOADS.labels("complete" if complete else "partial").inc()
        return response

    async def _download(self, request: web.Request) -> tuple[web.StreamResponse, bool]:
        """The response, and whether it sent the artifact's last byte."""
        credentials = domain.parse_basic_auth(request.headers.get(hdrs.AUTHORIZATION))
        # The URL lookup runs while the shadow service checks the password (a download's
        # latency is both added up otherwise), but its verdict is heard only after the
        # password is: a wrong password is a 401 whatever the URL.
        lookup = asyncio.ensure_future(
            self._blocking(
                self.downloads.open_download, credentials.device_id, request.match_info["url_id"]
            )
        )
        try:
            authenticated = await self._authenticate(credentials)
        except BaseException:
            lookup.add_done_callback(_forget)
            raise
        if not authenticated:
            lookup.add_done_callback(_forget)
            raise UnauthenticatedError("unknown device or wrong password")
        opened = await lookup
        artifact = opened.artifact
        etag = f'"{artifact.sha256}"'
        byte_range = domain.parse_range(
            request.headers.get(hdrs.RANGE),
            artifact.size,
            request.headers.get(hdrs.IF_RANGE),
            etag,
        )
        if not self.slots.try_acquire():
            raise TooManyDownloadsError(
                f"the server is serving its maximum of {self.slots.limit} downloads; retry later"
            )
        try:
            try:
                file = await self._blocking(_open_binary, opened.source.path)
            except FileNotFoundError:
                raise ArtifactNotFoundError("the artifact was deleted") from None
            try:
                stored = os.fstat(file.fileno()).st_size
                if stored != artifact.size:
                    # Declaring the recorded length and sending fewer bytes would leave the
                    # device waiting out its read timeout; say so at once instead.
                    log.error(
                        "stored blob of artifact %s is %d bytes, its record says %d",
                        artifact.artifact_id,
                        stored,
                        artifact.size,
                    )
                    raise StorageError("the stored artifact is damaged; retry later")
                response = await self._send(request, file, artifact.size, etag, byte_range)
            finally:
                file.close()
        finally:
            self.slots.release()
        complete = byte_range is None or byte_range.reaches_end(artifact.size)
        if complete:
            await self._blocking(self.downloads.complete, opened.url_hash)
        return response, complete

    async def _send(
        self,
        request: web.Request,
        file: BinaryIO,
        size: int,
        etag: str,
        byte_range: domain.ByteRange | None,
    ) -> web.StreamResponse:
        headers = {
            hdrs.ETAG: etag,
            hdrs.ACCEPT_RANGES: "bytes",
            hdrs.CONTENT_TYPE: "application/octet-stream",
            hdrs.CACHE_CONTROL: "no-store",
        }
        if byte_range is None:
            status, offset, count = 200, 0, size
        else:
            status, offset, count = 206, byte_range.start, byte_range.length
            headers[hdrs.CONTENT_RANGE] = byte_range.content_range(size)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = count
        await response.prepare(request)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the device went away")
        loop = asyncio.get_running_loop()
        chunk = self.pacer.chunk_bytes if self.pacer is not None else count
        first = offset
        try:
            while count > 0:
                step = min(chunk, count)
                if self.pacer is not None:
                    await self.pacer.take(step)
                await loop.sendfile(transport, file, offset, step)
                offset += step
                count -= step
        except RuntimeError:  # "transport is closing": the device went away mid-download
            raise ConnectionResetError("the device went away") from None
        finally:
            DOWNLOAD_BYTES.inc(offset - first)  # once per download, what was sent
        await response.write_eof()
        return response


def _forget(future: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned lookup's outcome so asyncio does not report it as unhandled."""
    if not future.cancelled():
        future.exception()


def _open_binary(path: Path) -> BinaryIO:
    return path.open("rb")


def _token_from_body(body: bytes) -> str:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError('the body must be JSON: {"token": "..."}') from None
    token = parsed.get("token") if isinstance(parsed, dict) else None
    if not isinstance(token, str) or not token:
        raise BadRequestError('the body must be JSON: {"token": "..."}')
    return token


@dataclass
class RunningPlane:
    runner: web.AppRunner
    plane: DownloadPlane
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_download_plane(
    downloads: DownloadService,
    shadow_address: str,
    listen: str,
    limits: PlaneLimits,
    base_url: str = "",
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    auth_cache_seconds: float = 30.0,
    shadow_token: str | None = None,
) -> RunningPlane:
    """Start serving on `listen` ("host:port"; port 0 picks a free one) in the running loop.

    `base_url` is how devices reach this plane ("" = http://host:port as bound).
    """
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    plane = DownloadPlane(
        downloads,
        ShadowDirectory(shadow_address, token=shadow_token),
        limits,
        base_url,
        clock,
        sleep,
        auth_cache_seconds=auth_cache_seconds,
    )
    runner = web.AppRunner(
        plane.app(), access_log_class=RedactingAccessLogger, handle_signals=False
    )
    await runner.setup()
    site = web.TCPSite(runner, host, int(port_text), backlog=1024)
    await site.start()
    port = int(runner.addresses[0][1])
    if not base_url:
        shown = f"[{host}]" if ":" in host else host
        plane.base_url = f"http://{shown}:{port}"
    log.info("download plane listening on port %d", port)
    return RunningPlane(runner, plane, port)
