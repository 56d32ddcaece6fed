"""Hand-built MQTT packets over a plain socket, for what a well-behaved client library will not
send (bad input) or will not let a test observe (packet ids, DUP, unacknowledged messages).

Only what the tests need; written from the MQTT 3.1.1 and 5.0 specifications.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

# packet types
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)
NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
         7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
         12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH", 0: "RESERVED"}

# v5 property identifiers and their wire types
P_PAYLOAD_FORMAT = 0x01
P_MESSAGE_EXPIRY = 0x02
P_CONTENT_TYPE = 0x03
P_RESPONSE_TOPIC = 0x08
P_CORRELATION_DATA = 0x09
P_SUBSCRIPTION_ID = 0x0B
P_SESSION_EXPIRY = 0x11
P_ASSIGNED_CLIENT_ID = 0x12
P_SERVER_KEEP_ALIVE = 0x13
P_REQUEST_PROBLEM_INFO = 0x17
P_WILL_DELAY = 0x18
P_REQUEST_RESPONSE_INFO = 0x19
P_RESPONSE_INFO = 0x1A
P_SERVER_REFERENCE = 0x1C
P_REASON_STRING = 0x1F
P_RECEIVE_MAXIMUM = 0x21
P_TOPIC_ALIAS_MAXIMUM = 0x22
P_TOPIC_ALIAS = 0x23
P_MAXIMUM_QOS = 0x24
P_RETAIN_AVAILABLE = 0x25
P_USER_PROPERTY = 0x26
P_MAXIMUM_PACKET_SIZE = 0x27
P_WILDCARD_AVAILABLE = 0x28
P_SUB_ID_AVAILABLE = 0x29
P_SHARED_AVAILABLE = 0x2A

_BYTE, _U16, _U32, _VARINT, _BIN, _STR, _PAIR = range(7)
_PROP_TYPES = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT, 0x11: _U32,
    0x12: _STR, 0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE, 0x18: _U32, 0x19: _BYTE,
    0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _U16, 0x22: _U16, 0x23: _U16, 0x24: _BYTE,
    0x25: _BYTE, 0x26: _PAIR, 0x27: _U32, 0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}


# --- encoding ---------------------------------------------------------------------------------------

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack(">H", len(raw)) + raw


def binary(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def properties(*items: tuple[int, object]) -> bytes:
    """properties((P_SESSION_EXPIRY, 60), (P_USER_PROPERTY, ("k", "v")))"""
    body = bytearray()
    for ident, value in items:
        kind = _PROP_TYPES[ident]
        body += varint(ident)
        if kind == _BYTE:
            body.append(value)
        elif kind == _U16:
            body += struct.pack(">H", value)
        elif kind == _U32:
            body += struct.pack(">I", value)
        elif kind == _VARINT:
            body += varint(value)
        elif kind == _BIN:
            body += binary(value)
        elif kind == _STR:
            body += string(value)
        else:
            body += string(value[0]) + string(value[1])
    return varint(len(body)) + bytes(body)


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + varint(len(body)) + body


@dataclass
class Will:
    topic: str | bytes
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    props: bytes = b"\x00"  # v5 only


def connect(version: int = 4, client_id: str | bytes = "raw", clean: bool = True,
            keepalive: int = 60, will: Will | None = None, props: bytes = b"\x00",
            username: str | None = None, password: bytes | None = None,
            protocol_name: bytes | None = None, protocol_level: int | None = None,
            flags: int | None = None) -> bytes:
    name = protocol_name if protocol_name is not None else (b"MQIsdp" if version == 3 else b"MQTT")
    level = protocol_level if protocol_level is not None else version
    f = 0x02 if clean else 0
    if will is not None:
        f |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if username is not None:
        f |= 0x80
    if password is not None:
        f |= 0x40
    if flags is not None:
        f = flags
    body = binary(name) + bytes([level, f]) + struct.pack(">H", keepalive)
    if version == 5:
        body += props
    body += string(client_id)
    if will is not None:
        if version == 5:
            body += will.props
        body += string(will.topic) + binary(will.payload)
    if username is not None:
        body += string(username)
    if password is not None:
        body += binary(password)
    return packet(0x10, body)


def publish(topic: str | bytes, payload: bytes = b"", qos: int = 0, retain: bool = False,
            dup: bool = False, pid: int | None = None, version: int = 4,
            props: bytes = b"\x00") -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = string(topic)
    if qos > 0:
        body += struct.pack(">H", 1 if pid is None else pid)
    if version == 5:
        body += props
    return packet(first, body + payload)


def subscribe(pid: int, filters: list[tuple[str | bytes, int]], version: int = 4,
              props: bytes = b"\x00", first: int = 0x82) -> bytes:
    body = struct.pack(">H", pid)
    if version == 5:
        body += props
    for topic, options in filters:
        body += string(topic) + bytes([options])
    return packet(first, body)


def ack(kind: int, pid: int, version: int = 4, reason: int | None = None) -> bytes:
    """PUBACK/PUBREC/PUBREL/PUBCOMP."""
    first = (kind << 4) | (0x02 if kind == PUBREL else 0)
    body = struct.pack(">H", pid)
    if version == 5 and reason not in (None, 0):
        body += bytes([reason])
    return packet(first, body)


PINGREQ_BYTES = b"\xc0\x00"


def disconnect(version: int = 4, reason: int = 0, props: bytes | None = None) -> bytes:
    if version == 5 and (reason or props):
        return packet(0xE0, bytes([reason]) + (props or b"\x00"))
    return b"\xe0\x00"


# --- decoding --------------------------------------------------------------------------------------

@dataclass
class Packet:
    type: int
    flags: int
    body: bytes

    @property
    def name(self) -> str:
        return NAMES.get(self.type, str(self.type))

    def __repr__(self) -> str:
        return f"<{self.name} flags={self.flags:#x} body={self.body[:40].hex()}>"


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def parse_properties(buf: bytes, pos: int) -> tuple[dict[int, list], int]:
    """-> ({id: [values...]}, position after the properties)"""
    length, pos = read_varint(buf, pos)
    end = pos + length
    out: dict[int, list] = {}
    while pos < end:
        ident, pos = read_varint(buf, pos)
        kind = _PROP_TYPES[ident]
        if kind == _BYTE:
            value, pos = buf[pos], pos + 1
        elif kind == _U16:
            value, pos = struct.unpack_from(">H", buf, pos)[0], pos + 2
        elif kind == _U32:
            value, pos = struct.unpack_from(">I", buf, pos)[0], pos + 4
        elif kind == _VARINT:
            value, pos = read_varint(buf, pos)
        elif kind in (_BIN, _STR):
            n = struct.unpack_from(">H", buf, pos)[0]
            value = buf[pos + 2:pos + 2 + n]
            value = value.decode("utf-8") if kind == _STR else value
            pos += 2 + n
        else:
            n = struct.unpack_from(">H", buf, pos)[0]
            k = buf[pos + 2:pos + 2 + n].decode("utf-8")
            pos += 2 + n
            m = struct.unpack_from(">H", buf, pos)[0]
            v = buf[pos + 2:pos + 2 + m].decode("utf-8")
            pos += 2 + m
            value = (k, v)
        out.setdefault(ident, []).append(value)
    return out, end


@dataclass
class ConnackInfo:
    session_present: bool
    code: int
    props: dict[int, list] = field(default_factory=dict)


def parse_connack(p: Packet, version: int) -> ConnackInfo:
    assert p.type == CONNACK, f"expected CONNACK, got {p!r}"
    info = ConnackInfo(bool(p.body[0] & 1), p.body[1])
    if version == 5 and len(p.body) > 2:
        info.props, _ = parse_properties(p.body, 2)
    return info


def parse_disconnect(p: Packet) -> tuple[int, dict[int, list]]:
    assert p.type == DISCONNECT, f"expected DISCONNECT, got {p!r}"
    if not p.body:
        return 0, {}
    code = p.body[0]
    props = parse_properties(p.body, 1)[0] if len(p.body) > 1 else {}
    return code, props


@dataclass
class PublishInfo:
    topic: bytes
    payload: bytes
    qos: int
    dup: bool
    retain: bool
    pid: int | None
    props: dict[int, list]


def parse_publish(p: Packet, version: int) -> PublishInfo:
    assert p.type == PUBLISH, f"expected PUBLISH, got {p!r}"
    qos = (p.flags >> 1) & 3
    n = struct.unpack_from(">H", p.body, 0)[0]
    topic = p.body[2:2 + n]
    pos = 2 + n
    pid = None
    if qos:
        pid = struct.unpack_from(">H", p.body, pos)[0]
        pos += 2
    props: dict[int, list] = {}
    if version == 5:
        props, pos = parse_properties(p.body, pos)
    return PublishInfo(topic, p.body[pos:], qos, bool(p.flags & 8), bool(p.flags & 1), pid, props)


def parse_suback(p: Packet, version: int) -> tuple[int, list[int], dict[int, list]]:
    assert p.type in (SUBACK, UNSUBACK), f"expected SUBACK, got {p!r}"
    pid = struct.unpack_from(">H", p.body, 0)[0]
    pos = 2
    props: dict[int, list] = {}
    if version == 5:
        props, pos = parse_properties(p.body, pos)
    return pid, list(p.body[pos:]), props


# --- the socket ----------------------------------------------------------------------------------

class Closed(Exception):
    """The broker closed the connection."""


class RawClient:
    def __init__(self, addr: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        """Send; a broker that already closed the connection is not an error here (the test
        then observes the close)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no packet before the deadline")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no packet before the deadline") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            raise Closed()
        self.buf += chunk

    def recv(self, timeout: float = 10.0) -> Packet:
        """The next packet. Raises Closed on EOF/reset and TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 2:
                try:
                    length, pos = read_varint(self.buf, 1)
                except IndexError:
                    length, pos = -1, 0
                if length >= 0 and len(self.buf) >= pos + length:
                    first = self.buf[0]
                    p = Packet(first >> 4, first & 0x0F, self.buf[pos:pos + length])
                    self.buf = self.buf[pos + length:]
                    return p
            self._fill(deadline)

    def recv_type(self, kind: int, timeout: float = 10.0) -> Packet:
        p = self.recv(timeout)
        assert p.type == kind, f"expected {NAMES[kind]}, got {p!r}"
        return p

    def until_closed(self, timeout: float = 10.0) -> list[Packet]:
        """Every packet the broker sends until it closes the connection; fails on timeout."""
        got: list[Packet] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                got.append(self.recv(max(0.0, deadline - time.monotonic())))
            except Closed:
                return got
            except TimeoutError:
                raise AssertionError(f"connection still open after {timeout}s; "
                                     f"received {got}") from None

    def connect(self, version: int = 4, **kwargs) -> ConnackInfo:
        self.send(connect(version, **kwargs))
        return parse_connack(self.recv(), version)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
