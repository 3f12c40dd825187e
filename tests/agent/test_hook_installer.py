"""The hook installer's success path: each hook runs at its step with the documented environment
(docs/device-agent.md "Installers"), and an agent configured with `"installer": "hook"` updates
end to end over the real stack, the hooks doing the slot work.

The hooks are one small script standing in for a device's RAUC / bootloader commands: `install`
copies `$OTA_IMAGE` to a "partition" file named after `$OTA_SLOT`, `activate` writes the slot
name where a bootloader would read it, `health` passes only if the bootloader names the slot and
the partition holds the slot's image. Each appends what it was given to a log.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from device_agent.domain import Firmware
from device_agent.errors import InstallError
from device_agent.installer import HookInstaller
from tests.agent.conftest import Fleet

HOOK_SCRIPT = r"""
import json, os, sys
from pathlib import Path

step, device = sys.argv[1], Path(sys.argv[2])
names = ("OTA_SLOT", "OTA_SLOT_DIR", "OTA_VERSION", "OTA_IMAGE")
env = {name: os.environ.get(name) for name in names}
record = {"step": step, "env": env}
partition = device / "partitions" / f"{env['OTA_SLOT']}.img"
bootloader = device / "bootloader"
if step == "install":
    data = Path(env["OTA_IMAGE"]).read_bytes()
    partition.parent.mkdir(parents=True, exist_ok=True)
    partition.write_bytes(data)
    record["image_size"] = len(data)
elif step == "activate":
    bootloader.write_text(env["OTA_SLOT"])
elif step == "health":
    slot_image = Path(env["OTA_SLOT_DIR"]) / "image"
    if not bootloader.exists() or bootloader.read_text() != env["OTA_SLOT"]:
        record["verdict"] = "bootloader"
    elif not partition.exists() or partition.read_bytes() != slot_image.read_bytes():
        record["verdict"] = "partition"
    else:
        record["verdict"] = "ok"
with open(device / "hooks.log", "a") as log:
    log.write(json.dumps(record) + "\n")
if record.get("verdict", "ok") != "ok":
    sys.stderr.write(f"unhealthy: {record['verdict']}")
    sys.exit(4)
"""

FACTORY = Firmware("1.0.0", None)
IMAGE = os.urandom(200_000)


def hook_commands(tmp_path: Path, device: Path) -> dict[str, Any]:
    """The three hook commands, as config keys (`install_command`, ...): lists of str."""
    script = tmp_path / "hook.py"
    script.write_text(HOOK_SCRIPT)
    device.mkdir(parents=True, exist_ok=True)
    return {
        f"{step}_command": [sys.executable, str(script), step, str(device)]
        for step in ("install", "activate", "health")
    }


def hook_log(device: Path) -> list[dict[str, Any]]:
    path = device / "hooks.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_hook_runs_at_its_step_with_the_documented_environment(tmp_path: Path) -> None:
    device = tmp_path / "device"
    root = tmp_path / "system"
    installer = HookInstaller(root, FACTORY, **hook_commands(tmp_path, device))
    download = tmp_path / "download.part"
    download.write_bytes(IMAGE)
    digest = hashlib.sha256(IMAGE).hexdigest()
    slot_dir = str(root / "slots" / "b")

    installer.install("b", download, Firmware("2.0.0", "http://plane/a"), digest)
    [install] = hook_log(device)
    assert install["step"] == "install"
    assert install["env"] == {
        "OTA_SLOT": "b",
        "OTA_SLOT_DIR": slot_dir,
        "OTA_VERSION": "2.0.0",
        "OTA_IMAGE": slot_dir + "/image",  # the image already in its slot directory
    }
    assert install["image_size"] == len(IMAGE)
    assert (device / "partitions" / "b.img").read_bytes() == IMAGE
    assert not (device / "bootloader").exists()  # installing does not switch
    assert installer.booted().name == "a"

    installer.activate("b")
    activate = hook_log(device)[1]
    assert activate["step"] == "activate"
    assert activate["env"] == {
        "OTA_SLOT": "b",
        "OTA_SLOT_DIR": slot_dir,
        "OTA_VERSION": "2.0.0",
        "OTA_IMAGE": None,
    }
    assert (device / "bootloader").read_text() == "b"
    assert installer.booted().name == "b"

    assert installer.health_check("b") is None
    health = hook_log(device)[2]
    assert health["step"] == "health" and health["verdict"] == "ok"
    assert health["env"] == activate["env"]
    assert len(hook_log(device)) == 3


def test_the_health_hooks_verdict_is_the_health_check(tmp_path: Path) -> None:
    # No install hook: the "partition" never gets the image, so the health hook refuses.
    device = tmp_path / "device"
    commands = hook_commands(tmp_path, device)
    del commands["install_command"]
    installer = HookInstaller(tmp_path / "system", FACTORY, **commands)
    download = tmp_path / "download.part"
    download.write_bytes(IMAGE)
    installer.install("b", download, Firmware("2.0.0"), hashlib.sha256(IMAGE).hexdigest())
    installer.activate("b")
    assert installer.health_check("b") == "health check exited with 4: unhealthy: partition"


def test_a_failing_activate_hook_fails_activation(tmp_path: Path) -> None:
    device = tmp_path / "device"
    commands = hook_commands(tmp_path, device)
    commands["activate_command"] = [sys.executable, "-c", "import sys; sys.exit(2)"]
    installer = HookInstaller(tmp_path / "system", FACTORY, **commands)
    download = tmp_path / "download.part"
    download.write_bytes(IMAGE)
    installer.install("b", download, Firmware("2.0.0"), hashlib.sha256(IMAGE).hexdigest())
    with pytest.raises(InstallError, match="activate hook exited with 2"):
        installer.activate("b")


def test_an_agent_with_the_hook_installer_updates_end_to_end(fleet: Fleet, tmp_path: Path) -> None:
    device = tmp_path / "hooked-device"
    agent = fleet.agent("dev-hook", installer="hook", **hook_commands(tmp_path, device))
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    assert hook_log(device) == []  # the factory image boots without any hook

    artifact = fleet.upload(IMAGE, "2.0.0")
    fleet.target("dev-hook", "2.0.0", artifact.download_url)
    firmware = fleet.wait_reported(agent, lambda fw: fw.get("state") in ("succeeded", "failed"))
    assert firmware["state"] == "succeeded", (firmware, hook_log(device), agent.log_text())
    assert firmware["version"] == "2.0.0"
    assert firmware["url"] == artifact.download_url
    assert "error" not in firmware

    # The agent's slots and boot pointer...
    slot = agent.booted_slot()
    assert (slot["slot"], slot["version"]) == ("b", "2.0.0")
    slot_dir = agent.data_dir / "system" / "slots" / "b"
    assert (slot_dir / "image").read_bytes() == IMAGE
    # ...and the hooks' own slot work: the image on the "partition", the bootloader switched,
    # the trial boot judged healthy by the health hook.
    assert (device / "partitions" / "b.img").read_bytes() == IMAGE
    assert (device / "bootloader").read_text() == "b"
    steps = hook_log(device)
    assert [s["step"] for s in steps] == ["install", "activate", "health"], steps
    expected = {"OTA_SLOT": "b", "OTA_SLOT_DIR": str(slot_dir), "OTA_VERSION": "2.0.0"}
    assert steps[0]["env"] == {**expected, "OTA_IMAGE": str(slot_dir / "image")}
    assert steps[1]["env"] == {**expected, "OTA_IMAGE": None}
    assert steps[2]["env"] == {**expected, "OTA_IMAGE": None}
    assert steps[2]["verdict"] == "ok"
    assert "delta" not in fleet.stack.document("dev-hook")["state"]
