"""A thin, blocking test wrapper around paho-mqtt 2.x (callback API version 2).

paho's network loop runs in its own thread; every callback pushes what it saw into a queue or
an event, and the test side waits on those with a deadline. Nothing sleeps.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from harness import Broker

TIMEOUT = 10.0
_ids = itertools.count(1)

PROTOCOLS = {3: mqtt.MQTTv31, 4: mqtt.MQTTv311, 5: mqtt.MQTTv5}


def unique_id(prefix: str = "c") -> str:
    return f"{prefix}-{next(_ids)}"


def props(packet_type: int, **values: Any) -> Properties:
    """props(PacketTypes.PUBLISH, ContentType="text/plain", UserProperty=[("a", "1")])"""
    p = Properties(packet_type)
    for name, value in values.items():
        setattr(p, name, value)
    return p


def prop(properties: Properties | None, name: str, default: Any = None) -> Any:
    """A property of a received packet, or `default` when the packet did not carry it."""
    if properties is None:
        return default
    return getattr(properties, name, default)


@dataclass
class Connack:
    session_present: bool
    reason_code: int
    properties: Properties | None


@dataclass
class Disconnect:
    reason_code: int
    properties: Properties | None
    from_broker: bool


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int
    properties: Properties | None
    raw_topic: bytes = field(repr=False, default=b"")

    def prop(self, name: str, default: Any = None) -> Any:
        return prop(self.properties, name, default)


class Client:
    """One MQTT client connection driven by paho.

    Outbound topic aliases sent by the broker are resolved here (paho leaves the topic empty),
    and every alias seen is recorded in `aliases_seen` so tests can check the broker's use.
    """

    def __init__(self, broker: Broker, version: int = 5, client_id: str | None = None,
                 clean: bool = True, manual_ack: bool = False, transport: str = "tcp") -> None:
        self.broker = broker
        self.version = version
        self.client_id = unique_id() if client_id is None else client_id
        kwargs: dict[str, Any] = {}
        if version != 5:
            kwargs["clean_session"] = clean
        self.clean = clean
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                protocol=PROTOCOLS[version], reconnect_on_failure=False,
                                manual_ack=manual_ack, transport=transport, **kwargs)
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connacks: queue.Queue[Connack] = queue.Queue()
        self.disconnects: queue.Queue[Disconnect] = queue.Queue()
        self._subacks: dict[int, tuple[list[int], Properties | None]] = {}
        self._unsubacks: dict[int, tuple[list[int], Properties | None]] = {}
        self._pubacks: dict[int, tuple[int, Properties | None]] = {}
        self._cond = threading.Condition()
        self._aliases: dict[int, str] = {}
        self.aliases_seen: list[int] = []
        self.disconnected = threading.Event()
        p = self.paho
        p.on_connect = self._on_connect
        p.on_disconnect = self._on_disconnect
        p.on_message = self._on_message
        p.on_subscribe = self._on_subscribe
        p.on_unsubscribe = self._on_unsubscribe
        p.on_publish = self._on_publish

    # --- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connacks.put(Connack(bool(flags.session_present), reason_code.value, properties))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnects.put(Disconnect(reason_code.value, properties,
                                        bool(getattr(flags, "is_disconnect_packet_from_server", False))))
        self.disconnected.set()

    def _on_message(self, client, userdata, msg):
        topic = msg.topic
        alias = prop(msg.properties, "TopicAlias")
        if alias is not None:
            self.aliases_seen.append(alias)
            if topic:
                self._aliases[alias] = topic
            else:
                topic = self._aliases.get(alias, f"<unknown alias {alias}>")
        self.messages.put(Received(topic, bytes(msg.payload), msg.qos, bool(msg.retain),
                                   bool(msg.dup), msg.mid, msg.properties, bytes(msg._topic)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._subacks[mid] = ([rc.value for rc in reason_codes], properties)
            self._cond.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            codes = [rc.value for rc in reason_codes] if isinstance(reason_codes, list) else []
            self._unsubacks[mid] = (codes, properties)
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cond:
            self._pubacks[mid] = (reason_code.value, properties)
            self._cond.notify_all()

    def _wait_for(self, table: dict, mid: int, what: str, timeout: float):
        with self._cond:
            if not self._cond.wait_for(lambda: mid in table, timeout):
                raise AssertionError(f"{self.client_id}: no {what} for mid {mid} within {timeout}s")
            return table.pop(mid)

    # --- connection ------------------------------------------------------------------------------

    def will(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
             properties: Properties | None = None) -> "Client":
        self.paho.will_set(topic, payload, qos, retain, properties)
        return self

    def connect(self, keepalive: int = 60, properties: Properties | None = None,
                clean_start: bool | None = None, session_expiry: int | None = None,
                expect_rc: int | None = 0, timeout: float = TIMEOUT) -> Connack:
        """Connect and wait for CONNACK. For v5, `clean_start` defaults to `self.clean`, and
        `session_expiry` adds the Session Expiry Interval property."""
        kwargs: dict[str, Any] = {}
        if self.version == 5:
            if session_expiry is not None:
                properties = properties or Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = session_expiry
            kwargs["clean_start"] = self.clean if clean_start is None else clean_start
            kwargs["properties"] = properties
        self.disconnected.clear()
        self.paho.connect(self.broker.host, self.broker.port, keepalive, **kwargs)
        self.paho.loop_start()
        try:
            ack = self.connacks.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: no CONNACK within {timeout}s") from None
        if expect_rc is not None:
            assert ack.reason_code == expect_rc, \
                f"{self.client_id}: CONNACK reason {ack.reason_code:#x}, expected {expect_rc:#x}"
        return ack

    def disconnect(self, reason_code: int = 0, properties: Properties | None = None,
                   timeout: float = TIMEOUT) -> None:
        """A normal DISCONNECT (v5: with `reason_code`), then wait for the socket to close."""
        if self.version == 5:
            from paho.mqtt.reasoncodes import ReasonCode
            rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reason_code)
            self.paho.disconnect(rc, properties)
        else:
            self.paho.disconnect()
        if not self.disconnected.wait(timeout):
            raise AssertionError(f"{self.client_id}: disconnect did not complete in {timeout}s")
        self._stop_loop()

    def _stop_loop(self) -> None:
        """Stop paho's network thread now. loop_stop() alone lets the thread finish its current
        select() (up to a second); waking it through paho's internal socket pair is immediate."""
        p = self.paho
        if p._thread is None:
            return
        p._thread_terminate = True
        wake = p._sockpairW
        if wake is not None:
            try:
                wake.send(b"0")
            except OSError:
                pass
        p.loop_stop()

    def drop(self) -> None:
        """Lose the connection without DISCONNECT: stop paho's loop, then close the socket."""
        self._stop_loop()
        sock = self.paho.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Best-effort cleanup at the end of a test."""
        try:
            self.drop()
        except Exception:
            pass

    def wait_disconnect(self, timeout: float = TIMEOUT) -> Disconnect:
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: still connected after {timeout}s") from None

    # --- operations -------------------------------------------------------------------------------

    def subscribe(self, topic: str | list, qos: int = 0, options: SubscribeOptions | None = None,
                  properties: Properties | None = None, timeout: float = TIMEOUT) -> list[int]:
        """Subscribe and return the SUBACK reason codes (granted QoS for success)."""
        if self.version == 5 and options is None and isinstance(topic, str):
            options = SubscribeOptions(qos=qos)
        if isinstance(topic, list):
            rc, mid = self.paho.subscribe(topic, properties=properties)
        elif self.version == 5:
            rc, mid = self.paho.subscribe(topic, options=options, properties=properties)
        else:
            rc, mid = self.paho.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe not sent: {rc}"
        codes, self.last_suback_properties = self._wait_for(self._subacks, mid, "SUBACK", timeout)
        return codes

    def unsubscribe(self, topic: str | list[str], properties: Properties | None = None,
                    timeout: float = TIMEOUT) -> list[int]:
        if self.version == 5:
            rc, mid = self.paho.unsubscribe(topic, properties=properties)
        else:
            rc, mid = self.paho.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"unsubscribe not sent: {rc}"
        codes, self.last_unsuback_properties = self._wait_for(self._unsubacks, mid, "UNSUBACK",
                                                              timeout)
        return codes

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
                properties: Properties | None = None, wait: bool = True,
                timeout: float = TIMEOUT) -> mqtt.MQTTMessageInfo:
        """Publish; with `wait`, block until the broker acknowledged it (PUBACK / PUBCOMP) or,
        for QoS 0, until paho has written it to the socket."""
        info = self.paho.publish(topic, payload, qos, retain, properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish not sent: {info.rc}"
        if wait:
            info.wait_for_publish(timeout)
            assert info.is_published(), f"{self.client_id}: publish to {topic} not completed"
        return info

    def puback_reason(self, info: mqtt.MQTTMessageInfo, timeout: float = TIMEOUT) -> int:
        """The v5 reason code of the PUBACK/PUBREC that completed `info`."""
        return self._wait_for(self._pubacks, info.mid, "PUBACK", timeout)[0]

    def expect(self, timeout: float = TIMEOUT, what: str = "a message") -> Received:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: no message within {timeout}s "
                                 f"(expected {what})") from None

    def expect_n(self, n: int, timeout: float = TIMEOUT) -> list[Received]:
        return [self.expect(timeout, f"message {i + 1} of {n}") for i in range(n)]

    def collect_until(self, marker_topic: str, timeout: float = TIMEOUT) -> list[Received]:
        """Every message received before the first one on `marker_topic` (which is dropped).

        Used to show that something did NOT arrive: the marker is published after the action,
        through a path that keeps order, so anything the action caused arrives before it."""
        got = []
        while True:
            msg = self.expect(timeout, f"the marker on {marker_topic}")
            if msg.topic == marker_topic:
                return got
            got.append(msg)

    def ack(self, mid: int, qos: int) -> None:
        self.paho.ack(mid, qos)


class Clients:
    """Creates clients for a test and closes every one at the end."""

    def __init__(self) -> None:
        self.all: list[Client] = []

    def new(self, broker: Broker, version: int = 5, **kwargs: Any) -> Client:
        c = Client(broker, version, **kwargs)
        self.all.append(c)
        return c

    def connected(self, broker: Broker, version: int = 5, **kwargs: Any) -> Client:
        connect_kwargs = {k: kwargs.pop(k) for k in ("keepalive", "properties", "session_expiry",
                                                     "clean_start") if k in kwargs}
        c = self.new(broker, version, **kwargs)
        c.connect(**connect_kwargs)
        return c

    def close_all(self) -> None:
        for c in self.all:
            c.close()
