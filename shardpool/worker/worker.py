"""One PHP worker: its frame channel, its jobs in flight and its state.

The frame channel is the worker's STDIN/STDOUT (pipes) or a socket it
dialled in on (tcp, unix); either way bytes arrive through
:class:`FrameProtocol` and frames are matched, in order, to the jobs written.
Jobs are answered strictly in order, so more than one may be in the pipe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import struct
import time
import zlib
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

import msgspec

from shardpool.errors import (
    AllocateError,
    EmptyPayloadError,
    ExecTTLError,
    ProtocolError,
    ShardpoolError,
    SoftJobError,
    StreamTimeoutError,
    WorkerCrashedError,
    WorkerStoppedError,
)
from shardpool.payload import Payload
from shardpool.protocol.decoder import DEFAULT_MAX_PAYLOAD, FrameDecoder, frame_start
from shardpool.protocol.frame import (
    CONTROL,
    ERROR,
    PING,
    STOP_COMMAND,
    STREAM,
    STREAM_PONG,
    STREAM_STOP,
    Frame,
    encode_control,
    job_header,
)
from shardpool.worker.busypoll import BusyPoll
from shardpool.worker.process import PhpProcess
from shardpool.worker.state import MARKS, TERMINAL, TRANSITIONS, WorkerState, check_transition

log = logging.getLogger("shardpool.worker")

STOP_REQUEST = b'{"stop":true}'
_GARBAGE_WINDOW = 0.1  # seconds to keep reading after bytes that are not a frame
_GARBAGE_MAX = 4096
_TTL_SLACK = 0.001  # loop timers tick in whole ms: a TTL this close to its end has ended
_WRITE_JOIN_LIMIT = 16384  # below this, one joined buffer beats writelines
_STREAM_HIGH_WATER = 64  # chunks queued before reading from the worker pauses
_END = object()
_REPLY_HEAD = struct.Struct("<BBIIBBI")  # the header, then the first option word
_JOB_B0 = 0x14  # version 1, header of 4 words: a job or reply with one option
_HEADERS: dict[tuple[int, int, int], bytes] = {}  # job headers by (context, body, codec)
_CRCS: dict[int, int] = {}  # verified reply header CRCs by size << 8 | flags


class JobFuture(Protocol):
    """Where a job's outcome goes: an ``asyncio.Future`` its caller awaits, or a
    stand-in that hands the outcome to a callback at once (``Pool.submit``)."""

    def done(self) -> bool: ...

    def set_result(self, result: Payload, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...

    def exception(self) -> BaseException | None: ...


class Job(msgspec.Struct, eq=False):
    """One job: its payload, the future its caller awaits and, once written,
    the worker running it. A pool may queue a Job before any worker is free.

    A msgspec Struct only to be built in C: one is made per job, and that
    costs about a quarter of what an ``__init__`` with eleven assignments
    does (130 against 480 ns here)."""

    payload: Payload
    future: JobFuture
    chunks: asyncio.Queue[object] | None = None  # stream consumer's queue; None for exec()
    ttl_seconds: float | None = None  # exec TTL: the worker is killed past it
    parts: list[Payload] | None = None  # exec() of a streamed reply
    ttl: float | None = None  # loop time its exec TTL runs out, once PHP has it
    queued_at: float = 0.0  # loop time the pool queued it, for allocate_timeout
    deadline: float = 0.0  # time.monotonic() past which it must not start (0: none)
    worker: Worker | None = None
    stopping: bool = False
    started: bool = False
    tag: int = 0  # the submitter's own (Pool.stream), to take it back while queued


def check_payload(payload: Payload) -> None:
    if not payload.body and not payload.context:
        raise EmptyPayloadError("a job needs a body or a context; both are empty")


async def stream_chunks(job: Job, stream_timeout: float) -> AsyncGenerator[Payload, None]:
    """Yield a streaming job's chunks; leaving early cancels the stream (STOP)."""
    chunks = job.chunks
    assert chunks is not None
    finished = False
    try:
        while True:
            worker = job.worker
            if worker is not None and worker._paused and chunks.qsize() < _STREAM_HIGH_WATER // 2:
                worker._resume_reading()
            item = await chunks.get()
            if item is _END:
                finished = True
                return
            if isinstance(item, BaseException):
                finished = True
                raise item
            assert isinstance(item, Payload)
            yield item
    finally:
        if not finished and job.worker is not None:
            await job.worker._cancel_stream(job, stream_timeout)


class FrameProtocol(asyncio.Protocol):
    """Feeds the bytes of a pipe or socket to a worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        # The transport calls the worker's own method: one Python call less
        # per read (uvloop looks data_received up once, when it is attached).
        self.data_received = worker.feed  # type: ignore[method-assign]

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.channel_lost(exc)


def jittered(max_jobs: int) -> int:
    """RoadRunner spreads max_jobs by 0-15 % so workers do not all restart at once."""
    return max_jobs + random.randint(0, max_jobs * 15 // 100) if max_jobs > 0 else 0


class Worker:
    """A PHP worker process ready to run jobs (after :meth:`handshake`).

    Create workers through a factory in :mod:`shardpool.ipc`, which spawns the
    process, connects the frame channel and does the handshake.
    """

    def __init__(self, process: PhpProcess, relay: str = "pipes", max_jobs: int = 0) -> None:
        self.process = process
        self.pid = process.pid
        self.relay = relay
        self.state = WorkerState.INACTIVE
        self.created_at = time.time()
        self.last_used = time.monotonic()
        self.jobs_done = 0
        self.max_jobs = jittered(max_jobs)
        self.loop = process.loop
        #: Resolves with the error that ended the worker (or None) once it is gone.
        self.done: asyncio.Future[ShardpoolError | None] = self.loop.create_future()
        self._decoder = FrameDecoder()
        self._pending: collections.deque[Job] = collections.deque()
        self._transport: asyncio.WriteTransport | None = None
        self._reader: asyncio.ReadTransport | None = None
        self._handshake: asyncio.Future[Frame] | None = None
        self._garbage: bytearray | None = None
        self._error: ShardpoolError | None = None
        self._paused = False
        self._killed = False
        #: The exec TTL timer (one per worker, see _arm_ttl) and when it fires.
        self._ttl_timer: asyncio.TimerHandle | None = None
        self._ttl_due = 0.0
        #: Frames of jobs pipelined behind a busy one, written together at the
        #: end of the loop pass: one write() and one PHP wake-up for them all.
        self._wbuf: list[bytes] = []
        #: Called (synchronously) once jobs complete (once per read, for all
        #: the replies in it), so a pool can write the next jobs before any
        #: waiting coroutine runs.
        self.on_free: Callable[[Worker], None] | None = None
        #: Set by a pool that is replacing this worker: it gets no new jobs.
        self.retiring = False
        #: Loop time the job now at the head of the pipe started, and a moving
        #: average of job service times (for auto pipelining).
        self.head_since = 0.0
        self.service_ewma = 0.0
        #: The loop's busy polling (set by a pool with ``busy_poll``; None: off).
        self.busy_poll: BusyPoll | None = None
        #: Why this worker ends (the first cause wins): "max_jobs", "exec_ttl",
        #: "stop_request", "crashed", ... (see shardpool.pool.lifecycle).
        self.end_reason: str | None = None
        process.add_exit_callback(self._process_exited)

    # -- state ---------------------------------------------------------------

    def transition(self, new: WorkerState) -> None:
        if new is not self.state:
            check_transition(self.state, new)
            self.state = new

    def set_end_reason(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason

    def _try_transition(self, new: WorkerState) -> bool:
        """Change state if the table allows it (for events that may race an ending)."""
        if new in TRANSITIONS[self.state]:
            self.state = new
            return True
        return False

    @property
    def in_flight(self) -> int:
        """Jobs written to this worker and not yet answered."""
        return len(self._pending)

    @property
    def closing(self) -> bool:
        """The frame channel is closed or closing: the worker is going away."""
        return self._transport is None or self._transport.is_closing()

    @property
    def streaming(self) -> bool:
        """True while the job at the head of the pipe is a stream."""
        return bool(self._pending) and self._pending[0].chunks is not None

    @property
    def alive(self) -> bool:
        return self._error is None and self.state not in TERMINAL

    @property
    def error(self) -> ShardpoolError | None:
        """Why the worker can no longer serve, once it cannot."""
        return self._error

    def __repr__(self) -> str:
        return f"<Worker pid={self.pid} {self.state.value} jobs={self.jobs_done}>"

    # -- channel -------------------------------------------------------------

    def attach(self, transport: asyncio.WriteTransport, reader: asyncio.ReadTransport) -> None:
        self._transport = transport
        self._reader = reader

    async def handshake(self, timeout: float) -> None:
        """Send our pid, expect the worker's; fail with the cause within ``timeout``."""
        if self._error is not None:  # it died (and was reaped) before we got here
            raise self._error
        self._handshake = self.loop.create_future()
        self._write(encode_control(json.dumps({"pid": os.getpid()}).encode()))
        try:
            async with asyncio.timeout(timeout):
                frame = await self._handshake
                pid = parse_pid_reply(frame)
        except TimeoutError:
            self.kill()
            raise self._fail_boot(
                f"worker pid {self.pid} did not answer the handshake within {timeout:g}s"
            ) from None
        except ShardpoolError as exc:
            if self._error is None:
                self._finish(exc)
            self.kill()
            await self._wait_dead(1.0)
            raise (self._error or exc) from None
        if pid != self.pid and self.relay == "pipes":
            self.kill()
            raise self._fail_boot(
                f"worker handshake reported pid {pid}, but the spawned process is {self.pid}; "
                "run PHP directly (or exec it from a wrapper script)"
            )
        self.transition(WorkerState.READY)

    def adopt(self, decoder: FrameDecoder, frames: list[Frame]) -> None:
        """Take over a connection's decoder (and any frames after the handshake)."""
        decoder.max_payload = DEFAULT_MAX_PAYLOAD
        self._decoder = decoder
        for frame in frames:
            self._on_frame(frame)

    def paired(self) -> None:
        """A socket factory finished the handshake for us."""
        self.transition(WorkerState.READY)

    def _fail_boot(self, message: str) -> ShardpoolError:
        error = AllocateError(message)
        self._finish(error)
        return error

    def feed(self, data: bytes) -> None:
        # Fast path: plain replies (no control, error or stream flag), whole in
        # this read, nothing buffered: no Frame object, no generic dispatch.
        # A pipelined worker's read often holds several of them.
        busy_poll = self.busy_poll
        if busy_poll is not None and busy_poll.asleep:
            busy_poll.woke(self.head_since)
        pos, end = 0, len(data)
        pending = self._pending
        if self._garbage is None and not self._decoder._buf:
            while end - pos >= 16 and data[pos] == _JOB_B0 and pending:
                _, flags, size, crc, stream, _, n = _REPLY_HEAD.unpack_from(data, pos)
                frame_end = pos + 16 + size
                if (
                    frame_end > end
                    or stream
                    or flags & (CONTROL | ERROR)
                    or (n and n >= size)  # context only: maybe a stop request
                ):
                    break  # the generic path decides
                # Bytes 0-5 are the version byte (checked), flags and size, so
                # a CRC once verified for them holds for every such header:
                # a lookup costs a third of a crc32 of a slice.
                key = size << 8 | flags
                if _CRCS.get(key) != crc:
                    if zlib.crc32(data[pos : pos + 6]) != crc:
                        break  # the generic path reports it
                    if len(_CRCS) > 4096:
                        _CRCS.clear()
                    _CRCS[key] = crc
                body_at = pos + 16 + n
                reply = Payload(data[body_at:frame_end], data[pos + 16 : body_at], flags)
                pos = frame_end
                self._complete(pending[0], reply)
            if pos:
                self._freed()
        if pos < end:
            self._feed(data[pos:] if pos else data)

    def _feed(self, data: bytes) -> None:
        if self._garbage is not None:
            if len(self._garbage) < _GARBAGE_MAX:
                self._garbage += data
            return
        try:
            frames = self._decoder.feed(data)
        except ProtocolError:
            self._start_garbage()
            return
        for frame in frames:
            self._on_frame(frame)

    def channel_lost(self, exc: Exception | None) -> None:
        if self._garbage is not None:
            self._garbage_done()
            return
        if self._error is None:
            # The worker closed its end: it died or is dying. Wait for its exit
            # status so the error can say how it died.
            self.loop.call_later(1.0, self._exit_overdue)

    def _exit_overdue(self) -> None:
        if self.process.returncode is None:
            self.kill()

    def _process_exited(self, code: int) -> None:
        self.loop.create_task(self._died())

    async def _died(self) -> None:
        await self.process.stderr_drained()
        if self._garbage is not None:
            self._garbage_done()
            return
        if self._decoder.buffered and self.process.returncode == 0:
            # It exited on its own in the middle of a frame: show what it did write.
            try:
                self._decoder.eof()
            except ProtocolError as exc:
                self._finish(ProtocolError(f"{self.process.describe_exit()}: {exc}"))
                return
        if self.state in (WorkerState.STOPPING, WorkerState.STOPPED) and not self._pending:
            self._finish(None)
        elif self.state is WorkerState.STOPPING:
            # Asked to stop, but it died with jobs unanswered: that is a crash.
            self._finish(WorkerCrashedError(self.process.describe_exit()), WorkerState.STOPPED)
        elif self._killed and self.state is not WorkerState.INACTIVE:
            # Killed on purpose (exec TTL, stream timeout, stop timeout): jobs
            # still in flight fail, but the worker did not crash.
            self._finish(WorkerCrashedError(self.process.describe_exit()), WorkerState.STOPPED)
        elif self.state is WorkerState.INACTIVE:
            self.set_end_reason("boot_failed")
            self._finish(AllocateError(f"worker failed at boot: {self.process.describe_exit()}"))
        else:
            # Under a job it crashed; idle, it exited on its own (flapping, if at once).
            self.set_end_reason("crashed" if self._pending else "exited")
            self._finish(WorkerCrashedError(self.process.describe_exit()))

    # -- STDOUT garbage --------------------------------------------------------

    def _start_garbage(self) -> None:
        self._garbage = bytearray(self._decoder.bad_bytes[:_GARBAGE_MAX])
        self.set_end_reason("stdout_garbage")
        self._try_transition(WorkerState.INVALID)
        self.loop.call_later(_GARBAGE_WINDOW, self._garbage_done)

    def _garbage_done(self) -> None:
        if self._error is not None or self._garbage is None:
            return
        raw = bytes(self._garbage)
        text = raw[: frame_start(raw)].decode("utf-8", "replace")
        self._finish(garbage_error(self.pid, self.relay, text))
        self.kill()

    # -- jobs ----------------------------------------------------------------

    async def exec(self, payload: Payload, timeout: float | None = None) -> Payload:
        """Run one job; return the reply (a streamed reply comes back joined).

        Raises :class:`SoftJobError` with the worker's text, :class:`ExecTTLError`
        after ``timeout`` seconds (the worker is killed), :class:`WorkerCrashedError`,
        :class:`WorkerStoppedError` for a stop request, :class:`ProtocolError`.
        """
        future: asyncio.Future[Payload] = self.loop.create_future()
        self.start(Job(payload, future, None, timeout))
        return await future

    async def stream(
        self, payload: Payload, timeout: float | None = None, stream_timeout: float = 10.0
    ) -> AsyncGenerator[Payload, None]:
        """Yield the chunks of a streamed reply, the last one included.

        Leaving the loop early sends STOP; the worker must end its stream within
        ``stream_timeout`` or it is killed.
        """
        job = Job(payload, self.loop.create_future(), asyncio.Queue(), timeout)
        self.start(job)
        # aclosing: leaving our loop early must cancel the stream before we return.
        async with contextlib.aclosing(stream_chunks(job, stream_timeout)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _cancel_stream(self, job: Job, stream_timeout: float) -> None:
        if job.future.done() or self._error is not None:
            return
        job.stopping = True
        self._resume_reading()
        self._write(STREAM_STOP)
        try:
            async with asyncio.timeout(stream_timeout):
                assert isinstance(job.future, asyncio.Future)  # a stream's caller awaits it
                await asyncio.shield(job.future)
        except TimeoutError:
            log.warning(
                "worker pid %d did not end a cancelled stream in %gs", self.pid, stream_timeout
            )
            self.set_end_reason("stream_timeout")
            self._finish_job(
                job,
                StreamTimeoutError(
                    f"worker pid {self.pid} did not end its stream within {stream_timeout:g}s "
                    "after STOP; it was killed"
                ),
            )
            self.kill()
        except ShardpoolError:
            pass

    def start(self, job: Job) -> None:
        """Write ``job`` to the worker now; its future resolves with the reply."""
        state = self.state
        transport = self._transport
        payload = job.payload
        body, context = payload.body, payload.context
        if (
            self._error is not None
            or (state is not _READY and state is not _WORKING and state not in MARKS)
            or transport is None
            or transport.is_closing()
            or not (body or context)
        ):
            self._refuse(job)
        # Write first: PHP starts on the job while we do the bookkeeping.
        key = (len(context), len(body), payload.codec)
        header = _HEADERS.get(key)
        if header is None:
            if len(_HEADERS) > 4096:
                _HEADERS.clear()
            header = _HEADERS[key] = job_header(key[0], key[1], key[2])
        assert transport is not None
        if key[1] >= _WRITE_JOIN_LIMIT:
            self._flush_writes()
            transport.writelines((header, context, body))
        elif self._pending:
            # PHP is busy with an earlier job: gather this pass's frames into
            # one write, which PHP reads in one go when it gets to them.
            if not self._wbuf:
                self.loop.call_soon(self._flush_writes)
            self._wbuf.append(b"".join((header, context, body)))
        else:
            # One allocation; a concatenation costs less than a join.
            transport.write(b"".join((header, context, body)) if context else header + body)
        job.worker = self
        busy_poll = self.busy_poll
        if not self._pending:
            self.head_since = now = time.monotonic()
            if busy_poll is not None:
                busy_poll.kick(now)
            if job.ttl_seconds is not None:
                self._arm_ttl(job)
            if state is _READY:
                self.state = _WORKING
        elif busy_poll is not None:
            busy_poll.saturated()
        self._pending.append(job)

    def _refuse(self, job: Job) -> None:
        """Raise the reason ``start`` cannot take ``job`` (the slow path)."""
        if self._error is not None:
            raise type(self._error)(str(self._error))
        if self.state not in _ACCEPTING:
            raise WorkerCrashedError(
                f"worker pid {self.pid} is {self.state.value}; it takes no jobs"
            )
        transport = self._transport
        if transport is None or transport.is_closing():
            # The worker is dying (its pipe closed) but its last replies may
            # still be unread: refuse the job so it can run elsewhere.
            exc = WorkerCrashedError(f"worker pid {self.pid} closed its pipe; it takes no jobs")
            exc.job_started = False
            raise exc
        raise EmptyPayloadError("a job needs a body or a context; both are empty")

    def _on_frame(self, frame: Frame) -> None:
        if frame.flags & CONTROL:
            if self._handshake is not None and not self._handshake.done():
                self._handshake.set_result(frame)
            else:
                log.warning(
                    "worker pid %d sent an unexpected control frame: %r",
                    self.pid,
                    frame.payload[:200],
                )
            return
        if not self._pending:
            self._protocol_violation(f"sent a reply with no job in flight: {frame.payload[:200]!r}")
            return
        job = self._pending[0]
        job.started = True
        reply = self._reply(frame)
        if reply is None:
            return
        if frame.stream & STREAM and not isinstance(reply, BaseException):
            if frame.stream & PING:
                self._write(STREAM_PONG)
            self._chunk(job, reply)
            return
        self._complete(job, reply)
        self._freed()

    def _complete(self, job: Job, reply: Payload | ShardpoolError) -> None:
        """The job at the head of the pipe got its final reply."""
        future = job.future
        if job.chunks is None and job.parts is None and not future.done():
            # The common case first: wake the caller before the bookkeeping.
            if isinstance(reply, Payload):
                future.set_result(reply)
            else:
                future.set_exception(reply)
            job.ttl = None
            done = True
        else:
            done = False
        job.started = True
        pending = self._pending
        pending.popleft()
        jobs_done = self.jobs_done = self.jobs_done + 1
        now = time.monotonic()  # not loop.time(): uvloop's clock ticks in milliseconds
        self.last_used = now
        took, ewma = now - self.head_since, self.service_ewma
        if not ewma:
            self.service_ewma = took  # the first job's time starts it
        else:
            # One job far slower than usual moves the average a little (a sample
            # counts for at most 4x the average); a lasting change, within ~10 jobs.
            if took > 4 * ewma:
                took = 4 * ewma
            self.service_ewma = ewma + (took - ewma) * 0.1
        self.head_since = now
        if pending:
            if pending[0].ttl_seconds is not None:
                self._arm_ttl(pending[0])  # exec TTL counts from when PHP starts the job
        elif self.state is _WORKING:
            self.state = _READY
            if self.max_jobs and jobs_done >= self.max_jobs:
                self.state = WorkerState.MAX_JOBS_REACHED
        # (A Payload is told apart by its exact type: isinstance against an
        # exception class walks the MRO, and this runs once per job.)
        if reply.__class__ is not Payload and isinstance(reply, WorkerStoppedError):
            self.set_end_reason("stop_request")
            self._try_transition(WorkerState.INVALID)
        if not done:
            if job.chunks is not None and not isinstance(reply, BaseException):
                self._chunk(job, reply)
                self._finish_job(job, _END)
            else:
                self._finish_job(job, reply)
            if self._paused:
                # A stream's reader paused for a slow consumer, and its final
                # frame came in the same read: that backlog is this job's alone,
                # and the next job's reply must be read.
                self._resume_reading()

    def _freed(self) -> None:
        """Jobs completed: the pool may write the next ones at once. Called once
        per read for all the plain replies in it, so a pipelined worker's freed
        room is refilled in one go."""
        on_free = self.on_free
        if on_free is None:
            return
        try:
            on_free(self)
        except Exception:  # never let a pool bug tear down the worker's channel
            log.exception("worker pid %d: on_free callback failed", self.pid)
        if self._wbuf:
            # The jobs just written behind a busy one go out now, not after the
            # callers these replies woke have run.
            self._flush_writes()

    def _reply(self, frame: Frame) -> Payload | ShardpoolError | None:
        data = frame.payload
        if frame.flags & ERROR:
            return SoftJobError(data.decode("utf-8", "replace"))
        n = frame.options[0] if frame.options else 0
        if n > len(data):
            self._protocol_violation(
                f"reply context length {n} exceeds its payload of {len(data)} bytes"
            )
            return None
        if n == 0:
            return Payload(data, b"", frame.flags)
        context = data[:n]
        if n == len(data) and context == STOP_REQUEST:
            return WorkerStoppedError(f"worker pid {self.pid} asked to be replaced (stop request)")
        return Payload(data[n:], context, frame.flags)

    def _chunk(self, job: Job, chunk: Payload) -> None:
        if job.stopping:
            return  # the consumer left; drain until the stream ends
        if job.chunks is not None:
            job.chunks.put_nowait(chunk)
            if job.chunks.qsize() >= _STREAM_HIGH_WATER and self._reader is not None:
                self._reader.pause_reading()
                self._paused = True
        elif job.parts is None:
            job.parts = [chunk]
        else:
            job.parts.append(chunk)

    def _resume_reading(self) -> None:
        if self._paused and self._reader is not None:
            self._paused = False
            self._reader.resume_reading()

    def _finish_job(self, job: Job, result: object) -> None:
        job.ttl = None
        if job.future.done():
            return
        if job.chunks is not None:
            job.chunks.put_nowait(result)
            if isinstance(result, BaseException):
                job.future.set_exception(result)
                job.future.exception()  # the stream consumer reports it
            else:
                job.future.set_result(Payload())
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        elif job.parts is not None:
            assert isinstance(result, Payload)
            parts = [*job.parts, result]
            job.future.set_result(
                Payload(b"".join(p.body for p in parts), parts[0].context, result.codec)
            )
        else:
            assert isinstance(result, Payload)
            job.future.set_result(result)

    def _arm_ttl(self, job: Job) -> None:
        """Start ``job``'s exec TTL, now that it is at the head of the pipe.

        One timer per worker, not one per job: a timer already due no later
        than this deadline stays, and re-arms for the head job when it fires.
        Creating and cancelling a timer for every job cost more than the rest
        of a job's bookkeeping when every job carries a timeout (the service).
        """
        assert job.ttl_seconds is not None
        deadline = job.ttl = self.loop.time() + job.ttl_seconds
        timer = self._ttl_timer
        if timer is None or self._ttl_due > deadline:
            if timer is not None:
                timer.cancel()
            self._ttl_due = deadline
            self._ttl_timer = self.loop.call_at(deadline, self._ttl_check)

    def _ttl_check(self) -> None:
        self._ttl_timer = None
        if not self._pending or self._error is not None:
            return
        job = self._pending[0]
        if job.ttl is None or job.ttl_seconds is None:
            return
        if job.ttl - self.loop.time() > _TTL_SLACK:
            self._ttl_due = job.ttl
            self._ttl_timer = self.loop.call_at(job.ttl, self._ttl_check)
            return
        self._exec_ttl_reached(job, job.ttl_seconds)

    def _exec_ttl_reached(self, job: Job, timeout: float) -> None:
        if job.future.done() or self._error is not None:
            return
        self._try_transition(WorkerState.EXEC_TTL_REACHED)
        self.set_end_reason("exec_ttl")
        self._finish_job(
            job,
            ExecTTLError(
                f"job ran longer than its exec TTL of {timeout:g}s; "
                f"worker pid {self.pid} was killed"
            ),
        )
        self.kill()

    def _protocol_violation(self, what: str) -> None:
        self.set_end_reason("protocol_error")
        self._try_transition(WorkerState.INVALID)
        self._finish(ProtocolError(f"worker pid {self.pid} {what}"))
        self.kill()

    # -- ending --------------------------------------------------------------

    def _finish(self, error: ShardpoolError | None, state: WorkerState | None = None) -> None:
        """The worker can serve no more: answer every job in flight, once."""
        if self._error is not None:
            return
        self._error = error or WorkerCrashedError(f"worker pid {self.pid} was stopped")
        if self._ttl_timer is not None:
            self._ttl_timer.cancel()
            self._ttl_timer = None
        handshake = self._handshake
        if handshake is not None and not handshake.done():
            handshake.set_exception(self._error)
            handshake.exception()
        first = True
        while self._pending:
            job = self._pending.popleft()
            if first or job.started:
                exc: ShardpoolError = type(self._error)(str(self._error))
            else:
                # Queued behind the failing job: PHP never read it; safe to retry.
                exc = WorkerCrashedError(f"worker pid {self.pid} died before starting the job")
                exc.job_started = False
            first = False
            self._finish_job(job, exc)
        if state is None:
            state = WorkerState.STOPPED if error is None else WorkerState.ERRORED
        self._try_transition(state)
        if self._transport is not None:
            self._transport.close()
        if self.process.returncode is not None:
            self._set_done()
        else:
            self.process.add_exit_callback(lambda _code: self._set_done())

    def _set_done(self) -> None:
        if not self.done.done():
            ended_well = self.state is WorkerState.STOPPED and not self._killed
            self.done.set_result(None if ended_well else self._error)

    def _write(self, data: bytes) -> None:
        self._flush_writes()  # frames keep their order
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _flush_writes(self) -> None:
        buf = self._wbuf
        if buf:
            data = buf[0] if len(buf) == 1 else b"".join(buf)
            buf.clear()
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(data)

    async def _wait_dead(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.process.exited), timeout)
        except TimeoutError:
            self.kill()
            await self.process.exited
        await self.process.stderr_drained()
        if not self.done.done():
            await self.done

    async def stop(self, timeout: float = 60.0) -> None:
        """Stop gracefully: jobs already written finish, then the worker exits.

        Sends the stop command; kills the worker if it has not exited within
        ``timeout`` seconds.
        """
        if (
            self.process.returncode is None
            and self._error is None
            and self._try_transition(WorkerState.STOPPING)  # not one being killed (exec TTL)
        ):
            self._write(STOP_COMMAND)
        try:
            await asyncio.wait_for(asyncio.shield(self.process.exited), timeout)
        except TimeoutError:
            log.warning("worker pid %d did not stop within %gs; killing it", self.pid, timeout)
            self.kill()
        await self._wait_dead(5.0)

    def kill(self) -> None:
        """SIGKILL the worker now; jobs in flight fail with a typed error."""
        self._killed = True
        self.process.kill()

    async def destroy(self, timeout: float = 60.0) -> None:
        """Stop (gracefully, up to ``timeout``) and mark the worker destroyed."""
        await self.stop(timeout)
        self.transition(WorkerState.DESTROYED)

    def on_done(self, callback: Callable[[Worker], None]) -> None:
        self.done.add_done_callback(lambda _f: callback(self))


_ACCEPTING = frozenset({WorkerState.READY, WorkerState.WORKING}) | MARKS
_READY = WorkerState.READY
_WORKING = WorkerState.WORKING


def parse_pid_reply(frame: Frame) -> int:
    """The pid in a worker's handshake reply (CONTROL, JSON ``{"pid": N}``)."""
    if not frame.flags & CONTROL:
        raise ProtocolError(f"expected a handshake control frame, got flags {frame.flags:#x}")
    try:
        pid = json.loads(frame.payload)["pid"]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError(f"invalid handshake reply: {frame.payload[:200]!r}") from None
    if not isinstance(pid, int) or pid <= 0:
        raise ProtocolError(f"invalid pid in handshake reply: {frame.payload[:200]!r}")
    return pid


def garbage_error(pid: int, relay: str, text: str) -> ShardpoolError:
    """The error for bytes that are not frames, naming the likely cause."""
    shown = text.strip()
    if shown.startswith("Could not open input file"):
        return AllocateError(f"PHP could not find the worker script: {shown}")
    where = "STDOUT" if relay == "pipes" else f"its {relay} relay"
    return ProtocolError(
        f"worker pid {pid} wrote bytes that are not a goridge frame to {where}: {shown!r}. "
        "A worker must not print to STDOUT (echo, print, var_dump); log to STDERR instead"
    )
