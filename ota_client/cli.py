"""`otactl`: the operator CLI over `ota_client` (typer + rich).

    otactl devices register dev-1 --tag site=berlin --hardware rpi4 --agent-config dev-1.json
    otactl devices list --json
    otactl shadow update dev-1 --desired '{"firmware": {"version": "2.0.0"}}' --version 3
    otactl artifacts upload build.img --name app --version 2.0.0 --hardware rpi4

Settings come from `--endpoints PATH` / `.devstack/endpoints.json` and the environment
(`ota_client.settings`). Every read command takes `--json` (one JSON document on stdout).

Exit codes: 0 success; 1 the command failed (the service refused or could not be reached, a
bad endpoints file, a file not written), with `error: <kind>: <message>` on stderr; 2 wrong
usage (unknown command or option, a missing argument, a value that does not parse).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich import box, filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table

from ota_client.client import OtaClient
from ota_client.errors import OtaError
from ota_client.models import Artifact, Device
from ota_client.settings import ClientSettings

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

app = typer.Typer(
    name="otactl",
    help="Operate an OTA fleet: devices, shadows and artifacts.",
    no_args_is_help=True,
    add_completion=False,
    # Locals in a traceback would print the operator token.
    pretty_exceptions_show_locals=False,
)
devices_app = typer.Typer(help="Register, list, show and delete devices.", no_args_is_help=True)
shadow_app = typer.Typer(help="Read and update device shadows.", no_args_is_help=True)
artifacts_app = typer.Typer(help="Upload, list, show and delete artifacts.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
app.add_typer(shadow_app, name="shadow")
app.add_typer(artifacts_app, name="artifacts")
# Extension point: `rollouts_app` joins here when the rollout service exists.

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def fails_with_exit_1(command: F) -> F:
    """An `OtaError` ends the command with its message on stderr and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except OtaError as exc:
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(
    ctx: typer.Context,
    endpoints: Annotated[
        Path | None,
        typer.Option(
            "--endpoints",
            envvar="OTA_ENDPOINTS",
            help="The endpoints file (default: .devstack/endpoints.json when it exists).",
        ),
    ] = None,
) -> None:
    ctx.obj = endpoints


def _client(ctx: typer.Context) -> OtaClient:
    root = ctx.find_root()
    client = OtaClient(ClientSettings.load(root.obj))
    root.call_on_close(client.close)
    return client


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M") if ms else "-"


def _tags(pairs: Iterable[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="--tag")
        tags[key] = value
    return tags


def _json_object(text: str | None, option: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=option) from None
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint=option)
    return value


# ---- devices ---------------------------------------------------------------------------------


def _device_table(devices: Iterable[Device]) -> Table:
    table = Table(
        Column("device", no_wrap=True, min_width=12),
        Column("tags", overflow="fold"),
        Column("shadow version", overflow="fold"),
        Column("created (UTC)", overflow="fold"),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for device in devices:
        tags = ", ".join(f"{k}={v}" for k, v in sorted(device.tags.items()))
        table.add_row(
            device.device_id, tags, str(device.shadow_version), _when(device.created_at_ms)
        )
    return table


def write_private(path: Path, text: str) -> None:
    """Write a secret file: 0600 from the start, temp name then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@devices_app.command("register")
@fails_with_exit_1
def devices_register(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="1-128 of [A-Za-z0-9_.:-].")],
    tag: Annotated[list[str] | None, typer.Option(help="key=value, repeatable.")] = None,
    hardware: Annotated[
        str | None,
        typer.Option(help="Its hardware id (default: its 'hardware' tag, else 'generic')."),
    ] = None,
    agent_config: Annotated[
        Path | None,
        typer.Option(help="Where to write the agent config (default: ./<device-id>.agent.json)."),
    ] = None,
    data_dir: Annotated[
        str, typer.Option(help="The agent's data dir, relative to its config file.")
    ] = "data",
    force: Annotated[bool, typer.Option(help="Overwrite an existing agent config file.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Register a device; print its credentials and write its agent config file (0600)."""
    tags = _tags(tag or ())
    target = agent_config or Path(f"{device_id}.agent.json")
    if target.exists() and not force:
        err.print(f"error: {target} exists; pass --force to overwrite it", markup=False)
        raise typer.Exit(EXIT_ERROR)
    client = _client(ctx)
    # The key first: if the artifact service cannot answer, nothing is registered.
    key = client.artifacts.signing_key()
    registered = client.shadow.register_device(device_id, tags)
    settings = client.settings
    config = {
        "device_id": registered.device.device_id,
        "password": registered.credentials.password,
        "mqtt_host": settings.mqtt_host,
        "mqtt_port": settings.mqtt_port,
        "download_base_url": settings.download_base_url,
        "trusted_keys": {key.key_id: key.public_key},
        "hardware": hardware or tags.get("hardware", "generic"),
        "data_dir": data_dir,
    }
    text = json.dumps(config, indent=2) + "\n"
    try:
        write_private(target, text)
    except OSError as exc:
        err.print(
            f"error: registered {device_id}, but cannot write {target}: {exc}; "
            "the credentials follow, they are shown only once",
            markup=False,
        )
        _print_json(config)
        raise typer.Exit(EXIT_ERROR) from None
    if as_json:
        _print_json(
            {**registered.to_dict(), "agent_config_path": str(target), "agent_config": config}
        )
        return
    out.print(f"registered [bold]{device_id}[/bold]")
    out.print(f"  mqtt username  {registered.credentials.username}", markup=False)
    out.print(f"  mqtt password  {registered.credentials.password}", markup=False)
    out.print("  (the password is shown once; the service keeps only its hash)")
    out.print(f"agent config written to {target} (0600):", markup=False)
    sys.stdout.write(text)


@devices_app.command("list")
@fails_with_exit_1
def devices_list(
    ctx: typer.Context,
    tag: Annotated[list[str] | None, typer.Option(help="Only devices with key=value.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List devices (every page), optionally those with given tags."""
    devices = list(_client(ctx).shadow.iter_devices(_tags(tag or ())))
    if as_json:
        _print_json([d.to_dict() for d in devices])
    else:
        out.print(_device_table(devices))


@devices_app.command("show")
@fails_with_exit_1
def devices_show(ctx: typer.Context, device_id: str, as_json: JsonOption = False) -> None:
    """Show one device."""
    device = _client(ctx).shadow.get_device(device_id)
    if as_json:
        _print_json(device.to_dict())
    else:
        out.print(_device_table([device]))


@devices_app.command("delete")
@fails_with_exit_1
def devices_delete(ctx: typer.Context, device_id: str) -> None:
    """Delete a device, its credentials and its shadow."""
    _client(ctx).shadow.delete_device(device_id)
    out.print(f"deleted device {device_id}", markup=False)


# ---- shadow ----------------------------------------------------------------------------------


@shadow_app.command("get")
@fails_with_exit_1
def shadow_get(ctx: typer.Context, device_id: str, as_json: JsonOption = False) -> None:
    """Print a device's shadow document (state, metadata, version)."""
    shadow = _client(ctx).shadow.get_shadow(device_id)
    if as_json:
        _print_json(shadow.document)
        return
    state = shadow.document.get("state", {})
    out.print(f"[bold]{device_id}[/bold] shadow version {shadow.version}")
    for section in ("desired", "reported", "delta"):
        out.print(f"{section}:")
        out.print_json(data=state.get(section, {}))


@shadow_app.command("update")
@fails_with_exit_1
def shadow_update(
    ctx: typer.Context,
    device_id: str,
    desired: Annotated[
        str | None, typer.Option(help="JSON object merged into desired; null clears it.")
    ] = None,
    reported: Annotated[str | None, typer.Option(help="JSON object merged into reported.")] = None,
    version: Annotated[
        int | None, typer.Option(help="Apply only if the shadow is at this version.")
    ] = None,
    client_token: Annotated[str | None, typer.Option(help="Echoed in the answer.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Merge desired and/or reported state into a shadow (a null leaf deletes it)."""
    # `--desired null` clears the desired section, as `"desired": null` does in AWS IoT.
    clear = desired is not None and desired.strip() == "null"
    desired_doc = None if clear else _json_object(desired, "--desired")
    reported_doc = _json_object(reported, "--reported")
    if desired_doc is None and reported_doc is None and not clear:
        raise typer.BadParameter("give --desired and/or --reported")
    update = _client(ctx).shadow.update_shadow(
        device_id, desired_doc, reported_doc, version, client_token, clear_desired=clear
    )
    if as_json:
        _print_json(update.to_dict())
        return
    out.print(f"{device_id}: shadow version {update.version}; delta:", markup=False)
    out.print_json(data=update.delta)


# ---- artifacts -------------------------------------------------------------------------------


def _artifact_table(artifacts: Iterable[Artifact]) -> Table:
    # Ids are never cut: operators copy them into the next command.
    table = Table(
        Column("artifact id", no_wrap=True, min_width=32),
        # Narrow terminals fold the other cells rather than cut them.
        Column("name", overflow="fold"),
        Column("version", overflow="fold"),
        Column("hardware", overflow="fold"),
        Column("size", justify="right", overflow="fold"),
        Column("created (UTC)", overflow="fold"),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for a in artifacts:
        table.add_row(
            a.artifact_id,
            a.name,
            a.version,
            ", ".join(a.compatible_hardware),
            filesize.decimal(a.size),
            _when(a.created_at_ms),
        )
    return table


def _artifact_details(a: Artifact) -> None:
    for label, value in (
        ("artifact id", a.artifact_id),
        ("name", a.name),
        ("version", a.version),
        ("hardware", ", ".join(a.compatible_hardware)),
        ("size", f"{a.size:,} bytes"),
        ("sha256", a.sha256),
        ("key id", a.key_id),
        ("created", f"{_when(a.created_at_ms)} UTC"),
        ("download url", a.download_url),
    ):
        out.print(f"{label:<13} {value}", markup=False)


@artifacts_app.command("upload")
@fails_with_exit_1
def artifacts_upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    name: Annotated[str, typer.Option(help="Artifact name, e.g. 'app'.")],
    version: Annotated[str, typer.Option(help="Semantic version, e.g. 2.1.0.")],
    hardware: Annotated[list[str], typer.Option(help="Compatible hardware id, repeatable.")],
    as_json: JsonOption = False,
) -> None:
    """Upload a build: the service signs its manifest. Prints the artifact."""
    client = _client(ctx)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task(f"uploading {file.name}", total=None)

        def advance(sent: int, total: int) -> None:
            progress.update(task, completed=sent, total=total)

        artifact = client.artifacts.upload(file, name, version, list(hardware), advance)
    if as_json:
        _print_json(artifact.to_dict())
    else:
        out.print("uploaded and signed:")
        _artifact_details(artifact)


@artifacts_app.command("list")
@fails_with_exit_1
def artifacts_list(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Only artifacts of this name.")] = "",
    as_json: JsonOption = False,
) -> None:
    """List artifacts, newest first (every page)."""
    artifacts = list(_client(ctx).artifacts.iter(name))
    if as_json:
        _print_json([a.to_dict() for a in artifacts])
    else:
        out.print(_artifact_table(artifacts))


@artifacts_app.command("show")
@fails_with_exit_1
def artifacts_show(ctx: typer.Context, artifact_id: str, as_json: JsonOption = False) -> None:
    """Show one artifact with its signed manifest."""
    artifact = _client(ctx).artifacts.get(artifact_id)
    if as_json:
        _print_json(artifact.to_dict())
        return
    _artifact_details(artifact)
    out.print("manifest:")
    out.print_json(artifact.manifest_json)


@artifacts_app.command("delete")
@fails_with_exit_1
def artifacts_delete(ctx: typer.Context, artifact_id: str) -> None:
    """Delete an artifact (refused while a rollout uses it)."""
    _client(ctx).artifacts.delete(artifact_id)
    out.print(f"deleted artifact {artifact_id}", markup=False)


if __name__ == "__main__":
    app()
