"""The broker: accepts jobs from clients and routes them to shards with free capacity.

One thread, one blocking ``zmq.Poller`` loop (plain pyzmq: no asyncio layer
per message). Each pass drains what arrived, dispatches queued jobs to the
shards with the most free capacity, and sends one message per shard and per
client: under load jobs and replies travel in batches, while a lone job
still goes out in the same pass it arrived.

The loop reads as: ``run -> poll -> drain frontend/backend -> dispatch ->
flush -> timers``. Signals only set a flag through a wake-up pipe.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import signal
import time
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from shardpool import curve, wire
from shardpool.broker.control import ControlDesk
from shardpool.broker.local import BOOT_FAILURES_LIMIT, LocalShard, cpu_groups
from shardpool.broker.metrics import SNAPSHOT_INTERVAL, JobFigures, MetricsServer, figures
from shardpool.broker.placement import Placement, decide
from shardpool.config import ServeConfig
from shardpool.errors import (
    BadRequestError,
    EmptyPayloadError,
    JobTimeoutError,
    QueueFullError,
    ShardLostError,
    ShardpoolError,
    UnavailableError,
)
from shardpool.wire import EVENTS, NOBLOCK, POLLIN, SNDMORE

log = logging.getLogger("shardpool.broker")

_DRAIN_BATCH = 4096  # messages read from one socket per pass, for fairness
_GONE_KEPT = 4096  # gone clients remembered, so their work is cancelled once
_EXPIRY_SCAN_INTERVAL = 0.005  # seconds between scans for queued jobs past their deadline


class ServeError(ShardpoolError):
    """``serve`` cannot go on (a shard fails at boot over and over)."""


class _Pending(msgspec.Struct):
    """A job the broker accepted: who asked, and when.

    ``job`` is the client's own record, reused for the shard: its ``id``
    becomes the broker's (``iid``; ``cid`` keeps the client's) and its
    ``timeout`` what is left of the deadline. A struct, not a class with
    ``__init__``: made once per job, at half the cost.
    """

    iid: int
    client: bytes
    cid: int
    job: wire.Job
    deadline: float  # on the broker's clock; 0: none
    t0: float  # when it was accepted


class ShardState:
    """A shard as the broker sees it."""

    def __init__(self, ident: bytes, hello: wire.Hello, now: float) -> None:
        self.ident = ident
        self.name = hello.name or ident.decode(errors="replace")
        self.pid = hello.pid
        self.host = hello.host
        self.capacity = max(1, hello.capacity)
        # What its workers can start at once; the rest of its capacity is jobs it
        # holds for them. After it hands held jobs back (its workers are stuck on
        # slow jobs) it gets no more than this until one of its jobs finishes.
        self.startable = max(1, min(self.capacity, hello.startable or self.capacity))
        self.limit = self.capacity
        self.in_flight: dict[int, _Pending] = {}
        self.last_seen = now
        self.leaving = False
        self.jobs_done = 0
        self.pool_stats: dict[str, Any] = {}  # the latest figures from its heartbeat

    @property
    def batch_min(self) -> int:
        """A quarter of its credit: of its capacity, or of what it can start while
        its credit is cut. A cut shard with nothing in flight still gets jobs, or
        no reply would ever come to restore its credit."""
        return max(1, self.limit // 4)

    @property
    def free(self) -> int:
        return 0 if self.leaving else self.limit - len(self.in_flight)


class Broker:
    def __init__(self, config: ServeConfig, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self.ctx = context or zmq.Context.instance()
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.backend = self.ctx.socket(zmq.ROUTER)
        for sock in (self.frontend, self.backend):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.frontend.setsockopt(zmq.SNDHWM, config.client_hwm)  # a slow client: bounded memory
        # Say so when a reply cannot be delivered, instead of dropping it silently.
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, config.max_message_size)
        self.backend.setsockopt(zmq.SNDHWM, 0)
        self.backend.setsockopt(zmq.RCVHWM, 0)
        self.shards: dict[bytes, ShardState] = {}
        self.local: dict[str, LocalShard] = {}
        self.queue: collections.deque[_Pending] = collections.deque()
        self.out_clients: dict[bytes, list[wire.Reply]] = {}
        self.out_shards: dict[bytes, list[wire.Job]] = {}
        self.control = ControlDesk(self)
        self.jobs = JobFigures()
        self.metrics: MetricsServer | None = None
        self.placement = Placement(config.pin_shards, False, "no shards started yet")
        self._next_snapshot = 0.0
        self.stats = {
            "bad_messages": 0,
            "shards_lost": 0,
            "replies_undelivered": 0,  # to clients gone or not reading (client_hwm)
            "jobs_abandoned": 0,  # queued jobs of clients found gone: never started
            "jobs_returned": 0,  # held by a stuck or leaving shard, routed again
            # messages per hop, to see how well jobs and replies are batched
            "client_messages_in": 0,
            "client_messages_out": 0,
            "shard_messages_in": 0,
            "shard_messages_out": 0,
        }
        # Ids the broker gives jobs on shards start at the clock in ns, not 1: a shard
        # that outlives a broker restart may still answer the old broker's jobs, and
        # their ids must not match the new broker's (no broker issues one id per ns).
        self._next_iid = time.time_ns()
        self._closing = False
        self._closing_since = 0.0
        self._done = False
        self._fatal: str | None = None
        self._last_beat = 0.0
        self._deadlines = 0  # queued jobs that carry a deadline
        self._next_expiry_scan = 0.0
        self.gatekeeper: curve.Gatekeeper | None = None
        self._local_curve: str | None = None
        self._monitors: list[zmq.Socket[bytes]] = []
        self._handshake_failures = 0
        self._undelivered_logged = -math.inf
        # Clients found gone (their work already cancelled): later replies for
        # their running jobs are dropped without scanning and cancelling again.
        self._gone: set[bytes] = set()
        self._handshake_logged = -math.inf
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    # -- set-up ----------------------------------------------------------------

    def _secure(self) -> None:
        """CURVE on the endpoints that have allowed keys (config ``curve``)."""
        conf = self.config.curve
        if conf is None:
            return
        public, secret = curve.load_secret(conf.server_key, "curve.server_key")
        self.gatekeeper = curve.Gatekeeper(self.ctx)
        if conf.clients:
            keys = curve.allowed_keys(conf.clients, "curve.clients")
            self.gatekeeper.allow(curve.CLIENTS, keys, "client")
            curve.secure_server(self.frontend, secret, curve.CLIENTS)
        if conf.shards:
            keys = curve.allowed_keys(conf.shards, "curve.shards")
            local_public, local_secret = zmq.curve_keypair()  # for the shards we start
            self.gatekeeper.allow(curve.SHARDS, keys | {local_public}, "shard")
            curve.secure_server(self.backend, secret, curve.SHARDS)
            self._local_curve = curve.to_env(curve.CurveKeys(public, local_public, local_secret))
        for sock in (self.frontend, self.backend):
            if sock.curve_server:
                monitor = curve.watch_handshakes(sock)
                if monitor is not None:
                    self._monitors.append(monitor)

    def bind(self) -> None:
        self._secure()
        for sock, address in (
            (self.frontend, self.config.frontend),
            (self.backend, self.config.backend),
        ):
            _prepare_ipc(address)
            sock.bind(address)
            _restrict_ipc(address)
        self.frontend_address = self.frontend.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.backend_address = self.backend.getsockopt(zmq.LAST_ENDPOINT).decode()
        log.info("broker: clients at %s, shards at %s", self.frontend_address, self.backend_address)
        if self.config.metrics:
            self.metrics = MetricsServer(self.config.metrics)

    def start_local_shards(self, count: int) -> None:
        self.placement, allowed = decide(self.config.pin_shards, count)
        if count:
            log.info("broker: %s", self.placement.describe())
        groups = cpu_groups(count, allowed) if self.placement.pinned else []
        for i in range(count):
            shard = LocalShard(
                f"shard-{i}",
                self.backend_address,
                self.config.pool,
                self.config.heartbeat,
                self.config.liveness,
                self.config.prefetch,
                curve=self._local_curve,
                cpus=groups[i] if groups else None,
            )
            shard.spawn()
            self.local[shard.name] = shard

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)  # the wake-up fd carries it to the loop

    # -- the loop --------------------------------------------------------------

    def run(self) -> None:
        """Serve until shutdown; raise :class:`ServeError` if shards cannot boot."""
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)
        watched: dict[int, tuple[LocalShard, str]] = {}
        while not self._done:
            watched = self._watch_local(poller, watched)
            events = dict(poller.poll(self._poll_timeout_ms()))
            if self.backend in events:
                self._drain(self.backend, self._on_shard)
            if self.frontend in events:
                self._drain(self.frontend, self._on_client)
            if self._wake_r in events:
                self._on_signal()
            for monitor in self._monitors:
                if monitor in events:
                    self._on_monitor(monitor)
            for fd, (shard, kind) in watched.items():
                if fd in events:
                    if kind == "stderr":
                        shard.read_stderr()
                    else:
                        self._local_exited(shard)
            self._dispatch()
            self._flush()
            self._timers()
        self._close()
        if self._fatal is not None:
            raise ServeError(self._fatal)

    def _watch_local(
        self, poller: zmq.Poller, watched: dict[int, tuple[LocalShard, str]]
    ) -> dict[int, tuple[LocalShard, str]]:
        wanted: dict[int, tuple[LocalShard, str]] = {}
        for shard in self.local.values():
            if shard.pidfd >= 0:
                wanted[shard.pidfd] = (shard, "exit")
            if shard.stderr_fd >= 0:
                wanted[shard.stderr_fd] = (shard, "stderr")
        if wanted.keys() != watched.keys():
            for fd in watched:
                if fd not in wanted:
                    poller.unregister(fd)
            for fd in wanted:
                if fd not in watched:
                    poller.register(fd, zmq.POLLIN)
        return wanted

    def _poll_timeout_ms(self) -> int:
        if self.out_clients or self.out_shards:
            return 0
        if self._deadlines or self.control.busy:
            return 10
        return int(self.config.heartbeat * 1000 / 4)

    def _drain(self, sock: zmq.Socket[bytes], handle: Any) -> None:
        # Frame by frame: recv_multipart costs several times two plain recvs.
        # The poll said a message is there; after it, asking EVENTS costs less
        # than the exception of a recv that finds nothing (3 against 7 us).
        recv, get = sock.recv, sock.get
        for _ in range(_DRAIN_BATCH):
            try:
                ident = recv(NOBLOCK)
            except zmq.Again:
                return
            # A message's frames arrive together, so the rest is there.
            frame = recv(NOBLOCK, copy=False)
            if frame.more:  # more than two frames: not ours; skip the rest
                while frame.more:
                    frame = recv(NOBLOCK, copy=False)
                self.stats["bad_messages"] += 1
                continue
            handle(ident, frame.bytes)
            if not int(get(EVENTS)) & POLLIN:
                return

    def _on_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        """A peer failed the CURVE handshake: count it, log it (at most once a minute)."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            text = curve.handshake_failure(event)
            if text is None:
                continue
            self._handshake_failures += 1
            now = time.monotonic()
            if now - self._handshake_logged >= 60.0:
                self._handshake_logged = now
                log.warning(
                    "refused a peer: %s (%d so far)",
                    text,
                    self._handshake_failures,
                    extra={"event": "peer_refused"},
                )

    @property
    def refused_peers(self) -> int:
        zap = self.gatekeeper.refused if self.gatekeeper is not None else 0
        return zap + self._handshake_failures

    # -- clients ---------------------------------------------------------------

    def _on_client(self, client: bytes, data: bytes) -> None:
        self.stats["client_messages_in"] += 1
        if self._gone:
            self._gone.discard(client)  # an identity back again (a client that sets its own)
        try:
            message = wire.client_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            # UnicodeDecodeError: a msgpack str that is not UTF-8 (msgspec raises it as is)
            self._bad(client, 0, f"malformed message: {exc}")
            return
        if message.v != wire.VERSION:
            self._bad(
                client,
                0,
                f"unsupported protocol version {message.v}; this broker speaks {wire.VERSION}",
            )
            return
        if isinstance(message, wire.Submit):
            self._accept_jobs(client, message.jobs)
        elif isinstance(message, wire.Control):
            self.control.handle(client, message)
        else:
            self._cancel(client, set(message.ids))

    def _accept_jobs(self, client: bytes, jobs: list[wire.Job]) -> None:
        """Queue a message's jobs; refuse (with an error reply) those that cannot run."""
        now = time.monotonic()
        queue, append = self.queue, self.queue.append
        max_size = self.config.max_payload_size
        max_queue = self.config.max_queue_size
        iid = self._next_iid
        closing = self._closing
        for job in jobs:
            size = len(job.body) + len(job.ctx)
            timeout = job.timeout
            odd = closing or not 0 < size <= max_size or timeout < 0 or len(queue) >= max_queue
            if odd and self._refused(client, job, size):
                continue
            if timeout:
                self._deadlines += 1
                append(_Pending(iid, client, job.id, job, now + timeout, now))
            else:
                append(_Pending(iid, client, job.id, job, 0.0, now))
            job.id = iid
            iid += 1
        self._next_iid = iid

    def _refused(self, client: bytes, job: wire.Job, size: int) -> bool:
        """Whether ``job`` is refused; if so, its error reply is queued."""
        error: ShardpoolError | None = None
        if self._closing:
            error = UnavailableError("the service is shutting down")
        elif size > self.config.max_payload_size:
            error = BadRequestError(
                f"job of {size} bytes exceeds max_payload_size ({self.config.max_payload_size})"
            )
        elif not size:
            error = EmptyPayloadError("a job needs a body or a context; both are empty")
        elif job.timeout < 0:
            error = BadRequestError(f"timeout must not be negative, got {job.timeout}")
        elif len(self.queue) >= self.config.max_queue_size and not self._has_free_shard():
            error = QueueFullError(
                f"{len(self.queue)} jobs are already waiting for a shard (max_queue_size)"
            )
        if error is None:
            return False
        self.jobs.count(error.code.value)
        self.reply_error(client, job.id, error)
        return True

    def _has_free_shard(self) -> bool:
        return any(s.free > 0 for s in self.shards.values())

    def _bad(self, client: bytes, cid: int, message: str) -> None:
        self.stats["bad_messages"] += 1
        log.warning("bad client message: %s", message)
        self.reply_error(client, cid, BadRequestError(message))

    def _cancel(self, client: bytes, ids: set[int] | None) -> int:
        """Drop a client's queued jobs and stop its streams (``ids``, or all of them).

        Returns how many queued jobs were dropped; jobs already running finish.
        """
        kept: collections.deque[_Pending] = collections.deque()
        for pending in self.queue:
            if pending.client == client and (ids is None or pending.cid in ids):
                self._forget_deadline(pending)
            else:
                kept.append(pending)
        dropped = len(self.queue) - len(kept)
        self.queue = kept
        for shard in self.shards.values():
            # The shard stops the streams and drops the jobs it holds; running jobs finish.
            mine = [
                p.iid
                for p in shard.in_flight.values()
                if p.client == client and (ids is None or p.cid in ids)
            ]
            if mine:
                self._send_shard(shard, wire.Cancel(ids=mine))
        return dropped

    def reply(self, client: bytes, reply: wire.Reply) -> None:
        out = self.out_clients.get(client)
        if out is None:
            self.out_clients[client] = [reply]
        else:
            out.append(reply)

    def reply_error(self, client: bytes, cid: int, error: ShardpoolError) -> None:
        self.reply(client, wire.Reply(cid, code=error.code.value, error=str(error)))

    # -- shards ----------------------------------------------------------------

    def _on_shard(self, ident: bytes, data: bytes) -> None:
        self.stats["shard_messages_in"] += 1
        try:
            message = wire.shard_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            log.error("bad message from shard %r: %s", ident, exc)
            return
        now = time.monotonic()
        shard = self.shards.get(ident)
        if isinstance(message, wire.Hello):
            self._hello(ident, message, now)
            return
        if shard is None:
            return  # a shard we declared lost: it reconnects with a hello
        shard.last_seen = now
        if isinstance(message, wire.Replies):
            self._shard_replies(shard, message.replies)
        elif isinstance(message, wire.Returned):
            self._returned(shard, message.ids)
        elif isinstance(message, wire.Heartbeat):
            if message.stats is not None:
                shard.pool_stats = message.stats
        elif isinstance(message, wire.Bye):
            shard.leaving = True
            log.info("shard %s is leaving", shard.name)

    def _hello(self, ident: bytes, hello: wire.Hello, now: float) -> None:
        old = self.shards.get(ident)
        if old is not None:
            self._lose(old, "it reconnected, so its earlier jobs' fate is unknown")
        shard = ShardState(ident, hello, now)
        self.shards[ident] = shard
        # Answer at once: a shard that has not heard from us for a while (its link
        # was down) reconnects, with another hello, unless we speak before its
        # next check; a second hello would fail every job we had sent it since.
        self._send_shard(shard, wire.Heartbeat())
        local = self.local.get(shard.name)
        if local is not None:
            local.said_hello = True
        log.info(
            "shard %s joined (pid %d on %s, capacity %d)",
            shard.name,
            shard.pid,
            shard.host,
            shard.capacity,
            extra={"event": "shard_joined", "shard": shard.name},
        )

    def _shard_replies(self, shard: ShardState, replies: list[wire.Reply]) -> None:
        in_flight = shard.in_flight
        now = time.monotonic()
        out = self.out_clients
        took: list[float] = []  # seconds from acceptance, per terminal reply
        failed: list[str] = []  # the codes of the terminal replies that are errors
        # A message's replies mostly go to one client: look its batch up once.
        client: bytes | None = None
        batch: list[wire.Reply] = []
        for reply in replies:
            more = reply.more
            pending = in_flight.get(reply.id) if more else in_flight.pop(reply.id, None)
            if pending is None:
                self.control.on_reply(shard, reply)
                continue
            if not more:
                took.append(now - pending.t0)
                if reply.code:
                    failed.append(reply.code)
            reply.id = pending.cid
            if pending.client is not client:
                client = pending.client
                batch = out.get(client) or out.setdefault(client, [])
            batch.append(reply)
        if took:
            self.jobs.observe_runs(took, failed)
            shard.jobs_done += len(took)
            shard.limit = shard.capacity  # it moves again: full credit

    def _returned(self, shard: ShardState, ids: list[int]) -> None:
        """A shard handed back jobs it never started: they go first in the queue
        (where one whose deadline has passed is answered, as any queued job)."""
        back: list[_Pending] = []
        for iid in ids:
            pending = shard.in_flight.pop(iid, None)
            if pending is None:
                continue  # not one of its jobs (or already answered): nothing to do
            if pending.deadline:
                self._deadlines += 1
            back.append(pending)
        self.queue.extendleft(reversed(back))
        self.stats["jobs_returned"] += len(back)
        shard.limit = shard.startable
        log.debug("shard %s handed back %d jobs", shard.name, len(back))

    def _lose(self, shard: ShardState, why: str) -> None:
        """Every job in flight on a lost shard gets a "shard lost" reply: never silence."""
        if self.shards.get(shard.ident) is shard:
            del self.shards[shard.ident]
        self.stats["shards_lost"] += 1
        log.warning(
            "shard %s lost with %d jobs in flight: %s",
            shard.name,
            len(shard.in_flight),
            why,
            extra={"event": "shard_lost", "shard": shard.name},
        )
        error = ShardLostError(f"shard {shard.name} was lost while running the job: {why}")
        now = time.monotonic()
        for pending in shard.in_flight.values():
            self.jobs.observe(error.code.value, now - pending.t0)
            self.reply_error(pending.client, pending.cid, error)
        shard.in_flight.clear()
        self.control.on_shard_lost(shard)

    def _local_exited(self, local: LocalShard) -> None:
        code = local.reap()
        for shard in list(self.shards.values()):
            if shard.name == local.name and shard.pid == local.pid:
                self._lose(shard, local.describe_exit(code).split(":\n")[0])
        if self._closing:
            return
        if local.boot_failures >= BOOT_FAILURES_LIMIT:
            self._fatal = (
                f"{local.describe_exit(code)}\nshard {local.name} failed at boot "
                f"{local.boot_failures} times in a row; stopping"
            )
            log.error("%s", self._fatal)
            self._begin_shutdown()
            return
        delay = local.schedule_restart()
        log.warning(
            "%s; restarting in %.1fs",
            local.describe_exit(code),
            delay,
            extra={"event": "shard_restarting", "shard": local.name},
        )

    def _send_shard(self, shard: ShardState, message: Any) -> None:
        self._to_shard(shard.ident, wire.encode(message))

    def _to_shard(self, ident: bytes, data: bytes) -> None:
        backend = self.backend
        backend.send(ident, SNDMORE)  # two sends: cheaper than send_multipart
        backend.send(data)

    # -- dispatch --------------------------------------------------------------

    def _dispatch(self) -> None:
        """Send queued jobs to the shards with the most free capacity."""
        queue = self.queue
        if not queue:
            return
        # A shard gets a batch once a quarter of its credit is free (or the
        # whole queue fits), not one job per freed slot.
        backlog = len(queue)
        shards = [s for s in self.shards.values() if s.free >= min(backlog, s.batch_min)]
        if not shards:
            return
        now = time.monotonic()
        out = self.out_shards
        popleft = queue.popleft
        while queue and shards:
            # The shard with the most room takes its share of the queue, so jobs
            # spread over the shards as their free capacity allows.
            shard = max(shards, key=_free) if len(shards) > 1 else shards[0]
            shards.remove(shard)
            share = min(shard.free, -(-len(queue) // (len(shards) + 1)))
            in_flight = shard.in_flight
            batch = out.get(shard.ident)
            if batch is None:
                batch = out[shard.ident] = []
            while share and queue:
                pending = popleft()
                job = pending.job
                if pending.deadline:
                    self._deadlines -= 1
                    if pending.deadline <= now:
                        self._expire(pending)
                        continue
                    job.timeout = pending.deadline - now
                in_flight[pending.iid] = pending
                batch.append(job)
                share -= 1
            if not batch:
                del out[shard.ident]
            if shard.free > 0:
                shards.append(shard)

    def _expire(self, pending: _Pending) -> None:
        error = JobTimeoutError(
            "the job's deadline passed while it waited for a shard; it never ran"
        )
        self.jobs.observe(error.code.value, time.monotonic() - pending.t0)
        self.reply_error(pending.client, pending.cid, error)

    def _forget_deadline(self, pending: _Pending) -> None:
        if pending.deadline:
            self._deadlines -= 1

    def _flush(self) -> None:
        if self.out_shards:
            out, self.out_shards = self.out_shards, {}
            self.stats["shard_messages_out"] += len(out)
            for ident, jobs in out.items():
                self._to_shard(ident, wire.encode(wire.Submit(jobs=jobs)))
        if self.out_clients:
            out_c, self.out_clients = self.out_clients, {}
            self.stats["client_messages_out"] += len(out_c)
            send = self.frontend.send
            for client, replies in out_c.items():
                data = wire.encode(wire.Replies(replies=replies))
                try:
                    # The first frame decides: ROUTER_MANDATORY refuses it for
                    # a client that is gone or not reading, and then sends nothing.
                    send(client, SNDMORE | NOBLOCK)
                except zmq.Again:  # its queue is full (client_hwm): a slow reader
                    self._undelivered(client, len(replies), "is not reading its replies")
                    continue
                except zmq.ZMQError as exc:
                    if exc.errno != errno.EHOSTUNREACH:
                        raise
                    self._client_gone(client, len(replies))
                    continue
                send(data, NOBLOCK)

    def _client_gone(self, client: bytes, replies: int) -> None:
        self._undelivered(client, replies, "is gone")
        if client not in self._gone:
            if len(self._gone) >= _GONE_KEPT:
                self._gone.clear()  # at worst a later reply cancels once more
            self._gone.add(client)
            # Nobody is left to answer: its queued jobs never run, its streams stop.
            self.stats["jobs_abandoned"] += self._cancel(client, None)

    def _undelivered(self, client: bytes, count: int, why: str) -> None:
        """Replies ZeroMQ cannot deliver: counted, and logged at most once a second."""
        self.stats["replies_undelivered"] += count
        now = time.monotonic()
        if now - self._undelivered_logged >= 1.0:
            self._undelivered_logged = now
            log.warning(
                "client %s %s: %d replies dropped (%d so far)",
                client.hex(),
                why,
                count,
                self.stats["replies_undelivered"],
            )

    # -- timers ----------------------------------------------------------------

    def _timers(self) -> None:
        now = time.monotonic()
        if self._deadlines:
            self._expire_queued(now)
        self.control.tick(now)
        if now - self._last_beat >= self.config.heartbeat:
            self._last_beat = now
            limit = self.config.heartbeat * self.config.liveness
            for shard in list(self.shards.values()):
                if now - shard.last_seen > limit:
                    self._lose(shard, f"no heartbeat for {now - shard.last_seen:.1f}s")
                else:
                    self._send_shard(shard, wire.Heartbeat())
        for local in self.local.values():
            if local.restart_at is not None and now >= local.restart_at and not self._closing:
                local.spawn()
        if self.metrics is not None and now >= self._next_snapshot:
            self._next_snapshot = now + SNAPSHOT_INTERVAL
            self.metrics.update(figures(self))
        if self._closing:
            self._shutdown_step(now)

    def _expire_queued(self, now: float) -> None:
        # A scan of the queue costs O(queue); do it at most every few ms.
        if now < self._next_expiry_scan:
            return
        self._next_expiry_scan = now + _EXPIRY_SCAN_INTERVAL
        if not any(p.deadline and p.deadline <= now for p in self.queue):
            return
        kept: collections.deque[_Pending] = collections.deque()
        for pending in self.queue:
            if pending.deadline and pending.deadline <= now:
                self._deadlines -= 1
                self._expire(pending)
            else:
                kept.append(pending)
        self.queue = kept

    # -- shutdown --------------------------------------------------------------

    def _on_signal(self) -> None:
        try:
            data = os.read(self._wake_r, 64)
        except BlockingIOError:
            return
        if any(b in (signal.SIGTERM, signal.SIGINT) for b in data):
            log.info("signal received: draining")
            self._begin_shutdown()

    def begin_shutdown(self) -> None:
        self._begin_shutdown()

    def _begin_shutdown(self) -> None:
        if not self._closing:
            self._closing = True
            self._closing_since = time.monotonic()

    def _shutdown_step(self, now: float) -> None:
        """Drain: queued and in-flight jobs finish (up to drain_timeout), then shards stop."""
        busy = self.queue or any(s.in_flight for s in self.shards.values())
        overdue = now - self._closing_since > self.config.drain_timeout
        if busy and not overdue and self._fatal is None:
            return
        if overdue and busy:
            log.warning("drain timeout reached with jobs unfinished")
            error = UnavailableError("the service shut down before the job finished")
            for pending in self.queue:
                self.jobs.observe(error.code.value, now - pending.t0)
                self.reply_error(pending.client, pending.cid, error)
            self.queue.clear()
            for shard in list(self.shards.values()):
                self._lose(shard, "the service shut down")
        self._flush()
        self._stop_local_shards()
        self._done = True

    def _stop_local_shards(self) -> None:
        for local in self.local.values():
            local.restart_at = None
            local.terminate()
        deadline = time.monotonic() + self.config.pool.destroy_timeout + 5
        for local in self.local.values():
            if local.proc is None:
                continue
            try:
                local.proc.wait(max(0.1, deadline - time.monotonic()))
            except Exception:
                local.kill()
                local.proc.wait()
            if local.pidfd >= 0:
                local.read_stderr()
                local._close_fds()

    def _close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        for monitor in self._monitors:
            monitor.close(linger=0)
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
        self.frontend.close(linger=100)
        self.backend.close(linger=100)
        for address in (self.config.frontend, self.config.backend):
            _cleanup_ipc(address)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _free(shard: ShardState) -> int:
    return shard.free


def _ipc_path(address: str) -> str | None:
    return address[len("ipc://") :] if address.startswith("ipc://") else None


def _prepare_ipc(address: str) -> None:
    path = _ipc_path(address)
    if path:
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)


def _restrict_ipc(address: str) -> None:
    path = _ipc_path(address)
    if path and os.path.exists(path):
        os.chmod(path, 0o600)  # owner-only: other users cannot submit jobs


def _cleanup_ipc(address: str) -> None:
    path = _ipc_path(address)
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)
