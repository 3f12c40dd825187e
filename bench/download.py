"""Benchmark of the download plane against nginx serving the same file, in the same run.

Aggregate download throughput with 1 and 32 concurrent clients on one 64 MiB artifact:
(a) the download plane as deployed: `python -m services.shadow` and `python -m services.artifacts`
    as subprocesses (local storage, SQLite), every client a registered device fetching its own
    one-time URL with its own Basic credentials. Each GET comes right after that device's token
    and exchange requests, as on a real device, so with the plane's device check cache on (the
    default) the GET's check is a cache hit; `--auth-cache-seconds 0` makes every GET ask the
    shadow service;
(b) Debian's nginx on a loopback port, with its own config in a temp dir (`sendfile on`),
    serving the very same blob file.
Both are fetched by the same client: threads with raw sockets and `recv_into` a reused buffer,
so the client costs both sides alike. Runs are paired (plane, nginx; the order alternating) and
the printed ratio is the median of the per-pair ratios, with their range, because other load on
a shared machine moves both servers' absolute figures a lot between runs. Tokens and URLs are
obtained before the clock starts: the figure is the bytes plane. Every response's length is
checked; the plane's bytes are checked against the sha256 once. Figures are printed, never
asserted (CONVENTIONS.md point 8).

Run from the repository root: `.venv/bin/python bench/download.py [--quick] [--size-mib N]`.
Needs nginx (`apt-get install -y nginx`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from protos.artifacts.v1 import artifacts_pb2 as apb  # noqa: E402
from protos.artifacts.v1 import artifacts_pb2_grpc as apb_grpc  # noqa: E402
from protos.shadow.v1 import shadow_pb2 as spb  # noqa: E402
from protos.shadow.v1 import shadow_pb2_grpc as spb_grpc  # noqa: E402

MIB = 1024 * 1024
TARGET_RATIO = 0.8
NGINX_CONF = """
worker_processes auto;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ application/octet-stream bin; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def process(
    args: list[str], env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            args, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_until(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not start within 60 s")


def grpc_ready(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
        except grpc.FutureTimeoutError:
            return False
    return True


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- the client ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetch:
    port: int
    path: str
    authorization: str | None = None


def http_get(fetch: Fetch, buffer: memoryview, digest: hashlib._Hash | None = None) -> int:
    """GET one resource over a fresh connection; returns the body length after checking it."""
    with socket.create_connection(("127.0.0.1", fetch.port)) as sock:
        auth = f"Authorization: {fetch.authorization}\r\n" if fetch.authorization else ""
        sock.sendall(
            f"GET {fetch.path} HTTP/1.1\r\nHost: 127.0.0.1:{fetch.port}\r\n{auth}"
            "Connection: close\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed before the headers ended")
            head += chunk
        header, _, body = head.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status != 200:
            raise RuntimeError(f"GET answered {status}: {body[:200]!r}")
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        received = len(body)
        if digest is not None:
            digest.update(body)
        while received < length:
            n = sock.recv_into(buffer)
            if n == 0:
                break
            if digest is not None:
                digest.update(buffer[:n])
            received += n
        if received != length:
            raise RuntimeError(f"got {received} of {length} bytes")
        return received


def aggregate_throughput(fetches: list[Fetch]) -> float:
    """All fetches at once, one thread each: total bytes / wall time (MiB/s)."""
    start = threading.Barrier(len(fetches) + 1)
    sizes: list[int] = []
    errors: list[BaseException] = []

    def run(fetch: Fetch) -> None:
        buffer = memoryview(bytearray(MIB))
        start.wait()
        try:
            sizes.append(http_get(fetch, buffer))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f,)) for f in fetches]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} downloads failed, first: {errors[0]!r}")
    return sum(sizes) / MIB / elapsed


# --- the stack ----------------------------------------------------------------------------------


@dataclass
class Plane:
    artifacts: apb_grpc.ArtifactServiceStub
    shadow: spb_grpc.ShadowServiceStub
    download_port: int
    artifact: apb.Artifact
    devices: list[tuple[str, str]]

    def one_time_fetches(self, count: int) -> list[Fetch]:
        """A fresh one-time URL for each of `count` devices (token, then exchange)."""
        fetches = []
        for device_id, password in self.devices[:count]:
            authorization = "Basic " + base64.b64encode(f"{device_id}:{password}".encode()).decode()
            token = self._post(f"/v1/artifacts/{self.artifact.artifact_id}/token", authorization)
            grant = self._post("/v1/downloads", authorization, {"token": token["token"]})
            fetches.append(Fetch(self.download_port, urlsplit(grant["url"]).path, authorization))
        return fetches

    def _post(self, path: str, authorization: str, body: object = None) -> dict[str, str]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.download_port}{path}",
            data=json.dumps(body or {}).encode(),
            headers={"Authorization": authorization, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, str] = json.loads(response.read())
            return answer


def upload(stub: apb_grpc.ArtifactServiceStub, path: Path) -> apb.Artifact:
    def requests() -> Iterator[apb.UploadArtifactRequest]:
        yield apb.UploadArtifactRequest(
            metadata=apb.ArtifactMetadata(
                name="bench-firmware", version="1.0.0", compatible_hardware=["bench"]
            )
        )
        with path.open("rb") as handle:
            while chunk := handle.read(MIB):
                yield apb.UploadArtifactRequest(chunk=chunk)
        yield apb.UploadArtifactRequest(end=apb.UploadEnd())

    return stub.UploadArtifact(requests())


def register_targeted(
    shadow: spb_grpc.ShadowServiceStub, artifact: apb.Artifact, count: int
) -> list[tuple[str, str]]:
    devices = []
    for i in range(count):
        reply = shadow.RegisterDevice(spb.RegisterDeviceRequest(device_id=f"bench-{i:03d}"))
        devices.append((reply.device.device_id, reply.credentials.password))
    desired = json.dumps({"firmware": {"version": artifact.version, "url": artifact.download_url}})
    shadow.BatchUpdateDesired(
        spb.BatchUpdateDesiredRequest(
            items=[spb.DesiredPatch(device_id=d, desired_json=desired) for d, _ in devices]
        )
    )
    return devices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 MiB artifact, one repetition")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=9, help="paired runs per figure (medians)")
    parser.add_argument(
        "--auth-cache-seconds",
        type=int,
        default=30,
        help="the plane's OTA_DOWNLOAD_AUTH_CACHE_SECONDS (0: every GET asks the shadow service)",
    )
    args = parser.parse_args()
    size_mib, repeat = (8, 1) if args.quick else (args.size_mib, args.repeat)
    concurrency = [1, 32]
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit("nginx is needed for the baseline: apt-get install -y nginx")

    with tempfile.TemporaryDirectory(prefix="ota-bench-download-") as temp:
        work = Path(temp)
        os.chmod(work, 0o755)  # nginx workers run as an unprivileged user
        source = work / "source.bin"
        source.write_bytes(os.urandom(size_mib * MIB))
        expected_sha256 = hashlib.sha256(source.read_bytes()).hexdigest()

        shadow_port, artifacts_port, download_port, nginx_port = (free_port() for _ in range(4))
        env = {
            **os.environ,
            "OTA_DATABASE_URL": f"sqlite:///{work / 'ota.db'}",
            "OTA_SHADOW_LISTEN": f"127.0.0.1:{shadow_port}",
            "OTA_SHADOW_ADDRESS": f"127.0.0.1:{shadow_port}",
            "OTA_ARTIFACTS_LISTEN": f"127.0.0.1:{artifacts_port}",
            "OTA_DOWNLOAD_LISTEN": f"127.0.0.1:{download_port}",
            "OTA_ARTIFACTS_DIR": str(work / "artifacts"),
            "OTA_SIGNING_KEY_PATH": str(work / "signing.pem"),
            "OTA_DOWNLOAD_MAX_CONCURRENT": "256",
            "OTA_DOWNLOAD_AUTH_CACHE_SECONDS": str(args.auth_cache_seconds),
        }
        python = sys.executable
        with (
            process([python, "-m", "services.shadow"], env, work / "shadow.log") as shadow_proc,
        ):
            wait_until(lambda: grpc_ready(f"127.0.0.1:{shadow_port}"), "shadow", shadow_proc)
            with process(
                [python, "-m", "services.artifacts"], env, work / "artifacts.log"
            ) as artifacts_proc:
                wait_until(
                    lambda: grpc_ready(f"127.0.0.1:{artifacts_port}") and port_open(download_port),
                    "artifact service",
                    artifacts_proc,
                )
                channel = grpc.insecure_channel(f"127.0.0.1:{artifacts_port}")
                shadow_channel = grpc.insecure_channel(f"127.0.0.1:{shadow_port}")
                artifacts = apb_grpc.ArtifactServiceStub(channel)
                shadow = spb_grpc.ShadowServiceStub(shadow_channel)
                artifact = upload(artifacts, source)
                assert artifact.sha256 == expected_sha256
                devices = register_targeted(shadow, artifact, max(concurrency))
                plane = Plane(artifacts, shadow, download_port, artifact, devices)

                # nginx serves the blob file the plane serves, from the same directory.
                blob = work / "artifacts" / "blobs" / artifact.sha256[:2] / artifact.sha256
                www = work / "www"
                www.mkdir()
                os.link(blob, www / "firmware.bin")
                for path in (work / "artifacts", blob.parent.parent, blob.parent):
                    os.chmod(path, 0o755)
                os.chmod(blob, 0o644)
                (work / "nginx.conf").write_text(
                    NGINX_CONF.format(prefix=work, port=nginx_port, root=www)
                )
                nginx_args = [nginx, "-p", str(work), "-c", str(work / "nginx.conf")]
                with process(nginx_args, env, work / "nginx.out") as nginx_proc:
                    wait_until(lambda: port_open(nginx_port), "nginx", nginx_proc)

                    # Once, untimed: the plane's bytes are the artifact's.
                    digest = hashlib.sha256()
                    check = plane.one_time_fetches(1)[0]
                    http_get(check, memoryview(bytearray(MIB)), digest)
                    assert digest.hexdigest() == expected_sha256, "the plane sent other bytes"

                    rows = []
                    nginx_fetch = Fetch(nginx_port, "/firmware.bin")
                    for clients in concurrency:
                        plane_runs, nginx_runs, ratios = [], [], []
                        for run in range(repeat):
                            # Paired runs, the order alternating, so load from elsewhere on the
                            # machine hits both sides alike; the ratio is taken per pair.
                            fetches = plane.one_time_fetches(clients)
                            if run % 2:
                                nginx_rate = aggregate_throughput([nginx_fetch] * clients)
                                plane_rate = aggregate_throughput(fetches)
                            else:
                                plane_rate = aggregate_throughput(fetches)
                                nginx_rate = aggregate_throughput([nginx_fetch] * clients)
                            plane_runs.append(plane_rate)
                            nginx_runs.append(nginx_rate)
                            ratios.append(plane_rate / nginx_rate)
                        rows.append(
                            (
                                clients,
                                statistics.median(plane_runs),
                                statistics.median(nginx_runs),
                                statistics.median(ratios),
                                min(ratios),
                                max(ratios),
                            )
                        )
                channel.close()
                shadow_channel.close()

    print(
        f"download plane vs nginx, {size_mib} MiB artifact, {repeat} paired run(s), "
        f"device check cache {args.auth_cache_seconds} s"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print("ratio = median of the per-pair ratios plane/nginx (min-max over the pairs)")
    print(
        f"{'clients':>7}  {'plane MiB/s':>12}  {'nginx MiB/s':>12}  {'ratio':>6}  "
        f"{'min-max':>10}  target"
    )
    for clients, plane_rate, nginx_rate, ratio, low, high in rows:
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(
            f"{clients:>7}  {plane_rate:>12.0f}  {nginx_rate:>12.0f}  {ratio:>6.2f}  "
            f"{low:>4.2f}-{high:<4.2f}  >= {TARGET_RATIO} {verdict}"
        )


if __name__ == "__main__":
    main()
