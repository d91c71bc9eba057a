"""Pipelined dispatch: ``pipeline_depth`` jobs at most in one worker's pipe.

With depth 1 (the default, RoadRunner's behaviour) a busy worker never gets a
second job. With depth d > 1 the pool writes up to d jobs into one worker's
pipe when no worker is idle, onto the worker with the fewest jobs
outstanding; the worker answers them strictly in order. ``auto`` writes up to
4, but nothing behind a job that has run far longer than jobs usually take.

Every test runs real PHP workers (``workers/commands.php`` unless said
otherwise) over pipes. Pipe occupancy is read from the pool's internals
(``pool._workers``, ``worker.in_flight``, ``pool.queue_size``), right after
the jobs were submitted (one loop turn: ``exec`` submits before its first
await) or from the worker's ``on_free`` hook, which runs synchronously each
time a job completes, after the pool has refilled the pipe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import async_test, php, pids, poll, until

from shardpool import (
    ExecTTLError,
    Pool,
    PoolClosedError,
    PoolConfig,
    SoftJobError,
    WorkerCrashedError,
    pool_config,
)
from shardpool.worker.state import WorkerState
from shardpool.worker.worker import Worker

WAIT = 5.0  # bound for the pool to settle after an event
DEPTHS = [2, 4]
DEPTHS_AND_AUTO = [2, 4, "auto"]
AUTO_DEPTH = 4  # what pipeline_depth: auto writes into one pipe at most

# ---------------------------------------------------------------- helpers


def config(script: str = "commands.php", **options: Any) -> PoolConfig:
    """One worker running ``workers/<script>`` over pipes, with short timeouts."""
    options.setdefault("num_workers", 1)
    options.setdefault("allocate_timeout", "10s")
    options.setdefault("destroy_timeout", "5s")
    options.setdefault("reset_timeout", "5s")
    options.setdefault("stream_timeout", "5s")
    return pool_config(command=php(script), **options)


def max_depth(depth: int | str) -> int:
    return AUTO_DEPTH if depth == "auto" else int(depth)


async def one_loop_turn() -> None:
    """Let tasks just created run their first step (submit their job). Not a timed wait."""
    await asyncio.sleep(0)


async def teach_auto(pool: Pool) -> None:
    """With `auto`, first run jobs of a few ms, so that the pool knows jobs usually
    take that long: the head of a burst, a fraction of a millisecond old, is then
    never taken for a slow job (the loop clock auto reads moves in 1 ms steps)."""
    if pool.config.pipeline_depth == "auto":
        for _ in range(20):
            assert (await pool.exec(b"sleep:5")).body == b"slept"


def submit(pool: Pool, *bodies: bytes, timeout: float | None = None) -> list[asyncio.Task[Any]]:
    """Start one ``exec`` per body, in order; they submit on the next loop turn."""
    return [asyncio.create_task(pool.exec(body, timeout)) for body in bodies]


async def answers(tasks: list[asyncio.Task[Any]]) -> list[Any]:
    """Each task's reply body, or the exception it raised."""
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [r if isinstance(r, BaseException) else r.body for r in results]


def occupancy(worker: Worker, of: Worker | None = None) -> list[int]:
    """Record ``of``'s in_flight (default: ``worker``'s) each time ``worker``
    reports completed jobs (once per read of its replies), after the pool has
    written the next jobs into its pipe."""
    seen: list[int] = []
    pool_hook = worker.on_free
    assert pool_hook is not None
    watched = of or worker

    def on_free(w: Worker) -> None:
        pool_hook(w)
        seen.append(watched.in_flight)

    worker.on_free = on_free
    return seen


def settled(pool: Pool, size: int, gone: set[int] = frozenset()) -> Callable[[], bool]:  # type: ignore[assignment]
    """``size`` workers serving, none of them in ``gone``, none left half-dead."""
    return lambda: pool.size == size == len(pool.workers()) and not pids(pool) & gone


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """Errors raised in loop callbacks (e.g. a future answered twice)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(None)


# ---------------------------------------------------------------- depth and placement


@pytest.mark.parametrize("depth", [{}, {"pipeline_depth": 1}], ids=["default", "1"])
@async_test(timeout=10)
async def test_depth_1_never_writes_a_second_job_into_a_busy_worker(depth: dict[str, int]) -> None:
    async with Pool(config(**depth)) as pool:
        (worker,) = pool._workers
        seen = occupancy(worker)
        tasks = submit(pool, b"sleep:200", b"echo:a")
        await one_loop_turn()
        assert (worker.in_flight, pool.queue_size) == (1, 1)
        assert await answers(tasks) == [b"slept", b"a"]
        assert seen == [1, 0]  # the echo was written only once the sleep was answered


@pytest.mark.parametrize("depth", DEPTHS_AND_AUTO)
@async_test(timeout=10)
async def test_depth_d_writes_up_to_d_jobs_into_a_busy_worker_and_queues_the_rest(
    depth: int | str,
) -> None:
    d = max_depth(depth)
    async with Pool(config(pipeline_depth=depth)) as pool:
        await teach_auto(pool)
        (worker,) = pool._workers
        seen = occupancy(worker)
        tasks = submit(pool, *[b"sleep:50"] * (d + 2))
        await one_loop_turn()
        assert (worker.in_flight, pool.queue_size) == (d, 2)
        assert await answers(tasks) == [b"slept"] * (d + 2)
        # Each answer makes room for one queued job, never more than d in the pipe.
        assert seen == [d, d, *range(d - 1, -1, -1)]
        assert max(seen) == d


@pytest.mark.parametrize("depth", DEPTHS_AND_AUTO)
@async_test(timeout=10)
async def test_an_idle_worker_is_preferred_over_pipelining(depth: int | str) -> None:
    async with Pool(config(num_workers=2, pipeline_depth=depth)) as pool:
        tasks = submit(pool, b"sleep:200", b"sleep:200")
        await one_loop_turn()
        assert sorted(w.in_flight for w in pool._workers) == [1, 1]
        assert await answers(tasks) == [b"slept", b"slept"]


@pytest.mark.parametrize("depth", DEPTHS)
@async_test(timeout=10)
async def test_pipelining_goes_to_the_worker_with_the_fewest_jobs_outstanding(depth: int) -> None:
    # `auto` does not apply: it would (rightly) write nothing behind the long heads.
    async with Pool(config(num_workers=2, pipeline_depth=depth)) as pool:
        first, second = pool._workers
        tasks: list[asyncio.Task[Any]] = []

        async def submit_one(body: bytes) -> Worker:
            """Submit one job; return the worker it was written to, checking it
            was one of the least loaded workers with room."""
            before = {w: w.in_flight for w in pool._workers}
            tasks.extend(submit(pool, body))
            await one_loop_turn()
            (landed,) = [w for w in pool._workers if w.in_flight == before[w] + 1]
            with_room = [n for n in before.values() if n < depth]
            assert before[landed] == min(with_room), (before, landed)
            return landed

        # The worker scanned first gets the long head, the other a short one,
        # so that a first-fit policy would wrongly pick `first` at the end.
        long, short = b"sleep:300", b"sleep:100"
        order = [long, short] if pool._idle[-1] is first else [short, long]
        landed = [await submit_one(body) for body in order]
        assert landed == ([first, second] if order[0] == long else [second, first])
        short_head = tasks[order.index(short)]
        # Load both workers to k jobs: k = d - 1 leaves room at depth >= 3;
        # at depth 2 (k = 2) `first` is full and must be skipped.
        k = max(depth - 1, 2)
        for _ in range(2 * (k - 1)):
            await submit_one(long)
        assert (first.in_flight, second.in_flight) == (k, k)
        await short_head
        assert (first.in_flight, second.in_flight) == (k, k - 1)
        assert await submit_one(b"echo:x") is second
        results = await answers(tasks)
        assert results[-1] == b"x"
        assert sorted(results[:-1]) == sorted([b"slept"] * (len(tasks) - 1))


class RecordingTransport:
    """A worker's pipe that records each write() it is asked for."""

    def __init__(self, transport: Any, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@pytest.mark.parametrize("depth", DEPTHS)
@async_test(timeout=10)
async def test_jobs_pipelined_in_one_pass_cross_the_pipe_in_one_write(depth: int) -> None:
    """The first job wakes PHP at once; the ones behind it go together, in one
    write() and so one wake-up, and are answered in order."""
    async with Pool(config(pipeline_depth=depth)) as pool:
        (worker,) = pool._workers
        writes: list[bytes] = []
        worker._transport = RecordingTransport(worker._transport, writes)  # type: ignore[assignment]
        bodies = [f"echo:{i}".encode() for i in range(depth)]
        tasks = submit(pool, *bodies)
        assert await answers(tasks) == [f"{i}".encode() for i in range(depth)]
        assert len(writes) == 2, writes
        assert bodies[0] in writes[0] and bodies[1] not in writes[0]
        assert all(body in writes[1] for body in bodies[1:])


# ---------------------------------------------------------------- failures in the pipe


@pytest.mark.parametrize("depth", DEPTHS_AND_AUTO)
@async_test(timeout=10)
async def test_crash_fails_only_its_job_and_the_jobs_behind_it_run_on_the_replacement(
    depth: int | str,
) -> None:
    async with Pool(config(pipeline_depth=depth)) as pool:
        await teach_auto(pool)
        (old,) = pool._workers
        with loop_errors() as errors:
            tasks = submit(pool, b"crash:3", b"echo:a", b"echo:b")
            await one_loop_turn()
            assert old.in_flight == min(3, max_depth(depth))
            crash, a, b = await answers(tasks)
            await until(pool, settled(pool, 1, gone={old.pid}))
        assert isinstance(crash, WorkerCrashedError), crash
        assert "exited with status 3" in str(crash)
        assert (a, b) == (b"a", b"b")
        (new,) = pool._workers
        assert new.jobs_done == 2  # each job behind the crash ran exactly once
        assert errors == []


@pytest.mark.parametrize("depth", DEPTHS_AND_AUTO)
@async_test(timeout=10)
async def test_exec_ttl_fails_only_its_job_and_the_jobs_behind_it_succeed(
    depth: int | str,
) -> None:
    async with Pool(config(pipeline_depth=depth)) as pool:
        await teach_auto(pool)
        (old,) = pool._workers
        slow = submit(pool, b"sleep:3000", timeout=0.3)
        behind = submit(pool, b"echo:a", b"echo:b")
        await one_loop_turn()
        assert old.in_flight == min(3, max_depth(depth))
        ttl, a, b = await answers(slow + behind)
        assert isinstance(ttl, ExecTTLError), ttl
        assert (a, b) == (b"a", b"b")
        await until(pool, settled(pool, 1, gone={old.pid}))


@pytest.mark.parametrize("depth", DEPTHS_AND_AUTO)
@async_test(timeout=10)
async def test_exec_ttl_does_not_count_time_spent_waiting_in_the_pipe(depth: int | str) -> None:
    async with Pool(config(pipeline_depth=depth)) as pool:
        await teach_auto(pool)
        (worker,) = pool._workers
        head = submit(pool, b"sleep:400")
        behind = submit(pool, b"echo:x", timeout=0.3)
        await one_loop_turn()
        assert worker.in_flight == 2  # the echo waits 400 ms in the pipe, past its TTL
        assert await answers(head + behind) == [b"slept", b"x"]
        assert pool._workers == [worker]
        assert worker.error is None


@pytest.mark.parametrize("depth", DEPTHS_AND_AUTO)
@async_test(timeout=20)
async def test_stop_requests_in_the_pipe_answer_every_job_exactly_once(depth: int | str) -> None:
    env = {"SHARDPOOL_STOP_AFTER": "2"}
    async with Pool(config("stop_after.php", env=env, pipeline_depth=depth)) as pool:
        bodies = [f"job {i}".encode() for i in range(10)]
        with loop_errors() as errors:
            results = await answers(submit(pool, *bodies))
            await until(pool, settled(pool, 1))
        assert results == bodies  # each caller got its own body: none lost, none twice
        assert errors == []


@pytest.mark.parametrize("depth", DEPTHS_AND_AUTO)
@async_test(timeout=10)
async def test_soft_error_in_the_pipe_does_not_disturb_its_neighbours(depth: int | str) -> None:
    async with Pool(config(pipeline_depth=depth)) as pool:
        await teach_auto(pool)
        (worker,) = pool._workers
        tasks = submit(pool, b"sleep:50", b"error:boom", b"pid", b"pid")
        await one_loop_turn()
        assert worker.in_flight == min(4, max_depth(depth))
        slept, error, pid1, pid2 = await answers(tasks)
        assert slept == b"slept"
        assert isinstance(error, SoftJobError) and str(error) == "boom"
        assert pid1 == pid2 == str(worker.pid).encode()
        assert pool._workers == [worker]


@pytest.mark.parametrize("depth", [4, "auto"])  # it takes 2 answers behind the first: depth >= 4
@async_test(timeout=15)
async def test_answers_written_before_a_crash_are_delivered_when_the_pool_is_busy(
    depth: int | str,
) -> None:
    async with Pool(config(pipeline_depth=depth)) as pool:
        (worker,) = pool._workers
        pool_hook = worker.on_free
        assert pool_hook is not None

        def busy_on_first_answer(w: Worker) -> None:
            # A loaded pool: while it handles the answer to `echo:a`, PHP
            # answers `sleep` and `b`, then crashes. The loop is blocked on
            # purpose, on the worker's exit (a pidfd), bounded to 5 s.
            worker.on_free = pool_hook
            fd = os.pidfd_open(w.pid)
            try:
                assert select.select([fd], [], [], 5.0)[0], "the worker did not crash"
            finally:
                os.close(fd)
            pool_hook(w)

        worker.on_free = busy_on_first_answer
        bodies = [b"echo:a", b"sleep:50", b"echo:b", b"crash:3", b"echo:c", b"echo:d"]
        with loop_errors() as errors:
            results = await answers(submit(pool, *bodies))
            await until(pool, settled(pool, 1, gone={worker.pid}))
        assert results[:3] == [b"a", b"slept", b"b"]
        crash = results[3]
        assert isinstance(crash, WorkerCrashedError), crash
        assert f"worker pid {worker.pid} exited with status 3" in str(crash)  # ran once, there
        assert results[4:] == [b"c", b"d"]
        assert [m.get("message") for m in errors] == []


# ---------------------------------------------------------------- streams


@pytest.mark.parametrize("depth", DEPTHS_AND_AUTO)
@async_test(timeout=10)
async def test_jobs_behind_a_stream_wait_for_its_end(depth: int | str) -> None:
    env = {"SHARDPOOL_CHUNK_DELAY_MS": "20"}
    async with Pool(config(env=env, pipeline_depth=depth)) as pool:
        events: list[str] = []

        async def consume() -> None:
            async for chunk in pool.stream(b"stream:5"):
                events.append(chunk.body.decode())

        async def echo() -> None:
            events.append("reply " + (await pool.exec(b"echo:a")).body.decode())

        await asyncio.gather(consume(), echo())
        assert events == [*(f"chunk {i}" for i in range(5)), "end", "reply a"]


@pytest.mark.parametrize("depth", DEPTHS_AND_AUTO)
@async_test(timeout=10)
async def test_cancelling_a_stream_in_the_pipe_keeps_the_worker_serving(depth: int | str) -> None:
    # sleep:50 at the head lets the stream, and at depth >= 3 the echo behind
    # it, be written into the pipe: the echo's frame reaches PHP mid-stream.
    env = {"SHARDPOOL_CHUNK_DELAY_MS": "20"}
    async with Pool(config(env=env, pipeline_depth=depth)) as pool:
        await teach_auto(pool)
        (worker,) = pool._workers
        stream = pool.stream(b"stream:1000")
        async with contextlib.aclosing(stream):
            # All three submitted in one loop turn, in this order.
            head = submit(pool, b"sleep:50")
            first = asyncio.ensure_future(anext(stream))
            behind = submit(pool, b"echo:a")
            await one_loop_turn()
            in_flight = worker.in_flight
            assert (await first).body == b"chunk 0"
        assert in_flight == min(3, max_depth(depth))
        assert await answers(head + behind) == [b"slept", b"a"]
        assert (await pool.exec(b"pid")).body == str(worker.pid).encode()
        assert pool._workers == [worker]


# ---------------------------------------------------------------- soft limits


@pytest.mark.parametrize("depth", DEPTHS_AND_AUTO)
@async_test(timeout=15)
async def test_max_jobs_is_never_exceeded_by_pipelined_jobs(depth: int | str) -> None:
    async with Pool(config(num_workers=2, max_jobs=3, pipeline_depth=depth)) as pool:
        replies = await answers(submit(pool, *[b"pid"] * 30))
        counts = collections.Counter(int(r) for r in replies)
        assert sum(counts.values()) == 30
        assert max(counts.values()) <= 3, counts
        await until(pool, settled(pool, 2))


@pytest.mark.parametrize("depth", DEPTHS)
@async_test(timeout=10)
async def test_ttl_mark_retires_the_worker_after_its_pipe_drained(depth: int) -> None:
    supervisor = {"watch_tick": "50ms", "ttl": "200ms"}
    async with Pool(config(supervisor=supervisor, pipeline_depth=depth)) as pool:
        (worker,) = pool._workers
        # The mark comes at most 250 ms after the worker started, while the
        # first 350 ms job still runs: every pipelined job is still in the pipe.
        sleeps = submit(pool, *[b"sleep:350"] * depth)
        later = submit(pool, b"pid", b"pid")
        await one_loop_turn()
        await poll(lambda: worker.state is WorkerState.TTL_REACHED)
        assert (worker.in_flight, pool.queue_size) == (depth, 2)
        assert await answers(sleeps) == [b"slept"] * depth
        pid1, pid2 = await answers(later)
        assert pid1 == pid2 != str(worker.pid).encode()  # queued jobs went to the replacement
        await until(pool, settled(pool, 1, gone={worker.pid}))


# ---------------------------------------------------------------- pool operations


@pytest.mark.parametrize("depth", DEPTHS)
@async_test(timeout=10)
async def test_reset_answers_every_pipelined_job(depth: int) -> None:
    async with Pool(config(pipeline_depth=depth)) as pool:
        (old,) = pool._workers
        tasks = submit(pool, *[b"sleep:100"] * (depth + 1))
        await one_loop_turn()
        assert (old.in_flight, pool.queue_size) == (depth, 1)
        await pool.reset()
        assert await answers(tasks) == [b"slept"] * (depth + 1)
        await until(pool, settled(pool, 1, gone={old.pid}))


@pytest.mark.parametrize("depth", DEPTHS)
@async_test(timeout=10)
async def test_remove_worker_answers_every_pipelined_job(depth: int) -> None:
    async with Pool(config(num_workers=2, pipeline_depth=depth)) as pool:
        tasks = submit(pool, *[b"sleep:100"] * (2 * depth + 2))
        await one_loop_turn()
        assert [w.in_flight for w in pool._workers] == [depth, depth]
        assert pool.queue_size == 2
        await pool.remove_worker()
        assert await answers(tasks) == [b"slept"] * (2 * depth + 2)
        assert pool.size == len(pool.workers()) == 1


@pytest.mark.parametrize("depth", DEPTHS)
@async_test(timeout=10)
async def test_destroy_lets_pipelined_jobs_finish_and_fails_queued_ones(depth: int) -> None:
    pool = Pool(config(pipeline_depth=depth))
    await pool.start()
    try:
        (worker,) = pool._workers
        tasks = submit(pool, *[b"sleep:100"] * (depth + 2))
        await one_loop_turn()
        assert (worker.in_flight, pool.queue_size) == (depth, 2)
    finally:
        await pool.destroy()
    results = await answers(tasks)
    assert results[:depth] == [b"slept"] * depth
    assert all(isinstance(r, PoolClosedError) for r in results[depth:]), results


# ---------------------------------------------------------------- auto


@async_test(timeout=10)
async def test_auto_writes_nothing_behind_a_job_running_far_longer_than_usual() -> None:
    async with Pool(config(num_workers=2, pipeline_depth="auto")) as pool:
        for i in range(100):  # warm up: jobs usually take well under a millisecond
            assert (await pool.exec(f"echo:{i}".encode())).body == str(i).encode()
        (slow,) = submit(pool, b"sleep:300")
        await one_loop_turn()
        (slow_worker,) = [w for w in pool._workers if w.in_flight]
        (fast_worker,) = [w for w in pool._workers if w is not slow_worker]
        # Elapsed time is the condition: let the sleep run long enough for auto
        # to judge it slow (far over 8x the usual service time and the 1 ms floor).
        await asyncio.sleep(0.05)
        seen = occupancy(fast_worker, of=slow_worker)
        fast = submit(pool, *[f"echo:{i}".encode() for i in range(50)])
        await one_loop_turn()
        assert slow_worker.in_flight == 1
        assert fast_worker.in_flight + pool.queue_size == 50
        assert await answers(fast) == [str(i).encode() for i in range(50)]
        assert not slow.done()
        # Each time the fast worker freed room, the slow one still held its job alone.
        assert seen and set(seen) == {1}, seen
        assert (await slow).body == b"slept"


# ---------------------------------------------------------------- stress


def expected(i: int) -> tuple[bytes, type[BaseException] | bytes]:
    """Job i of the stress test and its expected answer."""
    if i % 300 == 150:
        return b"crash:3", WorkerCrashedError
    if i % 7 == 3:
        return f"error:e{i}".encode(), SoftJobError
    return f"echo:{i}".encode(), str(i).encode()


@pytest.mark.parametrize("depth", [4, "auto"])
@async_test(timeout=30)
async def test_every_job_of_a_mixed_burst_gets_exactly_one_answer_of_its_kind(
    depth: int | str,
) -> None:
    jobs = [expected(i) for i in range(3000)]
    async with Pool(config(num_workers=2, pipeline_depth=depth)) as pool:
        with loop_errors() as errors:
            results = await answers(submit(pool, *(body for body, _ in jobs)))
            await until(pool, settled(pool, 2))
        assert len(results) == len(jobs)
        wrong = []
        for i, ((body, want), got) in enumerate(zip(jobs, results, strict=True)):
            if isinstance(want, bytes):
                ok = got == want
            elif want is SoftJobError:
                ok = isinstance(got, SoftJobError) and str(got) == f"e{i}"
            else:
                ok = isinstance(got, want)
            if not ok:
                wrong.append((body, got))
        assert wrong == []
        assert errors == []
