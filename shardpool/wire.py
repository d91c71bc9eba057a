"""ZeroMQ messages: client <-> broker (docs/protocol.md) and broker <-> shard.

Every message is one ZeroMQ frame holding one msgpack map with a version
``v`` and a type ``t``. One message carries many jobs or replies, so that
under load the per-message cost of a ZeroMQ hop is paid once per batch.
"""

from __future__ import annotations

from typing import Any

import msgspec
import zmq

VERSION = 1

# pyzmq's flag constants are enums: passing one, or ``&`` on one, runs Python
# code each time. The hot paths of the broker, the shards and the clients use
# these plain ints instead.
EVENTS, POLLIN, POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
NOBLOCK, SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024  # bytes of body + context per job


class _Msg(msgspec.Struct, tag_field="t", omit_defaults=True, forbid_unknown_fields=False):
    v: int = VERSION


# -- client -> broker ----------------------------------------------------------


class Job(msgspec.Struct, omit_defaults=True):
    """One job. ``id`` is the client's, unique among its jobs in flight."""

    id: int
    body: bytes = b""
    ctx: bytes = b""
    timeout: float = 0.0  # seconds from arrival; 0: none. Queued past it: never started
    stream: bool = False


class Submit(_Msg, tag="jobs"):
    jobs: list[Job] = msgspec.field(default_factory=list)


class Control(_Msg, tag="control"):
    """A control command: workers, stats, reset, shutdown, ping."""

    id: int = 0
    cmd: str = ""


class Cancel(_Msg, tag="cancel"):
    """Forget these jobs: queued ones are dropped, streams are stopped."""

    ids: list[int] = msgspec.field(default_factory=list)


# -- broker -> client ----------------------------------------------------------


class Reply(msgspec.Struct, omit_defaults=True):
    """A result (``more`` false), a stream chunk (``more`` true) or an error (``code`` set)."""

    id: int
    body: bytes = b""
    ctx: bytes = b""
    more: bool = False
    code: str = ""  # a stable error code (shardpool.errors.ErrorCode); empty on success
    error: str = ""  # the error message
    data: Any = None  # a control command's result


class Replies(_Msg, tag="replies"):
    replies: list[Reply] = msgspec.field(default_factory=list)


# -- shard <-> broker ----------------------------------------------------------


class Hello(_Msg, tag="hello"):
    """A shard announces itself: how many jobs it may hold (``capacity``), and
    how many of those its workers can start at once (``startable``; 0: all)."""

    name: str = ""
    pid: int = 0
    host: str = ""
    capacity: int = 1
    startable: int = 0


class Heartbeat(_Msg, tag="hb"):
    """Liveness, both ways. From a shard it carries its pool's figures (see Pool.stats)."""

    stats: Any = None


class Returned(_Msg, tag="returned"):
    """A shard hands back jobs it held but never started (its workers are all
    stuck on slow jobs, or it is leaving): the broker routes them again."""

    ids: list[int] = msgspec.field(default_factory=list)


class Bye(_Msg, tag="bye"):
    """A shard is leaving on purpose (SIGTERM, shutdown): jobs in flight still come back."""


ClientMessage = Submit | Control | Cancel
ShardMessage = Hello | Heartbeat | Replies | Returned | Bye
BrokerToShard = Submit | Control | Cancel | Heartbeat

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
client_decoder = msgspec.msgpack.Decoder(ClientMessage)
shard_decoder = msgspec.msgpack.Decoder(ShardMessage)
broker_decoder = msgspec.msgpack.Decoder(BrokerToShard)
replies_decoder = msgspec.msgpack.Decoder(Replies)
