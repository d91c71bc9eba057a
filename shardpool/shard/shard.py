"""The shard process: one static pool and one ZeroMQ connection to the broker.

It announces its capacity: what its pool can start at once (workers x
pipeline depth) plus a few jobs per worker it may hold (prefetch, none in
debug mode), so that a worker never waits for a round trip to the broker;
the broker never sends it more. Held jobs are never started past their
deadline, and when no job has finished for a while (every worker stuck on a
slow job), the shard hands its held jobs back to the broker, which routes
them to another shard.
Replies produced in one pass of the event loop go back in one message.
Heartbeats are sent from the event loop itself, so a stalled loop looks dead
to the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import time
from typing import Any

import msgspec
import zmq

from shardpool import wire
from shardpool.config import PoolConfig
from shardpool.curve import CurveKeys, secure_client
from shardpool.errors import ConfigError, ShardpoolError, UnavailableError
from shardpool.payload import Payload
from shardpool.pool import Pool
from shardpool.pool.static import AUTO_SLOW_FACTOR
from shardpool.wire import EVENTS, NOBLOCK, POLLIN
from shardpool.worker.busypoll import may_spin

log = logging.getLogger("shardpool.shard")

EXIT_OK = 0
EXIT_BOOT_FAILED = 3  # the pool could not start: serve must not respawn forever
_RECONNECT_MAX = 5.0
FLUSH_DELAY = 0.002  # longest a reply waits for company (uvloop timers tick in whole ms)
# Held jobs go back to the broker when no job has finished for this long, or
# for AUTO_SLOW_FACTOR x the pool's mean job time if that is longer: every
# worker is then on a job far slower than usual, and another shard may be free.
STALL_MIN = 0.01
EXPIRY_SLACK = 0.005  # a held job's timeout reply may come this late (it never runs late)


def die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the parent (serve) dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def pin(cpus: list[int], config: PoolConfig) -> None:
    """Run this process, and the PHP workers it will spawn, only on ``cpus``.

    Call it first thing: threads started later (ZeroMQ's I/O thread) and child
    processes inherit it. Pinned to one CPU, the pool will not busy-poll
    (:func:`~shardpool.worker.busypoll.may_spin`).
    """
    allowed = sorted(os.sched_getaffinity(0))
    outside = [cpu for cpu in cpus if cpu not in allowed]
    if outside:
        raise ConfigError(
            f"--cpus: CPU {outside[0]} is not one this process may run on "
            f"(allowed: {','.join(map(str, allowed))})"
        )
    os.sched_setaffinity(0, cpus)
    listed = ",".join(map(str, cpus))
    if config.busy_poll and not may_spin():
        log.info("pinned to CPU %s with its PHP workers; busy polling off", listed)
    else:
        log.info("pinned to CPU(s) %s with its PHP workers", listed)


class Shard:
    def __init__(
        self,
        config: PoolConfig,
        connect: str,
        *,
        name: str | None = None,
        heartbeat: float = 1.0,
        liveness: int = 3,
        parent_pid: int | None = None,
        drain_timeout: float = 60.0,
        prefetch: int = 0,
        curve: CurveKeys | None = None,
    ) -> None:
        self.prefetch = prefetch
        self.curve = curve
        self.config = config
        self.connect = connect
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.parent_pid = parent_pid
        self.drain_timeout = drain_timeout
        self.pool = Pool(config)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._fd: int | None = None
        self._out: list[wire.Reply] = []
        self._flush_scheduled = False
        self._flush_timer: asyncio.TimerHandle | None = None
        # Jobs from the broker not yet answered. All are handed to the pool at once;
        # those waiting in its queue are the jobs this shard holds (prefetch), and
        # it can take them back (Pool.withdraw).
        self._in_flight = 0
        self._stall_mark = 0
        self._stall_timer: asyncio.TimerHandle | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_at = 0.0
        self._streams: dict[int, asyncio.Task[Payload | ShardpoolError]] = {}
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._last_heard = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff = 0.1
        self._idle: asyncio.Event | None = None  # set once draining and nothing is in flight

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            await self.pool.start()
        except ShardpoolError as exc:
            log.error("shard %s cannot start its pool: %s", self.name, exc)
            return EXIT_BOOT_FAILED
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        self._open()
        beat = loop.create_task(self._heartbeats())
        await self._stopped.wait()
        beat.cancel()
        await self._drain()
        return EXIT_OK

    def stop(self) -> None:
        """Stop taking jobs; those in flight finish, then the pool stops."""
        if not self._stopping:
            log.info("shard %s stopping", self.name)
            self._stopping = True
            assert self._stopped is not None
            self._stopped.set()

    async def _drain(self) -> None:
        self._hand_back("the shard is stopping")  # other shards run them sooner
        self._send(wire.Bye())
        self._idle = asyncio.Event()
        if not self._in_flight:
            self._idle.set()
        try:
            await asyncio.wait_for(self._idle.wait(), self.drain_timeout)
        except TimeoutError:
            log.warning(
                "shard %s: %d jobs still running after %gs",
                self.name,
                self._in_flight,
                self.drain_timeout,
            )
        self._flush()
        await self.pool.destroy()
        self._close()

    def _open(self) -> None:
        assert self._loop is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.name.encode())
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self.curve is not None:
            secure_client(sock, self.curve)
        sock.connect(self.connect)
        self._sock = sock
        self._fd = int(sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._readable)
        self._last_heard = self._loop.time()
        self._send(
            wire.Hello(
                name=self.name,
                pid=os.getpid(),
                host=socket.gethostname(),
                capacity=self.capacity,
                startable=self.pool.capacity,
            )
        )
        log.info("shard %s connected to %s (capacity %d)", self.name, self.connect, self.capacity)

    def _close(self, linger: int = 1000) -> None:
        if self._sock is not None:
            assert self._loop is not None and self._fd is not None
            self._loop.remove_reader(self._fd)
            self._sock.close(linger=linger)
            self._sock = None

    @property
    def capacity(self) -> int:
        """Jobs the broker may have in flight here: what the pool can start, plus prefetch.

        In debug mode, none held: each job waits for a fresh worker, which costs
        far more than a round trip to the broker, and a debug pool cannot hand a
        waiting job back, so a held job would wait out a slow one here while
        another shard could run it.
        """
        if self.config.debug:
            return self.pool.capacity
        return self.pool.capacity + self.prefetch * self.config.num_workers

    # -- I/O -------------------------------------------------------------------

    def _readable(self) -> None:
        # The FD is edge-triggered: drain until EVENTS says nothing is left.
        sock = self._sock
        while sock is not None and int(sock.getsockopt(EVENTS)) & POLLIN:
            try:
                data = sock.recv(NOBLOCK)
            except zmq.Again:
                break
            self._on_message(data)
            sock = self._sock
        # No flush here: the FD also fires after our own sends, and flushing
        # on each of those sent every reply in a message of its own.

    def _send(self, message: Any) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send(wire.encode(message), NOBLOCK)
        except zmq.Again:
            log.warning("shard %s: broker connection full; message dropped", self.name)
        # A send can consume the edge that announced incoming messages.
        if int(self._sock.getsockopt(EVENTS)) & POLLIN:
            assert self._loop is not None
            self._loop.call_soon(self._readable)

    def _on_message(self, data: bytes) -> None:
        assert self._loop is not None
        self._last_heard = self._loop.time()
        try:
            message = wire.broker_decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.error("shard %s: bad message from the broker: %s", self.name, exc)
            return
        if isinstance(message, wire.Submit):
            now = time.monotonic()  # deadlines count from here
            for job in message.jobs:
                self._start(job, now)
        elif isinstance(message, wire.Control):
            self._loop.create_task(self._control(message))
        elif isinstance(message, wire.Cancel):
            self._cancel(set(message.ids))

    def _cancel(self, ids: set[int]) -> None:
        """Stop these jobs' streams and drop those held; running jobs finish."""
        for job_id in ids:
            task = self._streams.get(job_id)
            if task is not None:
                task.cancel()
        for held in self.pool.withdraw(lambda s: s.tag in ids):
            self._answer(held.tag, UnavailableError("the job was cancelled; it never ran"))

    # -- jobs ------------------------------------------------------------------

    def _start(self, job: wire.Job, now: float) -> None:
        self._in_flight += 1
        if self._stopping:
            self._answer(job.id, UnavailableError("the shard is shutting down"))
            return
        job_id, timeout = job.id, job.timeout
        payload = Payload(job.body, job.ctx)
        if timeout:
            deadline = now + timeout
            # Deadlines come nearly, not quite, in order (each job waited its own
            # time at the broker): moving the timer by a few ms would cost a timer
            # per job.
            if not self._expiry_at or deadline < self._expiry_at - EXPIRY_SLACK:
                self._arm_expiry(deadline)
        else:
            deadline = 0.0
        if self._stall_timer is None and self._in_flight > self.pool.capacity:
            self._arm_stall()  # some jobs wait for a worker: watch that they move
        if job.stream:
            assert self._loop is not None
            task = self._loop.create_task(self._stream(job_id, payload, timeout or None, deadline))
            # A done callback, not the coroutine, answers: a task cancelled before
            # its first step never runs its body.
            task.add_done_callback(lambda task: self._stream_ended(job_id, task))
            self._streams[job_id] = task
            return
        self.pool.submit(
            payload,
            lambda outcome: self._answer(job_id, outcome),
            timeout or None,
            deadline=deadline,
            tag=job_id,
        )

    def _arm_expiry(self, deadline: float) -> None:
        assert self._loop is not None
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._expiry_at = deadline
        self._expiry_timer = self._loop.call_later(
            max(0.0, deadline - time.monotonic()), self._expire_held
        )

    def _expire_held(self) -> None:
        """Answer the held jobs whose deadline has passed (they never run) now,
        not when a worker frees up."""
        self._expiry_timer = None
        self._expiry_at = 0.0
        earliest = self.pool.expire_queued()
        if earliest:
            self._arm_expiry(earliest)

    def _arm_stall(self) -> None:
        assert self._loop is not None
        self._stall_mark = self.pool.progress
        after = max(STALL_MIN, AUTO_SLOW_FACTOR * self.pool.mean_job_time)
        self._stall_timer = self._loop.call_later(after, self._check_stall)

    def _check_stall(self) -> None:
        self._stall_timer = None
        if self._in_flight <= self.pool.capacity:
            return  # nothing held
        if self.pool.progress != self._stall_mark:
            self._arm_stall()  # jobs are moving
        else:
            self._hand_back("no job finished for a while: every worker is on a slow job")

    def _take_held(self) -> list[int]:
        """Take every held job back from the pool: they no longer count as ours."""
        ids = [held.tag for held in self.pool.withdraw()]
        streams = self.pool.withdraw_streams(lambda job_id: job_id in self._streams)
        for job_id in streams:
            del self._streams[job_id]  # its task ends unanswered (_stream_ended)
        ids += streams
        self._in_flight -= len(ids)
        self._check_idle()
        return ids

    def _hand_back(self, why: str) -> None:
        """Give the held jobs back to the broker, to run on another shard."""
        ids = self._take_held()
        if ids:
            log.debug("shard %s: %d held jobs handed back: %s", self.name, len(ids), why)
            self._send(wire.Returned(ids=ids))

    def _forget_held(self) -> None:
        """Drop the held jobs of a broker we lost: it has already failed every job
        it gave us (shard lost), or it is gone with its clients."""
        ids = self._take_held()
        if ids:
            log.warning("shard %s: %d held jobs dropped, never run", self.name, len(ids))

    async def _stream(
        self, job_id: int, payload: Payload, timeout: float | None, deadline: float
    ) -> Payload | ShardpoolError:
        """Relay a stream's chunks; return its last one, or its error."""
        last: Payload | None = None
        try:
            stream = self.pool.stream(payload, timeout, deadline=deadline, tag=job_id)
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    if last is not None:
                        self._queue(wire.Reply(job_id, last.body, last.context, more=True))
                    last = chunk
        except ShardpoolError as exc:
            return exc
        return last or Payload()

    def _stream_ended(self, job_id: int, task: asyncio.Task[Payload | ShardpoolError]) -> None:
        if self._streams.pop(job_id, None) is None:
            return  # taken back before it started (_take_held): no longer ours to answer
        outcome: Payload | ShardpoolError
        if task.cancelled():
            outcome = UnavailableError("the stream was cancelled")
        elif (exc := task.exception()) is not None:
            log.error("shard %s: stream %d failed: %r", self.name, job_id, exc)
            outcome = ShardpoolError(f"internal error: {exc!r}")
        else:
            outcome = task.result()
        self._answer(job_id, outcome)

    def _answer(self, job_id: int, outcome: Payload | ShardpoolError) -> None:
        """Queue the terminal reply of a job the broker gave us."""
        self._in_flight -= 1
        if not self._in_flight and self._idle is not None:  # _check_idle, inlined: per job
            self._idle.set()
        if isinstance(outcome, Payload):
            reply = wire.Reply(job_id, outcome.body, outcome.context)
        else:
            reply = wire.Reply(job_id, code=outcome.code.value, error=str(outcome))
        self._queue(reply)

    def _check_idle(self) -> None:
        if not self._in_flight and self._idle is not None:
            self._idle.set()

    def _queue(self, reply: wire.Reply) -> None:
        """Hold replies briefly so they travel in batches.

        A lone job's reply goes at once; under load the batch goes when half
        the jobs this shard holds have answered, or after FLUSH_DELAY.
        """
        out = self._out
        out.append(reply)
        if len(out) * 2 >= len(out) + self._in_flight:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._flush)
        elif self._flush_timer is None:
            assert self._loop is not None
            self._flush_timer = self._loop.call_later(FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._out:
            out, self._out = self._out, []
            self._send(wire.Replies(replies=out))

    async def _control(self, message: wire.Control) -> None:
        data: Any = None
        try:
            if message.cmd == "workers":
                data = [msgspec.to_builtins(info) for info in self.pool.workers()]
            elif message.cmd == "reset":
                await self.pool.reset()
                data = "ok"
            elif message.cmd == "stats":
                data = self._figures()
            else:
                data = None
            self._queue(wire.Reply(message.id, data=data))
        except ShardpoolError as exc:
            self._queue(wire.Reply(message.id, code=exc.code.value, error=str(exc)))

    def _figures(self) -> dict[str, Any]:
        """The pool's figures for the broker's stats and metrics."""
        try:
            return {
                **self.pool.stats(),
                "shard_in_flight": self._in_flight,
                "shard_held": len(self.pool.queued()),
            }
        except Exception:  # figures are best effort; never let them stop heartbeats
            log.exception("shard %s: cannot gather pool figures", self.name)
            return {}

    # -- liveness --------------------------------------------------------------

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat)
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning(
                    "shard %s: serve (pid %d) is gone; stopping", self.name, self.parent_pid
                )
                self.stop()
                return
            self._send(wire.Heartbeat(stats=self._figures()))
            if loop.time() - self._last_heard > self.heartbeat * self.liveness:
                log.warning(
                    "shard %s: no word from the broker for %.1fs; reconnecting in %.1fs",
                    self.name,
                    loop.time() - self._last_heard,
                    self._backoff,
                )
                # linger 0: a closed socket that lingers would deliver its stale hello
                # once the broker is back, and a second hello reads as a reconnection
                # that fails every job the broker has just sent us.
                self._close(linger=0)
                self._forget_held()
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, _RECONNECT_MAX)
                self._open()
            else:
                self._backoff = 0.1
