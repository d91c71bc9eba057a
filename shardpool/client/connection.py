"""What both client drivers share: CURVE keys, the DEALER socket, the constructor."""

from __future__ import annotations

import logging
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from shardpool import wire
from shardpool.client.core import (
    DEFAULT_ADDRESS,
    GRACE,
    HEARTBEAT,
    LINGER_MS,
    ClientCore,
    Curve,
)
from shardpool.curve import CurveKeys, client_keys, secure_client
from shardpool.errors import (
    ConfigError,
    ProtocolError,
)
from shardpool.wire import EVENTS, NOBLOCK, POLLIN

log = logging.getLogger("shardpool.client")


def _curve_keys(curve: Curve) -> CurveKeys | None:
    """``curve`` as keys: None, CurveKeys, or (server public key file, own secret key file)."""
    if curve is None or isinstance(curve, CurveKeys):
        return curve
    if isinstance(curve, tuple) and len(curve) == 2:
        return client_keys(*curve)
    raise ConfigError(
        "curve must be (server public key file, own secret key file) or CurveKeys, "
        f"got {type(curve).__name__}"
    )


def _as_map(data: Any, cmd: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(f"the broker answered {cmd!r} with {type(data).__name__}, not a map")
    return data


# -- the socket, shared by both drivers ------------------------------------------


class _Connection:
    """One DEALER socket to the broker, and a monitor that reports disconnections."""

    def __init__(self, address: str, curve: CurveKeys | None = None) -> None:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        if curve is not None:
            secure_client(sock, curve)
        # The broker drops replies to a client whose queue is full. Replies only
        # come for requests we made, so let them all in rather than lose any.
        sock.setsockopt(zmq.RCVHWM, 0)
        self.monitor: zmq.Socket[bytes] = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(address)
        self.sock = sock
        self.fds = (int(sock.getsockopt(zmq.FD)), int(self.monitor.getsockopt(zmq.FD)))

    def send(self, core: ClientCore) -> bool:
        """Send what the core has queued; False if the socket is full (wait for POLLOUT)."""
        frames = core.outbox()
        sock = self.sock
        while frames:
            try:
                sock.send(frames[0], NOBLOCK)
            except zmq.Again:
                return False
            frames.popleft()
        return True

    def receive(self, core: ClientCore) -> int:
        """Read replies, then the monitor; returns the socket's EVENTS after reading."""
        events = self.read(core)
        self.watch(core)
        return events

    def read(self, core: ClientCore) -> int:
        """Read until EVENTS shows nothing left (the FD is edge-triggered); return EVENTS."""
        sock = self.sock
        recv, get = sock.recv, sock.get
        while (events := int(get(EVENTS))) & POLLIN:
            try:
                frame = recv(NOBLOCK, copy=False)  # not recv_multipart: several times dearer
            except zmq.Again:
                break
            if frame.more:
                parts = 1
                while frame.more:
                    frame = recv(NOBLOCK, copy=False)
                    parts += 1
                log.warning("ignored a message of %d frames (the protocol uses one)", parts)
                continue
            core.receive(frame.bytes)
        return events

    def watch(self, core: ClientCore) -> None:
        """Read the monitor: a dropped connection fails the requests sent on it."""
        monitor = self.monitor
        while int(monitor.getsockopt(EVENTS)) & POLLIN:
            try:
                event = recv_monitor_message(monitor, NOBLOCK)
            except zmq.Again:
                break
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.read(core)  # replies that arrived before the drop still count
                core.connection_lost("disconnected")

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=LINGER_MS)


class _ClientBase:
    """What both clients share: the address and the sans-IO core."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float | None = None,
        curve: Curve = None,
        *,
        grace: float = GRACE,
        heartbeat: float = HEARTBEAT,
        max_payload: int = wire.DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self.address = address
        self._curve = _curve_keys(curve)
        self._core = ClientCore(
            timeout=timeout,
            grace=grace,
            heartbeat=heartbeat,
            max_payload=max_payload,
            peer=f"the broker at {address}",
        )
        self._init_io()

    def _init_io(self) -> None:
        """The driver's own state and socket (AsyncClient: later, on its loop)."""
        raise NotImplementedError
