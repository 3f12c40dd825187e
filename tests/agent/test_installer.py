"""The installers and the boot step on a real directory, without the network."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from device_agent import boot
from device_agent.domain import Firmware, Phase, Target
from device_agent.errors import InstallError
from device_agent.installer import FilesystemInstaller, HookInstaller, write_json_atomic

FACTORY = Firmware("1.0.0", None)
TARGET = Target("2.0.0", "http://p:1/v1/artifacts/" + "a" * 32, "a" * 32)
FAIL = [sys.executable, "-c", "import sys; sys.stderr.write('no space'); sys.exit(3)"]


def image(tmp_path: Path, data: bytes = b"new image") -> tuple[Path, str]:
    path = tmp_path / "download.part"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_the_factory_slot_boots_first_and_install_never_touches_it(tmp_path: Path) -> None:
    installer = FilesystemInstaller(tmp_path / "sys", FACTORY)
    assert installer.booted().name == "a"
    assert installer.booted().firmware == FACTORY
    assert installer.inactive() == "b"
    path, digest = image(tmp_path)
    with pytest.raises(InstallError, match="booted slot"):
        installer.install("a", path, Firmware("2.0.0"), digest)
    installer.install("b", path, Firmware("2.0.0"), digest)
    assert installer.booted().name == "a"
    installer.activate("b")
    assert installer.booted().firmware.version == "2.0.0"
    assert installer.health_check("b") is None


def test_a_changed_image_fails_the_health_check(tmp_path: Path) -> None:
    installer = FilesystemInstaller(tmp_path / "sys", FACTORY)
    path, digest = image(tmp_path)
    installer.install("b", path, Firmware("2.0.0"), digest)
    (tmp_path / "sys" / "slots" / "b" / "image").write_bytes(b"bit rot")
    assert "not the one installed" in (installer.health_check("b") or "")


def test_a_failing_hook_fails_its_step_with_its_stderr(tmp_path: Path) -> None:
    installer = HookInstaller(tmp_path / "sys", FACTORY, install_command=FAIL)
    path, digest = image(tmp_path)
    with pytest.raises(InstallError, match="install hook exited with 3: no space"):
        installer.install("b", path, Firmware("2.0.0"), digest)
    assert installer.booted().name == "a"


def test_boot_commits_a_healthy_trial_and_leaves_the_floor_when_none_is_declared(
    tmp_path: Path,
) -> None:
    installer = FilesystemInstaller(tmp_path / "sys", FACTORY)
    files = boot.StateFiles(tmp_path, "1.0.0")
    path, digest = image(tmp_path)
    installer.install("b", path, Firmware("2.0.0", TARGET.url), digest)
    boot.mark_pending(files, "b", "a", TARGET)
    installer.activate("b")
    state = boot.boot(installer, files)
    assert state.last.phase is Phase.SUCCEEDED
    assert state.floor == "1.0.0"  # 2.0.0 declares no floor: going back to 1.x stays possible
    assert files.pending() is None
    assert boot.boot(installer, files).floor == "1.0.0"  # idempotent


def test_boot_raises_the_floor_to_what_the_committed_build_declares(tmp_path: Path) -> None:
    installer = FilesystemInstaller(tmp_path / "sys", FACTORY)
    files = boot.StateFiles(tmp_path, "1.0.0")
    path, digest = image(tmp_path)
    installer.install("b", path, Firmware("2.0.0", TARGET.url), digest)
    boot.mark_pending(files, "b", "a", TARGET, rollback_floor="1.5.0")
    installer.activate("b")
    state = boot.boot(installer, files)
    assert (state.last.phase, state.floor) == (Phase.SUCCEEDED, "1.5.0")
    assert boot.StateFiles(tmp_path, "1.0.0").load().floor == "1.5.0"  # on disk
    assert boot.boot(installer, files).floor == "1.5.0"  # idempotent


def test_an_unhealthy_build_declaring_a_floor_does_not_raise_it(tmp_path: Path) -> None:
    installer = FilesystemInstaller(tmp_path / "sys", FACTORY, health_command=FAIL)
    files = boot.StateFiles(tmp_path, "1.0.0")
    path, digest = image(tmp_path)
    installer.install("b", path, Firmware("2.0.0", TARGET.url), digest)
    boot.mark_pending(files, "b", "a", TARGET, rollback_floor="2.0.0")
    installer.activate("b")
    state = boot.boot(installer, files)
    assert (state.last.phase, state.floor) == (Phase.ROLLED_BACK, "1.0.0")


def test_files_written_before_rollback_floors_still_load(tmp_path: Path) -> None:
    # agent.json and pending.json as the previous agent wrote them: no rollback_floor anywhere.
    installer = FilesystemInstaller(tmp_path / "sys", FACTORY)
    files = boot.StateFiles(tmp_path, "1.0.0")
    path, digest = image(tmp_path)
    installer.install("b", path, Firmware("2.0.0", TARGET.url), digest)
    target = {"version": "2.0.0", "url": TARGET.url, "artifact_id": TARGET.artifact_id}
    write_json_atomic(
        tmp_path / "agent.json",
        {"floor": "1.0.0", "shadow_version": 7, "busy": target, "failed": None,
         "failed_block": None, "job_phase": "rebooting",
         "last": {"phase": None, "target": None, "error": None}},
    )  # fmt: skip
    files.set_pending({"slot": "b", "previous": "a", "target": target, "phase": "trial",
                       "attempts": 0})  # fmt: skip
    installer.activate("b")
    state = boot.boot(installer, files)
    assert (state.last.phase, state.last.target, state.floor) == (Phase.SUCCEEDED, TARGET, "1.0.0")
    assert state.memory.shadow_version == 7


def test_boot_rolls_back_an_unhealthy_trial(tmp_path: Path) -> None:
    installer = FilesystemInstaller(tmp_path / "sys", FACTORY, health_command=FAIL)
    files = boot.StateFiles(tmp_path, "1.0.0")
    path, digest = image(tmp_path)
    installer.install("b", path, Firmware("2.0.0", TARGET.url), digest)
    boot.mark_pending(files, "b", "a", TARGET)
    installer.activate("b")
    state = boot.boot(installer, files)
    assert state.last.phase is Phase.ROLLED_BACK
    assert "health check exited with 3" in (state.last.error or "")
    assert state.memory.failed == TARGET
    assert state.floor == "1.0.0"
    assert installer.booted().name == "a"
