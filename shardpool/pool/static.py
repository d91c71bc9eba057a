"""The static pool: RoadRunner's pool semantics on one asyncio (uvloop) loop.

Jobs go straight to an idle worker when there is one; otherwise they wait in
a bounded queue, and a worker that finishes a job takes the next queued one
inside the same callback that delivered its reply, so the PHP process is
never left idle while Python wakes the waiting coroutines.

Error kinds decide a worker's fate in one place (:meth:`Pool._run`): a soft
error keeps it; a stop request retires it and runs the job again elsewhere;
a crash replaces it; an exec TTL has already killed it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgspec

from shardpool.config import PoolConfig, pool_config, to_builtins
from shardpool.errors import (
    AllocateError,
    JobTimeoutError,
    NoFreeWorkersError,
    PoolClosedError,
    QueueFullError,
    ShardpoolError,
    UnavailableError,
    WorkerStoppedError,
)
from shardpool.ipc import factory_for
from shardpool.payload import Payload
from shardpool.pool.allocator import DynamicAllocator
from shardpool.pool.lifecycle import REASON_BY_STATE, Lifecycle
from shardpool.pool.supervisor import Supervisor, rss_bytes
from shardpool.worker.busypoll import BusyPoll, may_spin
from shardpool.worker.fdlimit import make_room_for
from shardpool.worker.state import MARKS, WorkerState
from shardpool.worker.worker import Job, Worker, check_payload, stream_chunks

log = logging.getLogger("shardpool.pool")

AUTO_MAX_DEPTH = 4  # pipeline_depth: auto writes up to this many jobs into one pipe
AUTO_SLOW_FACTOR = 8.0  # ... but none behind a job running 8x longer than usual
AUTO_SLOW_MIN = 0.001  # seconds; below this, scheduling hiccups dominate
MAX_RETRIES = 10
_READY = WorkerState.READY
_WORKING = WorkerState.WORKING  # a job re-run after stop requests / unstarted failures, at most
_BACKOFF_START = 0.1
_BACKOFF_MAX = 5.0


def retryable(exc: ShardpoolError) -> bool:
    """A stop request, or a job that never reached PHP: safe to run elsewhere
    (unless it is past its deadline: then it must never run)."""
    return isinstance(exc, WorkerStoppedError) or not (
        exc.job_started or isinstance(exc, JobTimeoutError)
    )


def _outcome(task: asyncio.Future[Payload]) -> Payload | ShardpoolError:
    if task.cancelled():
        return PoolClosedError("the job was cancelled")
    exc = task.exception()
    if exc is None:
        return task.result()
    if isinstance(exc, ShardpoolError):
        return exc
    return ShardpoolError(f"internal error: {exc!r}")


def _at_most(ttl: float | None, left: float | None) -> float | None:
    """An exec TTL cut to the time left before a deadline (None: no limit)."""
    if left is None:
        return ttl
    left = max(left, 0.001)
    return left if ttl is None else min(ttl, left)


def _never_ran() -> JobTimeoutError:
    return JobTimeoutError("the job's deadline passed while it waited for a worker; it never ran")


@dataclasses.dataclass(slots=True)
class _DebugState:
    """Debug mode's own bookkeeping (a fresh worker per job), in one record:
    the pool's hot path reads its other attributes once per job, and CPython
    keeps an object's attributes in its fast layout only up to 30 of them."""

    workers: set[Worker] = dataclasses.field(default_factory=set)
    spawns: set[asyncio.Future[Worker]] = dataclasses.field(default_factory=set)
    #: At most num_workers debug jobs run at once; the rest wait in ``waiters``.
    running: int = 0
    waiters: collections.deque[asyncio.Future[None]] = dataclasses.field(
        default_factory=collections.deque
    )


class Submission(msgspec.Struct, eq=False):
    """A job handed to :meth:`Pool.submit`: callback-driven, with the retry
    rules of :meth:`Pool.exec`.

    It stands in for the job's future: the worker hands it the outcome, and
    a result goes to the callback at once, with no future and no extra pass
    of the event loop per job. A retry is scheduled, not run inside the
    worker's I/O callback. While the job waits for a worker it can be taken
    back (:meth:`Pool.withdraw`); its ``deadline`` goes on each attempt's Job,
    which the pool never starts past it. ``tag`` is the submitter's own, to
    tell its jobs apart.
    """

    pool: Pool
    payload: Payload
    callback: Callable[[Payload | ShardpoolError], None]
    ttl: float | None
    deadline: float = 0.0  # time.monotonic(); 0: none
    tag: int = 0
    attempts: int = 0
    finished: bool = False

    def start(self) -> None:
        self.attempts += 1
        try:
            self.pool._submit(Job(self.payload, self, None, self.ttl, deadline=self.deadline))
        except ShardpoolError as exc:
            self.finished = True
            self.callback(exc)

    # -- the part of asyncio.Future that workers and the pool use ---------------

    def done(self) -> bool:
        return self.finished

    def exception(self) -> BaseException | None:
        # The pool calls this only to mark a stream's error as retrieved, and
        # streams never come through submit(): an outcome goes to the callback.
        return None

    def set_exception(self, exception: BaseException, /) -> None:
        self.finished = True
        error = exception
        if not isinstance(error, ShardpoolError):
            error = ShardpoolError(f"internal error: {exception!r}")
        pool = self.pool
        if retryable(error) and self.attempts < MAX_RETRIES and not pool._closing:
            again = Submission(
                pool, self.payload, self.callback, self.ttl, self.deadline, self.tag, self.attempts
            )
            pool._running_loop().call_soon(again.start)
            return
        self._call(error)

    def _call(self, outcome: Payload | ShardpoolError, /) -> None:
        """Hand the outcome to the callback. It runs inside a worker's I/O
        callback: a failing callback must not leave the worker's bookkeeping
        half done."""
        self.finished = True
        try:
            self.callback(outcome)
        except Exception:
            log.exception("a job's callback failed")

    # A result goes straight to the callback, with no call in between (this
    # runs once per job).
    set_result = _call


class WorkerInfo(msgspec.Struct, frozen=True):
    """One worker as :meth:`Pool.workers` reports it."""

    pid: int
    state: str
    jobs: int
    in_flight: int
    created_at: float  # seconds since the epoch
    memory: int  # resident set size, bytes
    busy_for: float = 0.0  # seconds the job now at the head of its pipe has run; 0 when idle


class Pool:
    """A static pool of PHP workers.

    >>> async with Pool(pool_config(num_workers=2)) as pool:   # doctest: +SKIP
    ...     reply = await pool.exec(Payload(b"hello"))
    """

    def __init__(self, config: PoolConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = pool_config(**overrides)
        elif overrides:
            config = pool_config(to_builtins(config), **overrides)
        self.config = config
        self._factory = factory_for(config.relay)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy_poll: BusyPoll | None = None
        self._workers: list[Worker] = []
        self._idle: list[Worker] = []  # LIFO: extra workers stay idle and get removed
        self._queue: collections.deque[Job] = collections.deque()
        self._target = 0 if config.debug else config.num_workers
        self._spawning = 0
        self._spawn_failures = 0
        self._quick_deaths = 0  # workers in a row that died before finishing a job
        self._started = False
        self._closing = False
        self._ttl = config.supervisor.exec_ttl or None
        self._auto = config.pipeline_depth == "auto"
        self._slow = AUTO_SLOW_MIN
        self._slow_calls = 0
        self._depth: int = AUTO_MAX_DEPTH if self._auto else int(config.pipeline_depth)
        self._supervisor = Supervisor(self)
        self.lifecycle = Lifecycle()
        self._allocator = DynamicAllocator(self, config.dynamic_allocator)
        self._dynamic = config.dynamic_allocator is not None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed: asyncio.Event | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._destroyed: asyncio.Future[None] | None = None
        self._debug = _DebugState()

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.destroy()

    async def start(self) -> None:
        """Spawn ``num_workers`` workers in parallel; fail with the cause if one cannot start."""
        if self._started:
            raise ShardpoolError("the pool is already started")
        self._loop = asyncio.get_running_loop()
        if self.config.busy_poll and may_spin():
            self._busy_poll = BusyPoll(self._loop, float(self.config.busy_poll))
        self._changed = asyncio.Event()
        self._started = True
        extra = self.config.dynamic_allocator
        make_room_for(self.config.num_workers + (extra.max_workers if extra else 0))
        results = await asyncio.gather(
            *(self._spawn() for _ in range(self._target)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.destroy()
            raise errors[0]
        self._supervisor.start()

    async def destroy(self) -> None:
        """Let jobs in flight finish (up to ``destroy_timeout``), then stop every worker.

        Queued jobs and jobs arriving later fail with :class:`PoolClosedError`.
        """
        if self._destroyed is not None:
            await asyncio.shield(self._destroyed)  # a second call returns when the first is done
            return
        self._destroyed = asyncio.get_running_loop().create_future()
        try:
            await self._destroy()
        finally:
            self._destroyed.set_result(None)

    async def _destroy(self) -> None:
        self._closing = True
        self._supervisor.stop()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        closed = PoolClosedError("the pool was destroyed before the job started")
        while self._queue:
            self._fail(self._queue.popleft(), closed)
        while self._debug.waiters:  # debug jobs waiting for a turn
            turn = self._debug.waiters.popleft()
            if not turn.done():
                turn.set_exception(closed)
        self._idle.clear()
        timeout = self.config.destroy_timeout
        await asyncio.gather(*self._debug.spawns, return_exceptions=True)
        workers = [*self._workers, *self._debug.workers]
        await asyncio.gather(*(w.destroy(timeout) for w in workers))
        # Spawns still under way: cancelling them kills their processes.
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._factory.close()

    # -- jobs ------------------------------------------------------------------

    async def exec(self, payload: Payload | bytes, timeout: float | None = None) -> Payload:
        """Run one job on a free worker and return its reply.

        ``timeout`` is this job's exec TTL, never longer than ``supervisor.exec_ttl``
        (the operator's limit; the default): past it the worker is killed and
        :class:`ExecTTLError` raised. Waiting
        for a free worker is bounded by ``allocate_timeout``.
        """
        if isinstance(payload, bytes):
            payload = Payload(payload)
        if self.config.debug:
            return await self._exec_debug(payload, timeout)
        loop = self._loop  # the hot path: no call
        if loop is None:
            loop = self._running_loop()  # raises, naming the cause
        ttl = self._ttl if timeout is None else self._ttl_for(timeout)
        for _ in range(MAX_RETRIES):
            future: asyncio.Future[Payload] = loop.create_future()
            job = Job(payload, future, None, ttl)
            self._submit(job)
            try:
                return await future
            except ShardpoolError as exc:
                if not retryable(exc):
                    raise
            except asyncio.CancelledError:
                self._forget(job)
                raise
        raise WorkerStoppedError(f"the job was refused by {MAX_RETRIES} workers in a row")

    def submit(
        self,
        payload: Payload,
        callback: Callable[[Payload | ShardpoolError], None],
        timeout: float | None = None,
        *,
        deadline: float = 0.0,
        tag: int = 0,
    ) -> Submission:
        """Run a job and call ``callback`` with its reply or typed error.

        The same semantics as :meth:`exec` (re-runs after stop requests, one
        answer per job) without a coroutine or a future per job: a shard uses
        this to serve a batch of jobs from the broker. The callback runs as
        soon as the reply is read, inside the pool's I/O handling: it must not
        block (it may submit more jobs). An exception it raises is logged.

        ``deadline`` (on the clock of ``time.monotonic()``; 0: none) bounds
        the wait for a worker: a job still queued then is answered with
        :class:`JobTimeoutError` and never started. Jobs still queued can be
        taken back with :meth:`withdraw`; ``tag`` is yours, to tell them
        apart. In debug mode (a fresh worker per job) the deadline bounds the
        wait for a worker as well, but jobs cannot be withdrawn.
        """
        submission = Submission(self, payload, callback, self._ttl_for(timeout), deadline, tag)
        if self.config.debug:
            submission.finished = True  # a debug job cannot be withdrawn
            task = asyncio.ensure_future(self._exec_debug(payload, timeout, deadline))
            task.add_done_callback(lambda t: callback(_outcome(t)))
            return submission
        submission.start()
        return submission

    @property
    def progress(self) -> int:
        """A count that changes whenever a worker finishes a job (jobs done by
        the workers now in the pool): to tell a pool that moves from a stuck one."""
        return sum(w.jobs_done for w in self._workers)

    def queued(self) -> list[Submission]:
        """The jobs from :meth:`submit` that wait for a worker, oldest first."""
        return [
            job.future
            for job in self._queue
            if isinstance(job.future, Submission) and not job.future.finished
        ]

    def expire_queued(self) -> float:
        """Answer the queued jobs (from :meth:`submit` or :meth:`stream`) whose
        deadline has passed (:class:`JobTimeoutError`; they never run), at once
        rather than when a worker frees up. Returns the earliest deadline still
        queued (0: none)."""
        kept: collections.deque[Job] = collections.deque()
        earliest = 0.0
        for job in self._queue:
            deadline = job.deadline
            if job.future.done() or (deadline and self._overdue(job)):
                continue  # its caller left, or it has just been answered
            kept.append(job)
            if deadline and (not earliest or deadline < earliest):
                earliest = deadline
        if len(kept) < len(self._queue):
            self._queue.clear()
            self._queue.extend(kept)
        return earliest

    def withdraw(self, which: Callable[[Submission], bool] | None = None) -> list[Submission]:
        """Take back queued jobs from :meth:`submit` (those ``which`` picks, or
        all): no worker has them, and their callbacks are never called.
        Returns them, oldest first."""

        def picked(job: Job) -> bool:
            submission = job.future
            return (
                isinstance(submission, Submission)
                and not submission.finished
                and (which is None or which(submission))
            )

        taken: list[Submission] = []
        for job in self._take_queued(picked):
            assert isinstance(job.future, Submission)
            job.future.finished = True
            taken.append(job.future)
        return taken

    def withdraw_streams(self, which: Callable[[int], bool] | None = None) -> list[int]:
        """Take back queued streams (those whose ``tag`` ``which`` picks, or all):
        no worker has them, and they never start; their iterators raise
        :class:`UnavailableError`. Returns their tags, oldest first."""
        taken = self._take_queued(
            lambda job: job.chunks is not None and (which is None or which(job.tag))
        )
        for job in taken:
            self._fail(job, UnavailableError("the stream was taken back; it never ran"))
        return [job.tag for job in taken]

    def _take_queued(self, picked: Callable[[Job], bool]) -> list[Job]:
        """Remove the queued jobs ``picked`` selects; return them, oldest first."""
        taken: list[Job] = []
        kept: collections.deque[Job] = collections.deque()
        for job in self._queue:
            (taken if picked(job) else kept).append(job)
        if taken:
            self._queue.clear()
            self._queue.extend(kept)
        return taken

    @property
    def capacity(self) -> int:
        """Jobs the pool can start at once: workers x pipeline depth."""
        if self.config.debug:
            return self.config.num_workers  # one job per fresh worker
        return max(1, self._target) * self._depth

    async def stream(
        self,
        payload: Payload | bytes,
        timeout: float | None = None,
        *,
        deadline: float = 0.0,
        tag: int = 0,
    ) -> AsyncGenerator[Payload, None]:
        """Yield the chunks of a streamed reply (the final one included).

        Leaving the loop early sends STOP; the worker goes back to the pool once
        its stream ends within ``stream_timeout``, else it is killed and replaced.
        ``deadline`` works as for :meth:`submit`: past it a stream still waiting
        for a worker fails with :class:`JobTimeoutError` and never starts, and
        one that starts late gets only the time left as its exec TTL. A stream
        still waiting can be taken back by its ``tag`` (:meth:`withdraw_streams`).
        """
        if isinstance(payload, bytes):
            payload = Payload(payload)
        if self.config.debug:
            chunks = self._stream_debug(payload, timeout, deadline)
            async with contextlib.aclosing(chunks) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        for attempt in range(MAX_RETRIES):
            job = Job(
                payload,
                self._new_future(),
                asyncio.Queue(),
                self._ttl_for(timeout),
                deadline=deadline,
                tag=tag,
            )
            self._submit(job)
            yielded = False
            try:
                async for chunk in stream_chunks(job, self.config.stream_timeout):
                    yielded = True
                    yield chunk
                return
            except ShardpoolError as exc:
                if yielded or attempt == MAX_RETRIES - 1 or not retryable(exc):
                    raise
            finally:
                self._forget(job)

    def _ttl_for(self, timeout: float | None) -> float | None:
        """A job's exec TTL: its own timeout, capped by ``supervisor.exec_ttl``."""
        if timeout and self._ttl:
            return min(timeout, self._ttl)
        return timeout or self._ttl

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise PoolClosedError("the pool is not started: call start() or use 'async with'")
        return self._loop

    def _new_future(self) -> asyncio.Future[Payload]:
        return self._running_loop().create_future()

    def _submit(self, job: Job) -> None:
        """Start ``job`` on an idle worker, or queue it."""
        if self._closing:
            raise PoolClosedError("the pool is closed")
        payload = job.payload
        if not (payload.body or payload.context):
            check_payload(payload)  # raises, naming the cause
        idle = self._idle
        while idle:
            worker = idle.pop()
            if self._usable(worker) and not worker.closing:
                worker.start(job)
                return
        # Jobs already queued mean no worker has room (a worker that frees up
        # takes from the queue first): this one queues behind them.
        if self._depth > 1 and not self._queue:
            busy = self._least_loaded()
            if busy is not None and not busy.closing:
                busy.start(job)
                return
        limit = self.config.max_queue_size
        if limit and len(self._queue) >= limit:
            raise self._queue_full()
        assert self._loop is not None
        # The queue is FIFO, so one timer for its oldest job bounds every wait
        # (a timer per job would cost more than the rest of the queueing).
        job.queued_at = self._loop.time()
        self._queue.append(job)
        if self._expiry is None:
            self._arm_expiry()
        if self._dynamic:
            self._allocator.on_queued()

    def _arm_expiry(self) -> None:
        assert self._loop is not None
        if self._queue:
            deadline = self._queue[0].queued_at + self.config.allocate_timeout
            self._expiry = self._loop.call_at(deadline, self._expire_queue)
        else:
            self._expiry = None

    def _expire_queue(self) -> None:
        """Fail the jobs that waited ``allocate_timeout`` for a worker."""
        assert self._loop is not None
        limit = self._loop.time() - self.config.allocate_timeout
        queue = self._queue
        while queue and queue[0].queued_at <= limit:
            self._fail(queue.popleft(), self._no_free_workers())
        self._arm_expiry()

    def _queue_full(self) -> QueueFullError:
        limit = self.config.max_queue_size
        return QueueFullError(f"{limit} jobs are already waiting for a worker (max_queue_size)")

    def _no_free_workers(self) -> NoFreeWorkersError:
        return NoFreeWorkersError(
            f"no worker became free within {self.config.allocate_timeout:g}s (allocate_timeout)"
        )

    def _forget(self, job: Job) -> None:
        """The caller left: a job still queued is dropped."""
        if job.worker is None:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)

    @staticmethod
    def _fail(job: Job, error: ShardpoolError) -> None:
        if not job.future.done():
            job.future.set_exception(error)
            if job.chunks is not None:
                job.future.exception()  # the stream's consumer reports it, from the queue
        if job.chunks is not None:
            job.chunks.put_nowait(error)

    def _overdue(self, job: Job) -> bool:
        """A queued job's deadline: past it, the job fails and never starts;
        before it, the job gets at most the time left as its exec TTL."""
        left = job.deadline - time.monotonic()
        if left <= 0:
            self._fail(job, _never_ran())
            return True
        if job.ttl_seconds is None or left < job.ttl_seconds:
            job.ttl_seconds = left
        return False

    @staticmethod
    def _usable(worker: Worker) -> bool:
        return (
            worker.state is _READY
            and not worker._pending
            and not worker.retiring
            and worker._error is None
        )

    def _least_loaded(self) -> Worker | None:
        """Pipelining: the busy worker with the fewest jobs in its pipe, if any has room.

        With ``auto`` depth a worker whose current job has run much longer than
        jobs usually take gets nothing more: that job is probably slow, and a
        job written behind it would wait for it (head-of-line blocking).
        """
        best, best_n = None, self._depth
        slow = self._slow_after() if self._auto else 0.0
        now = time.monotonic() if self._auto else 0.0
        for worker in self._workers:
            n = len(worker._pending)  # the hot path: no property call
            if n < best_n and self._pipelinable(worker):
                if slow and now - worker.head_since > slow:
                    continue
                best, best_n = worker, n
        return best

    @staticmethod
    def _pipelinable(worker: Worker) -> bool:
        state = worker.state
        if (state is not _WORKING and state is not _READY) or worker.retiring:
            return False
        pending = worker._pending  # the hot path: no property calls
        if worker._error is not None or (pending and pending[0].chunks is not None):
            return False  # broken, or a stream at the head of the pipe
        # Never write more jobs than max_jobs leaves: the worker retires after them.
        return not (worker.max_jobs and worker.jobs_done + len(pending) >= worker.max_jobs)

    def _slow_after(self) -> float:
        """auto depth: a job running longer than this is treated as slow.

        Recomputed every 128 calls: it moves slowly, and this is the hot path.
        """
        self._slow_calls -= 1
        if self._slow_calls <= 0:
            self._slow_calls = 128
            self._slow = max(AUTO_SLOW_FACTOR * self._service_ewma(), AUTO_SLOW_MIN)
        return self._slow

    def _service_ewma(self) -> float:
        times = [w.service_ewma for w in self._workers if w.service_ewma]  # those with a job done
        return sum(times) / len(times) if times else 0.0

    @property
    def mean_job_time(self) -> float:
        """Seconds a worker has lately spent per job (a moving average over the
        workers that have run one); 0 before the first job."""
        return self._service_ewma()

    def _on_free(self, worker: Worker) -> None:
        """A worker finished a job: retire it, give it the next job(s), or idle it."""
        n = len(worker._pending)  # this runs once per job: no property calls
        state = worker.state
        if state is not _READY and state is not _WORKING:
            if (state in MARKS or state is WorkerState.INVALID) and not n:
                self.retire(worker)
            return
        if n:
            if self._depth == 1 or not self._queue or not self._pipelinable(worker):
                return
        elif worker.retiring or worker._error is not None:
            return
        queue = self._queue
        room = self._depth - n
        while queue and room:
            job = queue.popleft()
            if job.future.done() or (job.deadline and self._overdue(job)):
                continue  # the caller gave up, or its deadline passed
            try:
                worker.start(job)
            except ShardpoolError:
                queue.appendleft(job)  # the worker is going; the job waits for another
                return
            room -= 1
            # Starting a job can end pipelining (max_jobs left); with no room left
            # the loop ends anyway, and this runs once per job.
            if room and not self._pipelinable(worker):
                break
        if not worker._pending:
            self._idle.append(worker)

    # -- workers ---------------------------------------------------------------

    async def _spawn(self) -> Worker:
        self._spawning += 1
        try:
            worker = await self._factory.spawn(
                self.config.argv,
                timeout=self.config.allocate_timeout,
                env=self.config.env,
                max_jobs=self.config.max_jobs,
            )
        finally:
            self._spawning -= 1
        if self._closing:
            await worker.destroy(self.config.destroy_timeout)
            raise PoolClosedError("the pool was destroyed while a worker was starting")
        worker.on_free = self._on_free
        worker.busy_poll = self._busy_poll
        worker.on_done(self._on_worker_done)
        self._workers.append(worker)
        self.lifecycle.spawned_worker(worker)
        self._spawn_failures = 0
        if self._active() > self._target:
            # remove_worker() ran while this one was starting: it goes at once.
            self.retire(worker)
            self._notify()
            return worker
        self._on_free(worker)
        self._notify()
        return worker

    def _on_worker_done(self, worker: Worker) -> None:
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        self.lifecycle.ended_worker(worker, self._closing)
        if not worker.retiring and not self._closing:
            # Only a worker that dies with no job in hand may be flapping: one that
            # crashes under a job is answered (and respawned) at the rate jobs come.
            flapping = not worker.jobs_done and worker.end_reason == "exited"
            self._quick_deaths = self._quick_deaths + 1 if flapping else 0
        self._notify()
        self._ensure()

    def _active(self) -> int:
        return sum(1 for w in self._workers if not w.retiring and w.error is None)

    def _ensure(self) -> None:
        """Spawn replacements until the pool is back at its target size."""
        if self._closing or not self._started:
            return
        missing = self._target - self._active() - self._spawning
        for _ in range(missing):
            self._background(self._replace())

    async def _replace(self) -> None:
        # A worker that boots and then dies before finishing any job (flapping)
        # counts like a failed start once every slot has done so: no tight respawn loop.
        failures = max(self._spawn_failures, self._quick_deaths - self._target)
        if failures > 0:
            delay = min(_BACKOFF_START * 2 ** (failures - 1), _BACKOFF_MAX)
            self._spawning += 1  # hold the slot during the back-off
            try:
                await asyncio.sleep(delay)
            finally:
                self._spawning -= 1
        if self._closing or self._target - self._active() - self._spawning <= 0:
            return
        try:
            await self._spawn()
        except PoolClosedError:
            return
        except ShardpoolError as exc:
            self._spawn_failures += 1
            log.error("cannot replace a worker (attempt %d): %s", self._spawn_failures, exc)
            self._ensure()

    def retire(self, worker: Worker, timeout: float | None = None, reason: str = "") -> None:
        """Replace ``worker``: it takes no new jobs, finishes its own, then stops.

        ``reason`` is logged and counted; by default the soft limit it reached.
        """
        if worker.retiring:
            return
        worker.set_end_reason(reason or REASON_BY_STATE.get(worker.state, "removed"))
        worker.retiring = True
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        self._ensure()
        self._background(worker.destroy(timeout or self.config.destroy_timeout))

    def _background(self, coro: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _wait_for(self, condition: Any, timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    assert self._changed is not None
                    await self._changed.wait()
        except TimeoutError:
            raise AllocateError(f"{what} did not happen within {timeout:g}s") from None

    async def reset(self) -> None:
        """Replace every worker gracefully: new ones start, jobs in flight finish
        (up to ``reset_timeout``), then the old ones stop."""
        self._check_open()
        old = [w for w in self._workers if not w.retiring]
        for worker in old:
            worker.set_end_reason("reset")
            worker.retiring = True
            with contextlib.suppress(ValueError):
                self._idle.remove(worker)
        self._spawn_failures = 0
        self._ensure()
        await asyncio.gather(*(w.destroy(self.config.reset_timeout) for w in old))
        await self._wait_for(
            lambda: self._active() >= self._target, self.config.allocate_timeout, "reset"
        )

    async def add_worker(self) -> None:
        """Grow the pool by one worker (spawned now)."""
        self._check_open()
        self._target += 1
        try:
            await self._spawn()
        except BaseException:
            self._target -= 1
            raise

    async def remove_worker(self) -> None:
        """Shrink the pool by one worker (an idle one if any); never the last one."""
        self._check_open()
        if self._target <= 1:
            raise ShardpoolError("cannot remove the last worker of the pool")
        self._target -= 1
        candidates = [w for w in self._workers if not w.retiring]
        idle = [w for w in candidates if w.in_flight == 0]
        if idle or candidates:
            victim = (idle or candidates)[-1]
            victim.set_end_reason("removed")
            victim.retiring = True
            with contextlib.suppress(ValueError):
                self._idle.remove(victim)
            await victim.destroy(self.config.destroy_timeout)

    def _check_open(self) -> None:
        if self._closing or not self._started:
            raise PoolClosedError("the pool is not running")

    async def _exec_debug(
        self, payload: Payload, timeout: float | None, deadline: float = 0.0
    ) -> Payload:
        """Debug mode: a fresh worker for every job, stopped afterwards."""
        async with self._debug_worker(payload, timeout, deadline) as (worker, ttl):
            return await worker.exec(payload, ttl)

    @contextlib.asynccontextmanager
    async def _debug_worker(
        self, payload: Payload, timeout: float | None, deadline: float
    ) -> AsyncGenerator[tuple[Worker, float | None], None]:
        """A fresh worker for one job, in its turn, with the job's exec TTL;
        stopped afterwards."""
        self._check_open()
        check_payload(payload)
        ttl = self._ttl_for(timeout)
        async with self._debug_slot(deadline) as left:
            worker = await self._debug_spawn()
            try:
                yield worker, _at_most(ttl, left)
            finally:
                await self._debug_done(worker)

    @contextlib.asynccontextmanager
    async def _debug_slot(self, deadline: float) -> AsyncGenerator[float | None, None]:
        """Debug mode runs at most ``num_workers`` jobs (fresh workers) at once;
        the others wait as queued jobs do: up to ``allocate_timeout``, at most
        ``max_queue_size`` of them, never past their deadline. Yields the time
        left to the deadline (None: no deadline)."""
        if self._debug.running >= self.config.num_workers or self._debug.waiters:
            limit = self.config.max_queue_size
            if limit and len(self._debug.waiters) >= limit:
                raise self._queue_full()
            wait = float(self.config.allocate_timeout)
            left = deadline - time.monotonic() if deadline else wait
            late = left < wait
            if late:
                wait = max(0.0, left)
            assert self._loop is not None
            turn = self._loop.create_future()
            self._debug.waiters.append(turn)
            try:
                await asyncio.wait_for(turn, wait)  # a finished job hands over its slot
            except TimeoutError:
                raise (_never_ran() if late else self._no_free_workers()) from None
            finally:
                if not turn.done() or turn.cancelled():
                    with contextlib.suppress(ValueError):
                        self._debug.waiters.remove(turn)
        else:
            self._debug.running += 1
        try:
            yield (deadline - time.monotonic()) if deadline else None
        finally:
            self._debug_release()

    def _debug_release(self) -> None:
        while self._debug.waiters:
            turn = self._debug.waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes on: the running count stays
                return
        self._debug.running -= 1

    async def _debug_spawn(self) -> Worker:
        async def spawn() -> Worker:
            worker = await self._factory.spawn(
                self.config.argv, timeout=self.config.allocate_timeout, env=self.config.env
            )
            worker.busy_poll = self._busy_poll
            self._debug.workers.add(worker)
            return worker

        task = asyncio.ensure_future(spawn())
        self._debug.spawns.add(task)  # destroy() waits for it, then stops the worker
        task.add_done_callback(self._debug.spawns.discard)
        return await task

    async def _debug_done(self, worker: Worker) -> None:
        try:
            await worker.destroy(self.config.destroy_timeout)
        finally:
            self._debug.workers.discard(worker)

    async def _stream_debug(
        self, payload: Payload, timeout: float | None, deadline: float
    ) -> AsyncGenerator[Payload, None]:
        async with self._debug_worker(payload, timeout, deadline) as (worker, ttl):
            chunks = worker.stream(payload, ttl, self.config.stream_timeout)
            async with contextlib.aclosing(chunks) as stream:
                async for chunk in stream:
                    yield chunk

    # -- inspection ------------------------------------------------------------

    def workers(self) -> list[WorkerInfo]:
        """One record per worker: pid, state, jobs done, created at, resident memory."""
        now = time.monotonic()
        return [
            WorkerInfo(
                pid=w.pid,
                state=w.state.value,
                jobs=w.jobs_done,
                in_flight=w.in_flight,
                created_at=w.created_at,
                memory=rss_bytes(w.pid),
                busy_for=round(now - w.head_since, 6) if w.in_flight else 0.0,
            )
            for w in self._workers
        ]

    def stats(self) -> dict[str, Any]:
        """Figures for metrics: workers by state, their memory, restarts by reason."""
        workers = self.workers()
        by_state: collections.Counter[str] = collections.Counter(w.state for w in workers)
        return {
            "queue": self.queue_size,
            "workers": len(workers),
            "workers_by_state": dict(by_state),
            "worker_memory": {str(w.pid): w.memory for w in workers},
            "worker_jobs": sum(w.jobs for w in workers),
            "spawned": self.lifecycle.spawned,
            "restarts": self.lifecycle.restarts,
        }

    @property
    def queue_size(self) -> int:
        """Jobs waiting for a free worker."""
        return len(self._queue) + len(self._debug.waiters)

    @property
    def size(self) -> int:
        """Workers serving jobs now (not counting ones being replaced)."""
        return self._active()

    def _all_workers(self) -> list[Worker]:
        return list(self._workers)
