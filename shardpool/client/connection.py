"""What both client drivers share: CURVE keys, the DEALER socket, the constructor."""

from __future__ import annotations

import logging
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from shardpool import wire
from shardpool.client.core import (
    _EVENTS,
    _NOBLOCK,
    _POLLIN,
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
                sock.send(frames[0], _NOBLOCK)
            except zmq.Again:
                return False
            frames.popleft()
        return True

    def receive(self, core: ClientCore) -> None:
        """Read until EVENTS shows nothing left (the FD is edge-triggered); then the monitor."""
        self._drain(core)
        monitor = self.monitor
        while int(monitor.getsockopt(_EVENTS)) & _POLLIN:
            try:
                event = recv_monitor_message(monitor, _NOBLOCK)
            except zmq.Again:
                break
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._drain(core)  # replies that arrived before the drop still count
                core.connection_lost("disconnected")

    def _drain(self, core: ClientCore) -> None:
        sock = self.sock
        while int(sock.getsockopt(_EVENTS)) & _POLLIN:
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            if len(frames) == 1:
                core.receive(frames[0])
            else:
                log.warning("ignored a message of %d frames (the protocol uses one)", len(frames))

    def events(self) -> int:
        return int(self.sock.getsockopt(_EVENTS))

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
