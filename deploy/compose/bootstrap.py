"""One-shot set-up of the Compose deployment: the files derived from the secrets in `.env`.

Run by the `bootstrap` service before anything else starts (and safe to run on every
`docker compose up`):

- the gRPC token table (`OTA_AUTH_TOKENS_FILE`): sha256 digests of the tokens in API_TOKENS
  (`name:role:token,...`, role read | admin | service) plus `services:service:SERVICE_TOKEN`,
  rewritten every run, so adding or removing a token is an edit of `.env` and a restart;
- Mosquitto's configuration, rendered from deploy/mosquitto/mosquitto.conf for the
  eclipse-mosquitto image, rewritten every run;
- Mosquitto's dynamic-security file with the admin and the service accounts (`ota-admin`,
  `ota-gateway`, `ota-app`) as `$7$` hashes, written ONLY when it does not exist yet: once the
  broker runs, the file also holds every device account (the shadow service adds them live),
  so it is never overwritten. A service-account password changed later is changed in the broker
  with `mosquitto_ctrl dynsec setClientPassword` (docs/operations.md).

Inputs (environment): SERVICE_TOKEN, API_TOKENS, MQTT_ADMIN_PASSWORD, MQTT_GATEWAY_PASSWORD,
MQTT_APP_PASSWORD. None of them is an OTA_ setting: no service reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from services.broker.access import dynsec_config
from services.common.auth import RANK, Role, TokenTable
from services.shadow.credentials import hash_password

# The eclipse-mosquitto:2 image (Alpine) installs the plugin here.
PLUGIN = "/usr/lib/mosquitto_dynamic_security.so"
MOSQUITTO_DIR = "/mosquitto/data"  # where the broker container mounts the same volume


def _required(env: dict[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise SystemExit(f"bootstrap: {name} is not set (see deploy/compose/.env.example)")
    return value


def parse_tokens(spec: str, service_token: str) -> dict[str, tuple[str, Role]]:
    """`name:role:token,...` -> {token: (name, role)}, with the services' own token added."""
    tokens: dict[str, tuple[str, Role]] = {service_token: ("services", "service")}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, rest = item.partition(":")
        role, sep2, token = rest.partition(":")
        if not (sep and sep2 and name and token) or role not in RANK:
            raise SystemExit(f"bootstrap: API_TOKENS entry {name!r} is not name:role:token")
        tokens[token] = (name, role)  # type: ignore[assignment]  # checked against RANK
    return tokens


def parse_owner(value: str) -> tuple[int, int]:
    """`UID` or `UID:GID` -> (uid, gid); the gid defaults to the uid."""
    uid, _, gid = value.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"owner must be UID or UID:GID, got {value!r}") from None


def write_tokens(path: Path, env: dict[str, str], owner: tuple[int, int] | None) -> None:
    tokens = parse_tokens(env.get("API_TOKENS", ""), _required(env, "SERVICE_TOKEN"))
    path.parent.mkdir(parents=True, exist_ok=True)
    TokenTable.write(path, tokens)
    if owner is not None:
        os.chown(path, *owner)


def write_mosquitto(
    data_dir: Path,
    template: Path,
    env: dict[str, str],
    broker_dir: str = MOSQUITTO_DIR,
    plugin: str = PLUGIN,
) -> bool:
    """Render mosquitto.conf; write the dynamic-security file if missing. True if written.
    `broker_dir` is `data_dir` as the broker sees it (another mount point in a container)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "mosquitto.conf").write_text(
        template.read_text().format(
            user="mosquitto",
            host="0.0.0.0",
            port=1883,
            dynsec_plugin=plugin,
            dynsec_file=f"{broker_dir}/dynamic-security.json",
            persistence="true",
            data_dir=broker_dir,
        )
    )
    dynsec = data_dir / "dynamic-security.json"
    if dynsec.exists():
        return False
    services = {
        "ota-gateway": hash_password(_required(env, "MQTT_GATEWAY_PASSWORD")),
        "ota-app": hash_password(_required(env, "MQTT_APP_PASSWORD")),
    }
    admin = ("ota-admin", hash_password(_required(env, "MQTT_ADMIN_PASSWORD")))
    temp = dynsec.with_suffix(".tmp")
    temp.write_text(json.dumps(dynsec_config(admin, services), indent=1))
    temp.chmod(0o600)  # the broker's entrypoint hands /mosquitto to its own user
    temp.replace(dynsec)
    return True


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bootstrap.py")
    parser.add_argument("--tokens-file", type=Path, required=True)
    parser.add_argument("--tokens-owner", type=parse_owner, default=None, help="UID[:GID]")
    parser.add_argument("--mosquitto-dir", type=Path, required=True)
    parser.add_argument("--mosquitto-template", type=Path, required=True)
    parser.add_argument(
        "--mosquitto-broker-dir",
        default=None,
        help=f"--mosquitto-dir as the broker sees it (default {MOSQUITTO_DIR}, the image's)",
    )
    parser.add_argument("--mosquitto-plugin", default=PLUGIN, help="dynamic-security plugin")
    options = parser.parse_args(arguments)
    env = dict(os.environ)
    write_tokens(options.tokens_file, env, options.tokens_owner)
    created = write_mosquitto(
        options.mosquitto_dir,
        options.mosquitto_template,
        env,
        options.mosquitto_broker_dir or MOSQUITTO_DIR,
        options.mosquitto_plugin,
    )
    print(
        f"bootstrap: token table {options.tokens_file}; mosquitto config in "
        f"{options.mosquitto_dir} (dynamic-security file {'created' if created else 'kept'})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
