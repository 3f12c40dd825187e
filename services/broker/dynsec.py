"""Mosquitto's dynamic-security plugin, driven over MQTT: device accounts made and revoked live.

The shadow service calls `add_device` while it registers a device (the only moment the
password exists in clear) and `remove_device` while it deletes one; deleting the client makes
Mosquitto disconnect it. Commands and answers travel on `$CONTROL/dynamic-security/v1`.
"""

from __future__ import annotations

import itertools
import json
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from services.broker import access
from services.common.mqtt import MqttEndpoint


class BrokerAccountsError(Exception):
    """The broker could not be reached or refused an account change."""


# Errors that leave the wanted state in place (removing what is already gone).
_HARMLESS = ("not found",)


class DynsecAccounts:
    """A long-lived admin connection; one request at a time, each awaited with a timeout."""

    def __init__(self, endpoint: MqttEndpoint, client_id: str = "ota-dynsec", timeout: float = 5.0):
        self.endpoint = endpoint
        self.timeout = timeout
        self._lock = threading.Lock()
        self._answers: dict[str, Any] = {}
        self._answered = threading.Condition()
        self._ids = itertools.count()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if endpoint.username:
            self._client.username_pw_set(endpoint.username, endpoint.password)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._subscribed = threading.Event()
        self._client.connect_async(endpoint.host, endpoint.port, keepalive=30)
        self._client.loop_start()

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        self._subscribed.clear()
        client.subscribe(access.CONTROL_TOPIC + "/response", qos=1)

    def _on_subscribe(self, *_: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            return
        with self._answered:
            for response in responses:
                key = response.get("correlationData")
                if isinstance(key, str):
                    self._answers[key] = response
            self._answered.notify_all()

    def _run(self, commands: list[dict[str, Any]], tolerate: tuple[str, ...] = ()) -> None:
        with self._lock:
            if not self._subscribed.wait(self.timeout):
                raise BrokerAccountsError(
                    "the MQTT broker's dynamic-security plugin is unreachable"
                )
            keys = []
            for command in commands:
                key = f"ota-{next(self._ids)}"
                command["correlationData"] = key
                keys.append(key)
            info = self._client.publish(access.CONTROL_TOPIC, json.dumps({"commands": commands}), 1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise BrokerAccountsError(f"could not send to the broker (rc {info.rc})")
            with self._answered:
                if not self._answered.wait_for(
                    lambda: all(k in self._answers for k in keys), self.timeout
                ):
                    raise BrokerAccountsError("the broker did not answer an account change in time")
                answers = [self._answers.pop(k) for k in keys]
        for command, answer in zip(commands, answers, strict=True):
            error = answer.get("error")
            if error and not any(t in str(error).lower() for t in tolerate):
                raise BrokerAccountsError(f"broker refused {command['command']}: {error}")

    def add_device(self, device_id: str, password: str) -> None:
        # Clear any leftover of the same id first, so registration is repeatable.
        self._run(access.remove_device_commands(device_id), tolerate=_HARMLESS)
        self._run(access.add_device_commands(device_id, password))

    def remove_device(self, device_id: str) -> None:
        self._run(access.remove_device_commands(device_id), tolerate=_HARMLESS)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
