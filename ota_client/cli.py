"""`otactl`: the operator CLI over `ota_client` (typer + rich).

    otactl devices register dev-1 --tag site=berlin --hardware rpi4 --agent-config dev-1.json
    otactl devices list --json
    otactl shadow update dev-1 --desired '{"firmware": {"version": "2.0.0"}}' --version 3
    otactl artifacts upload build.img --name app --version 2.0.0 --hardware rpi4
    otactl rollouts create --id r1 --artifact ART --tag ring=beta --stage 10% --stage 100%
    otactl rollouts watch r1

Settings come from `--endpoints PATH` / `.devstack/endpoints.json` and the environment
(`ota_client.settings`). Every read command takes `--json` (one JSON document on stdout).

Exit codes: 0 success; 1 the command failed (the service refused or could not be reached, a
bad endpoints file, a file not written), with `error: <kind>: <message>` on stderr; 2 wrong
usage (unknown command or option, a missing argument, a value that does not parse, a bad
rollout file); `rollouts watch` exits 3 when the rollout ended ABORTED.
"""

from __future__ import annotations

import dataclasses
import enum
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
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table
from rich.text import Text

from ota_client import rollout_spec
from ota_client.client import OtaClient
from ota_client.errors import OtaError, SpecError
from ota_client.models import EXECUTION_STATUSES, ROLLOUT_STATUSES, Artifact, Device, Rollout
from ota_client.settings import ClientSettings

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 3

app = typer.Typer(
    name="otactl",
    help="Operate an OTA fleet: devices, shadows, artifacts and rollouts.",
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
rollouts_app = typer.Typer(
    help="Staged rollouts: create, start, pause, resume, approve, abort, list, show, watch.",
    no_args_is_help=True,
)
app.add_typer(rollouts_app, name="rollouts")

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
        ("rollback floor", a.rollback_floor or "none declared"),
    ):
        out.print(f"{label:<14} {value}", markup=False)


@artifacts_app.command("upload")
@fails_with_exit_1
def artifacts_upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    name: Annotated[str, typer.Option(help="Artifact name, e.g. 'app'.")],
    version: Annotated[str, typer.Option(help="Semantic version, e.g. 2.1.0.")],
    hardware: Annotated[list[str], typer.Option(help="Compatible hardware id, repeatable.")],
    rollback_floor: Annotated[
        str | None,
        typer.Option(
            metavar="VERSION",
            help="Anti-rollback floor this build declares: devices that commit it refuse "
            "older versions from then on (and cannot be rolled back below it).",
        ),
    ] = None,
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

        artifact = client.artifacts.upload(
            file, name, version, list(hardware), advance, rollback_floor=rollback_floor
        )
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


# ---- rollouts --------------------------------------------------------------------------------

RolloutStatusChoice = enum.Enum(  # type: ignore[misc]
    "RolloutStatusChoice", {status: status for status in ROLLOUT_STATUSES}, type=str
)
STATUS_COLUMNS = {
    "QUEUED": "queued",
    "IN_PROGRESS": "in progress",
    "SUCCEEDED": "succeeded",
    "FAILED": "failed",
    "TIMED_OUT": "timed out",
    "REJECTED": "rejected",
    "CANCELED": "canceled",
    "ROLLED_BACK": "rolled back",
}
ReasonOption = Annotated[str, typer.Option(help="Why (shown in the rollout's reason).")]


def _print_rollout(rollout: Rollout, as_json: bool) -> None:
    if as_json:
        _print_json(rollout.to_dict())
    else:
        out.print(_rollout_summary(rollout))


def _rollout_summary(rollout: Rollout) -> Text:
    p = rollout.progress
    text = Text()
    text.append(rollout.spec.rollout_id, style="bold")
    text.append(f"  {rollout.status}", style=_status_style(rollout.status))
    # Stage indexes count from 0, as `approve ID STAGE` takes them.
    text.append(f"  stage {rollout.stage_index} (stages 0-{len(rollout.spec.stages) - 1})")
    text.append(f"  targets {p.targets}, in this stage {p.stage_size}, not started {p.not_started}")
    if p.rollbacks_pending:
        text.append(f", rollbacks pending {p.rollbacks_pending}")
    if rollout.reason:
        text.append(f"\nreason: {rollout.reason}")
    return text


def _status_style(status: str) -> str:
    return {"COMPLETED": "green", "ABORTED": "red", "PAUSED": "yellow"}.get(status, "")


def _stages_table(rollout: Rollout) -> Table:
    table = Table(
        Column("stage", justify="right", no_wrap=True),
        Column("size", justify="right"),
        *(Column(STATUS_COLUMNS[s], justify="right") for s in EXECUTION_STATUSES),
        Column("failure rate", justify="right"),
        Column("gates", overflow="fold", min_width=20),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    progress = {s.stage_index: s for s in rollout.progress.stages}
    for index, stage in enumerate(rollout.spec.stages):
        counts = progress[index].by_status if index in progress else {}
        rate = progress[index].failure_rate if index in progress else None
        gate = []
        if stage.approval_required:
            gate.append("approval")
        if stage.soak_seconds:
            gate.append(f"soak {stage.soak_seconds:g}s")
        if stage.failure_threshold is not None:
            t = stage.failure_threshold
            limit = f"{t.percent:g}%" if t.percent is not None else str(t.count)
            gate.append(f"abort at {limit} failed (min {t.min_finished})")
        marker = "> " if index == rollout.stage_index and rollout.status != "COMPLETED" else ""
        table.add_row(
            f"{marker}{index}",
            stage.size,
            *(str(counts.get(s, 0)) for s in EXECUTION_STATUSES),
            "-" if rate is None else f"{rate:.0%}",
            ", ".join(gate),
        )
    return table


def _rollout_view(rollout: Rollout) -> Group:
    return Group(_rollout_summary(rollout), _stages_table(rollout))


@rollouts_app.command("create")
@fails_with_exit_1
def rollouts_create(
    ctx: typer.Context,
    rollout_id: Annotated[str | None, typer.Option("--id", help="The rollout's id.")] = None,
    artifact: Annotated[
        str | None,
        typer.Option(help="The artifact id; its version and download url are the firmware."),
    ] = None,
    devices: Annotated[str | None, typer.Option(help="Target these devices: a,b,c.")] = None,
    tag: Annotated[
        list[str] | None, typer.Option(help="Target devices with key=value (repeatable; all).")
    ] = None,
    fleet_filter: Annotated[
        str | None, typer.Option("--filter", help="Target a fleet query, e.g. 'tags.ring == 1'.")
    ] = None,
    stage: Annotated[
        list[str] | None,
        typer.Option(help="A cumulative stage size, N% or a count (repeatable; the last 100%)."),
    ] = None,
    failure_threshold: Annotated[
        str | None, typer.Option(help="Abort a stage when N% (or N devices) of its settled fail.")
    ] = None,
    min_finished: Annotated[
        int | None, typer.Option(help="Settled devices a stage needs before its threshold.")
    ] = None,
    success_threshold: Annotated[
        str | None, typer.Option(help="Succeeded % a stage needs to pass (default 100%).")
    ] = None,
    soak: Annotated[
        float | None, typer.Option(help="Seconds to wait after a stage before the next.")
    ] = None,
    approval: Annotated[
        bool,
        typer.Option(
            "--approval", help="Every stage after the first waits for `approve ID STAGE`."
        ),
    ] = False,
    max_per_minute: Annotated[int | None, typer.Option(help="Notifications per minute.")] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds per attempt before TIMED_OUT (default 3600).")
    ] = None,
    retries_failed: Annotated[int | None, typer.Option(help="Retries of a FAILED device.")] = None,
    retries_timed_out: Annotated[
        int | None, typer.Option(help="Retries of a TIMED_OUT device.")
    ] = None,
    rollback_on_abort: Annotated[
        bool,
        typer.Option("--rollback-on-abort", help="On abort, send updated devices back."),
    ] = False,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", dir_okay=False, help="A YAML rollout definition instead of these flags."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Define a rollout (CREATED) from flags or a YAML file; `start` sends it out."""
    flags = {
        "rollout_id": rollout_id,
        "artifact": artifact,
        "devices": devices,
        "tags": tag or [],
        "fleet_filter": fleet_filter,
        "stages": stage or [],
        "failure_threshold": failure_threshold,
        "min_finished": min_finished,
        "success_threshold": success_threshold,
        "soak": soak,
        "approval": approval,
        "max_per_minute": max_per_minute,
        "timeout": timeout,
        "retries_failed": retries_failed,
        "retries_timed_out": retries_timed_out,
        "rollback_on_abort": rollback_on_abort,
    }
    try:
        if file is not None:
            mixed = [k for k, v in flags.items() if v not in (None, [], False)]
            if mixed:
                raise SpecError("--file takes no other rollout flags; put them in the file")
            try:
                text = file.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise SpecError(f"cannot read {file}: {exc}") from None
            spec = rollout_spec.from_mapping(rollout_spec.load_yaml(text, str(file)))
        else:
            spec = rollout_spec.from_flags(**flags)  # type: ignore[arg-type]
    except SpecError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(EXIT_USAGE) from None
    client = _client(ctx)
    found = client.artifacts.get(spec.artifact_id)
    spec = dataclasses.replace(
        spec, firmware_version=found.version, firmware_url=found.download_url
    )
    rollout = client.rollouts.create(spec)
    if as_json:
        _print_json(rollout.to_dict())
        return
    out.print(f"created rollout {spec.rollout_id} of {found.name} {found.version}", markup=False)
    out.print(_rollout_view(rollout))


def _command(
    ctx: typer.Context, call: Callable[[OtaClient], Rollout], as_json: bool, done: str
) -> None:
    rollout = call(_client(ctx))
    if as_json:
        _print_json(rollout.to_dict())
    else:
        out.print(f"{done} rollout {rollout.spec.rollout_id}: {rollout.status}", markup=False)


@rollouts_app.command("start")
@fails_with_exit_1
def rollouts_start(ctx: typer.Context, rollout_id: str, as_json: JsonOption = False) -> None:
    """Start a CREATED rollout: its targets are claimed; the service's passes notify them."""
    _command(ctx, lambda c: c.rollouts.start(rollout_id), as_json, "started")


@rollouts_app.command("pause")
@fails_with_exit_1
def rollouts_pause(
    ctx: typer.Context, rollout_id: str, reason: ReasonOption = "", as_json: JsonOption = False
) -> None:
    """Pause a rollout: nobody new is notified; devices already updating carry on."""
    _command(ctx, lambda c: c.rollouts.pause(rollout_id, reason), as_json, "paused")


@rollouts_app.command("resume")
@fails_with_exit_1
def rollouts_resume(ctx: typer.Context, rollout_id: str, as_json: JsonOption = False) -> None:
    """Resume a paused rollout (one paused on a missed success threshold passes that stage)."""
    _command(ctx, lambda c: c.rollouts.resume(rollout_id), as_json, "resumed")


@rollouts_app.command("approve")
@fails_with_exit_1
def rollouts_approve(
    ctx: typer.Context,
    rollout_id: str,
    stage: Annotated[int, typer.Argument(help="The stage index (0 is the first).", min=0)],
    as_json: JsonOption = False,
) -> None:
    """Approve a stage that waits for approval."""
    _command(ctx, lambda c: c.rollouts.approve(rollout_id, stage), as_json, "approved a stage of")


@rollouts_app.command("abort")
@fails_with_exit_1
def rollouts_abort(
    ctx: typer.Context, rollout_id: str, reason: ReasonOption = "", as_json: JsonOption = False
) -> None:
    """Abort: cancel what has not started and, with rollback_on_abort, roll back what has."""
    _command(ctx, lambda c: c.rollouts.abort(rollout_id, reason), as_json, "aborted")


@rollouts_app.command("list")
@fails_with_exit_1
def rollouts_list(
    ctx: typer.Context,
    status: Annotated[
        RolloutStatusChoice | None, typer.Option(help="Only rollouts with this status.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List rollouts by id (every page)."""
    rollouts = list(_client(ctx).rollouts.iter(status.value if status else None))
    if as_json:
        _print_json([r.to_dict() for r in rollouts])
        return
    table = Table(
        Column("rollout", no_wrap=True, min_width=12),
        Column("status", no_wrap=True),
        Column("stage", justify="right"),
        Column("firmware", overflow="fold"),
        Column("targets", justify="right"),
        Column("succeeded", justify="right"),
        Column("failed", justify="right"),
        Column("in flight", justify="right"),
        Column("created (UTC)", overflow="fold"),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for r in rollouts:
        counts = r.progress.by_status
        table.add_row(
            r.spec.rollout_id,
            Text(r.status, style=_status_style(r.status)),
            f"{r.stage_index} of 0-{len(r.spec.stages) - 1}",
            r.spec.firmware_version,
            str(r.progress.targets),
            str(counts.get("SUCCEEDED", 0)),
            str(sum(counts.get(s, 0) for s in ("FAILED", "TIMED_OUT", "REJECTED"))),
            str(counts.get("QUEUED", 0) + counts.get("IN_PROGRESS", 0)),
            _when(r.created_at_ms),
        )
    out.print(table)


@rollouts_app.command("show")
@fails_with_exit_1
def rollouts_show(ctx: typer.Context, rollout_id: str, as_json: JsonOption = False) -> None:
    """Show a rollout: per stage, its devices by status and the failure rate.

    The failure rate is failed, timed out or rejected among the stage's settled devices.
    """
    rollout = _client(ctx).rollouts.get(rollout_id)
    if as_json:
        _print_json(rollout.to_dict())
        return
    spec = rollout.spec
    selector = (
        f"devices {', '.join(spec.device_ids)}"
        if spec.device_ids
        else f"filter {spec.fleet_filter}"
        if spec.fleet_filter is not None
        else "tags " + ", ".join(f"{k}={v}" for k, v in sorted(spec.tags.items()))
    )
    out.print(_rollout_view(rollout))
    out.print(f"firmware {spec.firmware_version}  {spec.firmware_url}", markup=False)
    out.print(f"artifact {spec.artifact_id}; targets: {selector}", markup=False)


@rollouts_app.command("watch")
@fails_with_exit_1
def rollouts_watch(
    ctx: typer.Context,
    rollout_id: str,
    interval: Annotated[
        float | None,
        typer.Option(min=0.2, max=10.0, help="Seconds between the service's checks (0.5)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per update, one per line.")
    ] = False,
) -> None:
    """Follow a rollout live until it ends (exit 0 COMPLETED, 3 ABORTED).

    Shows each stage's devices by status, its failure rate and the rollout's status, updated
    as they change. Exit codes: 0 the rollout COMPLETED; 3 it ended ABORTED (rollbacks
    settled); 1 an error (unknown rollout, service unreachable, the stream broke); 2 usage.
    """
    updates = _client(ctx).rollouts.watch(rollout_id, interval)
    last: Rollout | None = None
    if as_json:
        for last in updates:
            sys.stdout.write(json.dumps(last.to_dict(), sort_keys=True) + "\n")
            sys.stdout.flush()
    else:
        with Live(console=out, auto_refresh=False, transient=False) as live:
            for last in updates:
                live.update(_rollout_view(last), refresh=True)
    if last is None or last.status not in ("COMPLETED", "ABORTED"):
        err.print("error: the watch ended before the rollout did", markup=False)
        raise typer.Exit(EXIT_ERROR)
    raise typer.Exit(EXIT_OK if last.status == "COMPLETED" else EXIT_ABORTED)


if __name__ == "__main__":
    app()
