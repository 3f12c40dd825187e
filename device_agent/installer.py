"""A/B slot installers: where an image goes, which slot boots, and whether a booted slot is healthy.

`Installer` is the interface a real device implements with RAUC, SWUpdate or its own scripts.
`FilesystemInstaller` is the default: two slot directories and a boot pointer file, every write
to a temp name then renamed (and fsynced), so a power cut leaves either the old or the new state,
never a mix. `HookInstaller` runs the user's commands after each of its steps.

The installer owns slots and the pointer only. The update's progress, the pending-commit marker
and the decision to commit or roll back belong to `device_agent.boot`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from device_agent.domain import Firmware
from device_agent.errors import InstallError

SLOTS = ("a", "b")
HOOK_TIMEOUT_SECONDS = 300.0

# A test hook called with the name of each step of an update (`OTA_AGENT_CRASH_AT` makes it
# SIGKILL the process at one). It lives here, the lowest module that calls it; everywhere else
# it defaults to `no_crash`, one shared function, so it costs a device nothing.
CrashPoint = Callable[[str], None]


def no_crash(_step: str) -> None:
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old content or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Slot:
    name: str
    firmware: Firmware
    sha256: str | None  # of the image; None for a factory slot without one


class Installer(Protocol):
    """What the agent needs from a device's update mechanism."""

    def booted(self) -> Slot:
        """The slot the boot pointer names (what runs after a boot)."""
        ...

    def inactive(self) -> str:
        """The slot to install into: the one not booted."""
        ...

    def install(self, slot: str, image: Path, firmware: Firmware, sha256: str) -> None:
        """Write a verified image into `slot` (never the booted one); it takes `image` over."""
        ...

    def activate(self, slot: str) -> None:
        """Make `slot` the one that boots, atomically."""
        ...

    def health_check(self, slot: str) -> str | None:
        """None if the booted `slot` is healthy, else why not."""
        ...


class FilesystemInstaller:
    """Slots as directories under `root/slots/`, the boot pointer as `root/boot` (a slot name)."""

    def __init__(
        self,
        root: Path,
        factory: Firmware,
        health_command: Sequence[str] | None = None,
        crash: CrashPoint = no_crash,
    ) -> None:
        self.root = root
        self.health_command = list(health_command) if health_command else None
        self.crash = crash
        self._pointer = root / "boot"
        (root / "slots").mkdir(parents=True, exist_ok=True)
        if self._read_pointer() is None:
            # First start: the factory image is in slot a.
            self._write_slot_meta(self._slot_dir("a"), factory, None)
            write_atomic(self._pointer, b"a")

    def _slot_dir(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise InstallError(f"no slot {slot!r}")
        return self.root / "slots" / slot

    def _read_pointer(self) -> str | None:
        try:
            name = self._pointer.read_text().strip()
        except FileNotFoundError:
            return None
        return name if name in SLOTS else None

    def _write_slot_meta(self, directory: Path, firmware: Firmware, sha256: str | None) -> None:
        meta = {"version": firmware.version, "url": firmware.url, "sha256": sha256}
        write_json_atomic(directory / "slot.json", meta)

    def slot(self, name: str) -> Slot | None:
        meta = read_json(self._slot_dir(name) / "slot.json")
        if not isinstance(meta, dict) or not isinstance(meta.get("version"), str):
            return None
        return Slot(name, Firmware(meta["version"], meta.get("url")), meta.get("sha256"))

    def booted(self) -> Slot:
        name = self._read_pointer() or "a"
        slot = self.slot(name)
        if slot is None:
            raise InstallError(f"the boot pointer names slot {name}, which holds no image")
        return slot

    def inactive(self) -> str:
        return "b" if self.booted().name == "a" else "a"

    def install(self, slot: str, image: Path, firmware: Firmware, sha256: str) -> None:
        if slot == self.booted().name:
            raise InstallError(f"refusing to install into the booted slot {slot}")
        target = self._slot_dir(slot)
        staging = self.root / "slots" / f".staging-{slot}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            os.replace(image, staging / "image")
            # Staging half written (the image, no slot.json) and the slot not yet replaced.
            self.crash("installing")
            self._write_slot_meta(staging, firmware, sha256)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            fsync_dir(target.parent)
        except OSError as exc:
            raise InstallError(f"writing slot {slot} failed: {exc}") from exc

    def activate(self, slot: str) -> None:
        if self.slot(slot) is None:
            raise InstallError(f"slot {slot} holds no image")
        write_atomic(self._pointer, slot.encode())

    def health_check(self, slot: str) -> str | None:
        found = self.slot(slot)
        if found is None:
            return f"slot {slot} holds no image"
        image = self._slot_dir(slot) / "image"
        if found.sha256 is not None and (not image.exists() or sha256_of(image) != found.sha256):
            return f"the image in slot {slot} is not the one installed"
        if self.health_command is None:
            return None
        return run_hook(self.health_command, self._hook_env(found), "health check")

    def _hook_env(self, slot: Slot, image: Path | None = None) -> dict[str, str]:
        env = {
            "OTA_SLOT": slot.name,
            "OTA_SLOT_DIR": str(self._slot_dir(slot.name)),
            "OTA_VERSION": slot.firmware.version,
        }
        if image is not None:
            env["OTA_IMAGE"] = str(image)
        return env


def run_hook(argv: Sequence[str], env: Mapping[str, str], what: str) -> str | None:
    """Run a user command; None if it exits 0, else a short reason (with its stderr's tail)."""
    try:
        done = subprocess.run(
            list(argv),
            env={**os.environ, **env},
            capture_output=True,
            timeout=HOOK_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{what} could not run: {exc}"
    if done.returncode == 0:
        return None
    tail = done.stderr.decode(errors="replace").strip()[-200:]
    return f"{what} exited with {done.returncode}" + (f": {tail}" if tail else "")


class HookInstaller(FilesystemInstaller):
    """The filesystem slots plus the user's commands: `install` (after the image is in the slot
    directory: write it to the real partition), `activate` (after the pointer: tell the
    bootloader) and `health` (the health check). Each gets OTA_SLOT, OTA_SLOT_DIR, OTA_VERSION
    (and OTA_IMAGE for install) in its environment; a non-zero exit fails that step."""

    def __init__(
        self,
        root: Path,
        factory: Firmware,
        install_command: Sequence[str] | None = None,
        activate_command: Sequence[str] | None = None,
        health_command: Sequence[str] | None = None,
        crash: CrashPoint = no_crash,
    ) -> None:
        super().__init__(root, factory, health_command, crash)
        self.install_command = list(install_command) if install_command else None
        self.activate_command = list(activate_command) if activate_command else None

    def install(self, slot: str, image: Path, firmware: Firmware, sha256: str) -> None:
        super().install(slot, image, firmware, sha256)
        if self.install_command is not None:
            installed = Slot(slot, firmware, sha256)
            reason = run_hook(
                self.install_command,
                self._hook_env(installed, self._slot_dir(slot) / "image"),
                "install hook",
            )
            if reason is not None:
                raise InstallError(reason)

    def activate(self, slot: str) -> None:
        super().activate(slot)
        found = self.slot(slot)
        if self.activate_command is not None and found is not None:
            reason = run_hook(self.activate_command, self._hook_env(found), "activate hook")
            if reason is not None:
                raise InstallError(reason)
