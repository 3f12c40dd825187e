"""Where an MQTT broker is and who we are there: parsed from `mqtt://user:password@host:port`."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from services.common.config import ConfigError


@dataclass(frozen=True)
class MqttEndpoint:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> MqttEndpoint:
        parts = urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ConfigError(f"an MQTT URL looks like mqtt://user:password@host:1883, got {url!r}")
        try:
            port = parts.port or 1883
        except ValueError:
            raise ConfigError(f"bad port in MQTT URL {url!r}") from None
        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def url(self) -> str:
        auth = ""
        if self.username:
            auth = quote(self.username, safe="")
            if self.password:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        return f"mqtt://{auth}{self.host}:{self.port}"
