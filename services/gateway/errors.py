"""The gateway's own errors (the MQTT library's errors stay aiomqtt's)."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of the gateway's errors."""


class BrokerConnectionError(GatewayError):
    """The outbox publisher's broker connection failed, was refused, lost or timed out; what
    it had not acknowledged is still in the outbox and is published again after reconnecting."""
