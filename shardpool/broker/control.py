"""Control commands over the client protocol: ping, stats, workers, reset, shutdown.

Each command is a small method here. ``workers`` gathers every shard's
answer (or notes the ones that did not answer in time); ``reset`` is rolling,
one shard at a time, so the service keeps answering while it runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shardpool import wire
from shardpool.broker.metrics import figures
from shardpool.errors import BadRequestError, UnavailableError

if TYPE_CHECKING:
    from shardpool.broker.broker import Broker, ShardState

log = logging.getLogger("shardpool.broker")
COMMANDS = ("ping", "stats", "workers", "reset", "shutdown")


@dataclass
class _Gather:
    """A command waiting for shard answers."""

    client: bytes
    cid: int
    cmd: str
    deadline: float
    waiting: dict[int, bytes] = field(default_factory=dict)  # control id -> shard ident
    results: dict[str, Any] = field(default_factory=dict)
    todo: list[bytes] = field(default_factory=list)  # rolling reset: shards still to reset


class ControlDesk:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._gathers: list[_Gather] = []

    @property
    def busy(self) -> bool:
        return bool(self._gathers)

    def handle(self, client: bytes, message: wire.Control) -> None:
        broker = self.broker
        cmd = message.cmd
        if cmd == "ping":
            broker.reply(client, wire.Reply(message.id, data="pong"))
        elif cmd == "stats":
            broker.reply(client, wire.Reply(message.id, data=self.stats()))
        elif cmd == "shutdown":
            broker.reply(client, wire.Reply(message.id, data="draining"))
            broker.begin_shutdown()
        elif cmd == "workers":
            self._gather(client, message.id, "workers", list(broker.shards))
        elif cmd == "reset":
            if broker._closing:
                broker.reply_error(client, message.id, UnavailableError("shutting down"))
                return
            self._gather(client, message.id, "reset", [], todo=list(broker.shards))
        else:
            broker.stats["bad_messages"] += 1
            error = BadRequestError(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")
            broker.reply_error(client, message.id, error)

    def stats(self) -> dict[str, Any]:
        return figures(self.broker)

    def _gather(
        self,
        client: bytes,
        cid: int,
        cmd: str,
        idents: list[bytes],
        todo: list[bytes] | None = None,
    ) -> _Gather:
        timeout = self.broker.config.control_timeout
        gather = _Gather(client, cid, cmd, time.monotonic() + timeout, todo=todo or [])
        self._gathers.append(gather)
        for ident in idents:
            self._ask(gather, ident)
        if gather.todo:
            self._next_reset(gather)
        self._maybe_done(gather)
        return gather

    def _ask(self, gather: _Gather, ident: bytes) -> None:
        broker = self.broker
        shard = broker.shards.get(ident)
        if shard is None:
            return
        iid = broker._next_iid
        broker._next_iid += 1
        gather.waiting[iid] = ident
        broker._send_shard(shard, wire.Control(id=iid, cmd=gather.cmd))

    def _next_reset(self, gather: _Gather) -> None:
        while gather.todo and not gather.waiting:
            self._ask(gather, gather.todo.pop(0))
            if gather.waiting:
                # a reset may take up to reset_timeout per shard
                gather.deadline = time.monotonic() + self.broker.config.pool.reset_timeout + 5
        self._maybe_done(gather)

    def on_reply(self, shard: ShardState, reply: wire.Reply) -> None:
        for gather in self._gathers:
            if reply.id in gather.waiting:
                del gather.waiting[reply.id]
                gather.results[shard.name] = (
                    {"error": reply.error, "code": reply.code} if reply.code else reply.data
                )
                if gather.cmd == "reset":
                    self._next_reset(gather)
                else:
                    self._maybe_done(gather)
                return

    def on_shard_lost(self, shard: ShardState) -> None:
        for gather in list(self._gathers):
            for iid, ident in list(gather.waiting.items()):
                if ident == shard.ident:
                    del gather.waiting[iid]
                    gather.results[shard.name] = {"error": "shard lost", "code": "shard_lost"}
            if gather.cmd == "reset":
                self._next_reset(gather)
            else:
                self._maybe_done(gather)

    def _maybe_done(self, gather: _Gather) -> None:
        if gather.waiting or gather.todo or gather not in self._gathers:
            return
        self._gathers.remove(gather)
        self.broker.reply(gather.client, wire.Reply(gather.cid, data=gather.results))

    def tick(self, now: float) -> None:
        for gather in list(self._gathers):
            if now >= gather.deadline:
                for ident in gather.waiting.values():
                    shard = self.broker.shards.get(ident)
                    name = shard.name if shard else ident.decode(errors="replace")
                    gather.results[name] = {"error": "no answer in time", "code": "timeout"}
                gather.waiting.clear()
                gather.todo.clear()
                self._maybe_done(gather)
