"""MQTT 3.1.1 packet bytes for the project's minimal asyncio clients (the gateway's outbox
publisher, the fan-out bench's simulated devices): encoding the few packets they send and
framing the packets they receive.

Pure functions over bytes, no I/O. It owns no session, no retries and no meaning of a reply
(what a CONNACK code or a SUBACK failure means is the caller's business); general MQTT goes
through aiomqtt.
"""

from __future__ import annotations

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer: 7 bits a byte, least significant first."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8_string(text: str) -> bytes:
    """A string as MQTT sends it: its UTF-8 bytes after their length (2 bytes)."""
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def connect_packet(
    client_id: str, username: str | None, password: str | None, keepalive: int
) -> bytes:
    """CONNECT, protocol level 4 (3.1.1), clean session; the password only with a user name."""
    flags = 0x02  # clean session
    payload = utf8_string(client_id)
    if username is not None:
        flags |= 0x80
        payload += utf8_string(username)
        if password is not None:
            flags |= 0x40
            payload += utf8_string(password)
    body = utf8_string("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return b"\x10" + remaining_length(len(body)) + body


def publish_packet(topic: str, payload: str | bytes, packet_id: int) -> bytes:
    """PUBLISH at QoS 1, not retained, not a duplicate."""
    topic_bytes = topic.encode()
    data = payload.encode() if isinstance(payload, str) else payload
    return (
        b"\x32"
        + remaining_length(len(topic_bytes) + len(data) + 4)
        + len(topic_bytes).to_bytes(2, "big")
        + topic_bytes
        + packet_id.to_bytes(2, "big")
        + data
    )


def subscribe_packet(packet_id: int, topic: str) -> bytes:
    """SUBSCRIBE to one topic filter at QoS 1."""
    body = packet_id.to_bytes(2, "big") + utf8_string(topic) + b"\x01"
    return b"\x82" + remaining_length(len(body)) + body


def next_packet(buffer: bytes, start: int) -> tuple[int, int] | None:
    """Where the body of the packet whose fixed header begins at `start` begins and ends in
    `buffer`, or None while the packet is not all there yet. Its type and flags are
    `buffer[start]`."""
    end = len(buffer)
    length, shift, pos = 0, 0, start + 1
    while True:  # the remaining length: 1-4 bytes
        if pos >= end:
            return None
        byte = buffer[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            break
        shift += 7
    if end - pos < length:
        return None
    return pos, pos + length
