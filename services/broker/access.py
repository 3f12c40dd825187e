"""Who may use which MQTT topics, and the Mosquitto dynamic-security documents that say so.

Pure: a device may publish, receive, subscribe and unsubscribe only under its own `<id>/`, and
connect only with its id as client id; service accounts (gateways, applications; names
starting with `ota-`, which no device may take) may use every topic. Mosquitto 2.0's dynamic
security has no `%u` substitution in ACLs, so each device gets a role of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from services.shadow.domain import DEVICE_ID_PATTERN

ACL_TYPES = ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")
ADMIN_ROLE = "dynsec-admin"
SERVICE_ROLE = "ota-service"
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"


def device_may_use(device_id: str, topic: str) -> bool:
    """A topic (or subscription filter) a device may use: under its own id, no wildcard there."""
    first, slash, _ = topic.partition("/")
    return bool(slash) and first == device_id and DEVICE_ID_PATTERN.fullmatch(device_id) is not None


def device_role(device_id: str) -> str:
    return f"device:{device_id}"


def _acls(topic: str) -> list[dict[str, Any]]:
    return [{"acltype": kind, "topic": topic, "allow": True, "priority": 0} for kind in ACL_TYPES]


def _client(
    username: str, password_hash: str, role: str, client_id: str | None = None
) -> dict[str, Any]:
    """A dynsec client from a `$7$` hash (the format `services.shadow.credentials` stores).
    With `client_id`, the broker accepts this user only under that client id."""
    _, kind, iterations, salt, digest = password_hash.split("$")
    if kind != "7":
        raise ValueError("dynamic security takes PBKDF2-SHA512 ($7$) hashes")
    client: dict[str, Any] = {
        "username": username,
        "roles": [{"rolename": role}],
        "password": digest,
        "salt": salt,
        "iterations": int(iterations),
    }
    if client_id is not None:
        client["clientid"] = client_id
    return client


def dynsec_config(
    admin: tuple[str, str],
    services: Mapping[str, str],
    devices: Iterable[tuple[str, str]] = (),
) -> dict[str, Any]:
    """The plugin's whole configuration file: an admin, service accounts, devices (by hash).

    It lets a broker be rebuilt from the shadow database without knowing any password.
    """
    admin_name, admin_hash = admin
    device_list = list(devices)
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": False,
        },
        "clients": [
            _client(admin_name, admin_hash, ADMIN_ROLE),
            *(_client(name, pw_hash, SERVICE_ROLE) for name, pw_hash in services.items()),
            *(
                _client(device_id, pw_hash, device_role(device_id))
                for device_id, pw_hash in device_list
            ),
        ],
        "groups": [],
        "roles": [
            {"rolename": ADMIN_ROLE, "acls": _acls("$CONTROL/dynamic-security/#")},
            {"rolename": SERVICE_ROLE, "acls": _acls("#")},
            *({"rolename": device_role(d), "acls": _acls(f"{d}/#")} for d, _ in device_list),
        ],
    }


def add_device_commands(device_id: str, password: str) -> list[dict[str, Any]]:
    return [
        {
            "command": "createRole",
            "rolename": device_role(device_id),
            "acls": _acls(f"{device_id}/#"),
        },
        {
            "command": "createClient",
            "username": device_id,
            "password": password,
            # A device connects as itself only, so it cannot take over anyone's session.
            "clientid": device_id,
            "roles": [{"rolename": device_role(device_id)}],
        },
    ]


def remove_device_commands(device_id: str) -> list[dict[str, Any]]:
    """Deleting the client also disconnects it: revocation takes effect at once."""
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": device_role(device_id)},
    ]
