"""The static pool: what a caller of :class:`~shardpool.pool.Pool` sees.

Every test runs real PHP workers from ``workers/`` (mostly ``commands.php``,
driven by the job body) over pipes; exec and crash replacement also run over
TCP and unix sockets. Tests wait on the pool's own change event (workers
spawned or gone) or on the jobs themselves, bounded in time. A bounded poll
is used only where the pool signals nothing (a process being spawned); the
supervisor is ticked by hand where a test must act while a job runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import WORKERS, async_test, php, pids, poll, until

from shardpool import (
    AllocateError,
    ConfigError,
    ExecTTLError,
    JobTimeoutError,
    NoFreeWorkersError,
    Payload,
    Pool,
    PoolClosedError,
    PoolConfig,
    QueueFullError,
    ShardpoolError,
    SoftJobError,
    WorkerCrashedError,
    WorkerStoppedError,
    pool_config,
)
from shardpool.errors import UnavailableError
from shardpool.pool import allocator
from shardpool.worker.worker import Worker

WAIT = 5.0  # bound for the pool to settle after an event
FAST_TICK = {"watch_tick": "50ms"}
MANUAL_TICK = {"watch_tick": "1h"}  # the test calls pool._supervisor.tick() itself

# ---------------------------------------------------------------- helpers


def config(script: str = "commands.php", **options: Any) -> PoolConfig:
    """Two workers running ``workers/<script>`` over pipes, with short timeouts."""
    options.setdefault("num_workers", 2)
    options.setdefault("allocate_timeout", "10s")
    options.setdefault("destroy_timeout", "5s")
    return pool_config(command=php(script), **options)


async def one_loop_turn() -> None:
    """Let tasks just created run their first step (submit their job). Not a timed wait."""
    await asyncio.sleep(0)


def settled(
    pool: Pool, size: int, gone: frozenset[int] | set[int] = frozenset()
) -> Callable[[], bool]:
    """``size`` workers serving, none of them in ``gone``, none left half-dead."""
    return lambda: pool.size == size == len(pool.workers()) and not pids(pool) & gone


async def bodies_or_error(chunks: AsyncIterator[Payload]) -> list[bytes] | str:
    """A stream's chunk bodies, or its error as text (no traceback kept alive)."""
    try:
        return [chunk.body async for chunk in chunks]
    except ShardpoolError as exc:
        return f"{type(exc).__name__}: {exc}"


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


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def running_children() -> list[int]:
    """Our child processes that are alive (earlier tests may leave zombies)."""
    return [c.pid for c in psutil.Process().children() if running(c.pid)]


# ---------------------------------------------------------------- lifecycle


@async_test(timeout=10)
async def test_start_spawns_num_workers_ready() -> None:
    async with Pool(config(num_workers=3)) as pool:
        infos = pool.workers()
        assert len(infos) == pool.size == 3
        assert len({i.pid for i in infos}) == 3
        assert {i.state for i in infos} == {"ready"}


@async_test(timeout=10)
async def test_start_spawns_workers_in_parallel() -> None:
    # Each worker takes 0.6 s to boot: four in sequence would take 2.4 s.
    slow_boot = ["sh", "-c", f"sleep 0.6; exec php {WORKERS / 'echo.php'}"]
    pool = Pool(pool_config(command=slow_boot, num_workers=4, allocate_timeout="5s"))
    began = time.monotonic()
    await pool.start()
    try:
        assert time.monotonic() - began < 1.8
        assert pool.size == 4
    finally:
        await pool.destroy()


@async_test(timeout=10)
async def test_leaving_the_context_destroys_every_worker() -> None:
    async with Pool(config()) as pool:
        started = pids(pool)
    assert pool.workers() == []
    assert pool.size == 0
    assert not any(running(pid) for pid in started)


@async_test(timeout=10)
async def test_explicit_start_and_destroy() -> None:
    pool = Pool(config())
    await pool.start()
    try:
        assert (await pool.exec(b"echo:hi")).body == b"hi"
    finally:
        await pool.destroy()
    assert pool.workers() == []


@async_test(timeout=10)
async def test_starting_twice_raises() -> None:
    async with Pool(config(num_workers=1)) as pool:
        with pytest.raises(ShardpoolError, match="already started"):
            await pool.start()


@async_test(timeout=10)
async def test_exec_before_start_raises_pool_closed() -> None:
    with pytest.raises(PoolClosedError):
        await Pool(config()).exec(b"echo:early")


# ---------------------------------------------------------------- exec and stream


@async_test(timeout=15)
async def test_exec_returns_the_workers_reply(relay: str) -> None:
    async with Pool(config("echo.php", relay=relay)) as pool:
        reply = await pool.exec(Payload(b"hello", b'{"user": 7}'))
        assert (reply.body, reply.context) == (b"hello", b'{"user": 7}')


@async_test(timeout=10)
async def test_exec_accepts_bytes() -> None:
    async with Pool(config()) as pool:
        assert (await pool.exec(b"echo:plain bytes")).body == b"plain bytes"


@async_test(timeout=10)
async def test_stream_yields_every_chunk_then_end() -> None:
    async with Pool(config()) as pool:
        bodies = [chunk.body async for chunk in pool.stream(b"stream:3")]
        assert bodies == [b"chunk 0", b"chunk 1", b"chunk 2", b"end"]


@async_test(timeout=10)
async def test_leaving_a_stream_early_returns_the_worker_to_the_pool() -> None:
    env = {"SHARDPOOL_CHUNK_DELAY_MS": "20"}
    async with Pool(config(num_workers=1, env=env)) as pool:
        (pid,) = pids(pool)
        async with contextlib.aclosing(pool.stream(b"stream:1000")) as chunks:
            first = await anext(chunks)
        assert first.body == b"chunk 0"
        assert (await pool.exec(b"pid")).body == str(pid).encode()
        assert pool.size == 1


@async_test(timeout=10)
async def test_breaking_out_of_a_stream_cancels_it_and_keeps_the_worker() -> None:
    # No aclosing(): the generator is finalised by the loop; the next job
    # waits until the worker has ended the cancelled stream.
    env = {"SHARDPOOL_CHUNK_DELAY_MS": "20"}
    async with Pool(config(num_workers=1, env=env)) as pool:
        (pid,) = pids(pool)
        async for _ in pool.stream(b"stream:1000"):
            break
        assert (await pool.exec(b"pid")).body == str(pid).encode()


@async_test(timeout=10)
async def test_stream_not_ended_within_stream_timeout_kills_and_replaces_the_worker() -> None:
    # The worker sleeps 3 s between chunks, so it cannot see STOP in 0.2 s.
    env = {"SHARDPOOL_CHUNK_DELAY_MS": "3000"}
    async with Pool(config(num_workers=1, env=env, stream_timeout="200ms")) as pool:
        before = pids(pool)
        began = time.monotonic()
        async with contextlib.aclosing(pool.stream(b"stream:5")) as chunks:
            async for _ in chunks:
                break
        assert time.monotonic() - began < 2.0
        await until(pool, settled(pool, 1, gone=before))
        assert (await pool.exec(b"echo:after")).body == b"after"


# ---------------------------------------------------------------- submit (callbacks)


class Outcomes:
    """Collects ``Pool.submit`` outcomes by tag; a waiter wakes when ``n`` are in."""

    def __init__(self) -> None:
        self.got: dict[object, list[Payload | ShardpoolError]] = collections.defaultdict(list)
        self.changed = asyncio.Event()

    def callback(self, tag: object) -> Callable[[Payload | ShardpoolError], None]:
        def record(outcome: Payload | ShardpoolError) -> None:
            self.got[tag].append(outcome)
            self.changed.set()

        return record

    async def wait(self, n: int) -> None:
        while sum(map(len, self.got.values())) < n:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), WAIT)


@pytest.mark.parametrize("depth", [1, 4])
@async_test(timeout=15)
async def test_submit_answers_every_job_once_through_its_callback(depth: int) -> None:
    outcomes = Outcomes()
    async with Pool(config(pipeline_depth=depth)) as pool:
        for i in range(300):
            body = f"echo:{i}" if i % 3 else f"error:bad {i}"
            pool.submit(Payload(body.encode()), outcomes.callback(i), timeout=5)
        await outcomes.wait(300)
    assert sorted(outcomes.got) == list(range(300))
    for i, answers in outcomes.got.items():
        assert len(answers) == 1
        (outcome,) = answers
        if i % 3:
            assert isinstance(outcome, Payload) and outcome.body == str(i).encode()
        else:
            assert isinstance(outcome, SoftJobError) and str(outcome) == f"bad {i}"


@async_test(timeout=15)
async def test_submit_reruns_a_job_after_a_stop_request_and_reports_a_crash() -> None:
    env = {"SHARDPOOL_STOP_AFTER": "1"}
    outcomes = Outcomes()
    async with Pool(config("stop_after.php", num_workers=1, env=env)) as pool:
        for i in range(3):  # each worker takes one job, then refuses the next
            pool.submit(Payload(f"job {i}".encode()), outcomes.callback(i))
        await outcomes.wait(3)
        assert {i: [o.body for o in got] for i, got in outcomes.got.items()} == {  # type: ignore[union-attr]
            i: [f"job {i}".encode()] for i in range(3)
        }
    async with Pool(config(num_workers=1)) as pool:
        pool.submit(Payload(b"crash:3"), outcomes.callback("crash"))
        await outcomes.wait(4)
        (crash,) = outcomes.got["crash"]
        assert isinstance(crash, WorkerCrashedError) and "status 3" in str(crash)
        assert (await pool.exec(b"echo:after")).body == b"after"


@async_test(timeout=15)
async def test_a_failing_submit_callback_leaves_the_worker_serving() -> None:
    outcomes = Outcomes()

    def broken(outcome: Payload | ShardpoolError) -> None:
        raise RuntimeError("a bug in the caller's callback")

    async with Pool(config(num_workers=1, pipeline_depth=2)) as pool:
        (pid,) = pids(pool)
        pool.submit(Payload(b"echo:1"), broken)
        pool.submit(Payload(b"echo:2"), outcomes.callback(2))
        await outcomes.wait(1)
        assert (await pool.exec(b"pid")).body == str(pid).encode()
    assert [o.body for o in outcomes.got[2]] == [b"2"]  # type: ignore[union-attr]


@async_test(timeout=15)
async def test_a_submit_callback_may_submit_the_next_job() -> None:
    outcomes = Outcomes()
    async with Pool(config(num_workers=1)) as pool:

        def chain(i: int) -> Callable[[Payload | ShardpoolError], None]:
            def next_one(outcome: Payload | ShardpoolError) -> None:
                outcomes.callback(i)(outcome)
                if i < 50:
                    pool.submit(Payload(f"echo:{i + 1}".encode()), chain(i + 1))

            return next_one

        pool.submit(Payload(b"echo:0"), chain(0))
        await outcomes.wait(51)
    assert [outcomes.got[i][0].body for i in range(51)] == [  # type: ignore[union-attr]
        str(i).encode() for i in range(51)
    ]


async def _late_job(
    pool: Pool, busy: bytes, late: bytes, deadline_in: float, timeout: float | None = None
) -> tuple[Payload | ShardpoolError, float]:
    """Keep the pool's one worker on ``busy``, submit ``late`` with a deadline
    ``deadline_in`` s away; return the late job's outcome and the seconds it took."""
    outcomes = Outcomes()
    pool.submit(Payload(busy), outcomes.callback("busy"))
    started = time.monotonic()
    pool.submit(Payload(late), outcomes.callback("late"), timeout, deadline=started + deadline_in)
    await outcomes.wait(2)
    (outcome,) = outcomes.got["late"]
    return outcome, time.monotonic() - started


@async_test(timeout=15)
async def test_a_submitted_job_still_queued_at_its_deadline_times_out_and_never_runs() -> None:
    async with Pool(config(num_workers=1)) as pool:
        late, _ = await _late_job(pool, b"sleep:500", b"echo:late", 0.1)
        assert isinstance(late, JobTimeoutError) and "never ran" in str(late)
        assert pool.workers()[0].jobs == 1  # only the slow job ran


@async_test(timeout=15)
async def test_a_submitted_job_that_starts_late_gets_only_the_time_left() -> None:
    async with Pool(config(num_workers=1)) as pool:
        # 0.6 s to its deadline, 0.3 s of it spent waiting: the 0.5 s job is cut
        late, took = await _late_job(pool, b"sleep:300", b"sleep:500", 0.6, timeout=0.6)
    assert isinstance(late, ExecTTLError), late
    assert took < 0.75, took  # at its deadline, not 0.6 s after it started


@async_test(timeout=15)
async def test_a_stream_still_queued_at_its_deadline_times_out_and_never_runs() -> None:
    outcomes = Outcomes()
    async with Pool(config(num_workers=1)) as pool:
        pool.submit(Payload(b"sleep:300"), outcomes.callback("busy"))  # takes the one worker
        chunks: list[Payload] = []
        with pytest.raises(JobTimeoutError, match="never ran"):
            async for chunk in pool.stream(b"stream:2", deadline=time.monotonic() + 0.1):
                chunks.append(chunk)
        await outcomes.wait(1)
        assert chunks == []
        assert pool.workers()[0].jobs == 1  # only the busy job ran; no retry either


@async_test(timeout=15)
async def test_a_stream_that_starts_late_gets_only_the_time_left() -> None:
    outcomes = Outcomes()
    async with Pool(config(num_workers=1)) as pool:
        pool.submit(Payload(b"sleep:300"), outcomes.callback("busy"))
        started = time.monotonic()
        # 0.6 s to its deadline, 0.3 s of it spent waiting: the 0.5 s stream is cut
        with pytest.raises(ExecTTLError):
            async for _ in pool.stream(b"sleep:500", 0.6, deadline=started + 0.6):
                pass
        assert time.monotonic() - started < 0.75


@async_test(timeout=15)
async def test_withdrawn_streams_never_run_and_their_iterators_say_so() -> None:
    outcomes = Outcomes()
    async with Pool(config(num_workers=1)) as pool:
        pool.submit(Payload(b"sleep:200"), outcomes.callback("busy"))  # takes the one worker

        async def consume(tag: int) -> list[bytes] | ShardpoolError:
            try:
                return [chunk.body async for chunk in pool.stream(b"stream:2", tag=tag)]
            except ShardpoolError as exc:
                return exc

        streams = [asyncio.create_task(consume(tag)) for tag in (1, 2, 3)]
        await poll(lambda: pool.queue_size == 3)
        assert pool.withdraw_streams(lambda tag: tag != 2) == [1, 3]
        first, second, third = await asyncio.gather(*streams)
        assert second == [b"chunk 0", b"chunk 1", b"end"]
        for taken in (first, third):
            assert isinstance(taken, UnavailableError) and "never ran" in str(taken)
        assert pool.workers()[0].jobs == 2  # the busy job and stream 2
        assert pool.withdraw_streams() == []


@async_test(timeout=15)
async def test_withdrawn_jobs_never_run_and_their_callbacks_stay_silent() -> None:
    outcomes = Outcomes()
    async with Pool(config(num_workers=1)) as pool:
        pool.submit(Payload(b"sleep:200"), outcomes.callback("slow"))
        for i in range(5):
            pool.submit(Payload(f"echo:{i}".encode()), outcomes.callback(i), tag=i)
        assert [s.tag for s in pool.queued()] == [0, 1, 2, 3, 4]
        taken = pool.withdraw(lambda s: s.tag % 2 == 0)
        assert [s.tag for s in taken] == [0, 2, 4]
        assert [s.tag for s in pool.queued()] == [1, 3]
        before = pool.progress
        await outcomes.wait(3)  # the slow job, then 1 and 3
        assert pool.progress != before
        assert pool.withdraw() == []
        assert pool.workers()[0].jobs == 3  # the withdrawn ones never ran
    assert sorted(outcomes.got, key=str) == [1, 3, "slow"]


# ---------------------------------------------------------------- reset, add, remove


@async_test(timeout=10)
async def test_reset_replaces_every_worker() -> None:
    async with Pool(config(num_workers=3)) as pool:
        before = pids(pool)
        await pool.reset()
        assert settled(pool, 3, gone=before)()
        assert (await pool.exec(b"echo:fresh")).body == b"fresh"


@async_test(timeout=10)
async def test_reset_lets_jobs_in_flight_finish() -> None:
    async with Pool(config()) as pool:
        before = pids(pool)
        job = asyncio.create_task(pool.exec(b"sleep:300"))
        await one_loop_turn()
        await pool.reset()
        assert (await job).body == b"slept"
        assert settled(pool, 2, gone=before)()


@async_test(timeout=10)
async def test_add_worker_grows_the_pool() -> None:
    async with Pool(config()) as pool:
        before = pids(pool)
        await pool.add_worker()
        assert pool.size == 3
        assert len(pids(pool) - before) == 1


@async_test(timeout=10)
async def test_remove_worker_shrinks_the_pool() -> None:
    async with Pool(config(num_workers=3)) as pool:
        await pool.remove_worker()
        assert pool.size == len(pool.workers()) == 2
        assert (await pool.exec(b"echo:still serving")).body == b"still serving"


@async_test(timeout=10)
async def test_remove_worker_spares_a_worker_running_a_job() -> None:
    async with Pool(config()) as pool:
        job = asyncio.create_task(pool.exec(b"sleep:300"))
        await one_loop_turn()
        await pool.remove_worker()
        assert (await job).body == b"slept"
        assert pool.size == 1


@async_test(timeout=10)
async def test_remove_worker_never_removes_the_last_one() -> None:
    async with Pool(config(num_workers=1)) as pool:
        (pid,) = pids(pool)
        with pytest.raises(ShardpoolError, match="last worker"):
            await pool.remove_worker()
        assert pids(pool) == {pid}
        assert pool.size == 1


@async_test(timeout=10)
async def test_remove_worker_while_workers_are_starting_still_shrinks_the_pool() -> None:
    async with Pool(config(num_workers=1)) as pool:
        await asyncio.gather(
            pool.add_worker(), pool.add_worker(), pool.remove_worker(), pool.remove_worker()
        )
        with contextlib.suppress(TimeoutError):
            await until(pool, settled(pool, 1), timeout=2.0)
        assert (pool.size, len(pool.workers())) == (1, 1)


@async_test(timeout=10)
async def test_removed_worker_is_not_replaced() -> None:
    async with Pool(config(num_workers=2)) as pool:
        await pool.remove_worker()
        with pytest.raises(WorkerCrashedError):
            await pool.exec(b"crash:1")
        await until(pool, settled(pool, 1))
        assert pool.size == 1


# ---------------------------------------------------------------- inspection


@async_test(timeout=10)
async def test_workers_reports_pid_state_jobs_created_at_and_memory() -> None:
    began = time.time()
    async with Pool(config(num_workers=1)) as pool:
        pid = int((await pool.exec(b"pid")).body)
        await pool.exec(b"echo:a")
        await pool.exec(b"echo:b")
        (info,) = pool.workers()
        assert info.pid == pid
        assert info.state == "ready"
        assert info.jobs == 3
        assert info.in_flight == 0
        assert began <= info.created_at <= time.time()
        assert info.memory > 1024 * 1024


@async_test(timeout=10)
async def test_workers_reports_a_worker_running_a_job_as_working() -> None:
    async with Pool(config(num_workers=1)) as pool:
        job = asyncio.create_task(pool.exec(b"sleep:200"))
        await one_loop_turn()
        (info,) = pool.workers()
        assert (info.state, info.in_flight) == ("working", 1)
        await job


@async_test(timeout=10)
async def test_queue_size_counts_jobs_waiting_for_a_worker() -> None:
    async with Pool(config(num_workers=1)) as pool:
        assert pool.queue_size == 0
        jobs = [asyncio.create_task(pool.exec(b"sleep:100")) for _ in range(4)]
        await one_loop_turn()
        assert pool.queue_size == 3
        await asyncio.gather(*jobs)
        assert pool.queue_size == 0


# ---------------------------------------------------------------- allocation


@async_test(timeout=10)
async def test_job_waits_for_a_free_worker() -> None:
    async with Pool(config(num_workers=1)) as pool:
        slow = asyncio.create_task(pool.exec(b"sleep:200"))
        fast = asyncio.create_task(pool.exec(b"echo:waited"))
        assert (await fast).body == b"waited"
        assert slow.done()  # it got the worker only after the slow job
        assert (await slow).body == b"slept"


@async_test(timeout=10)
async def test_no_free_worker_within_allocate_timeout_raises() -> None:
    async with Pool(config(num_workers=1, allocate_timeout="200ms")) as pool:
        busy = asyncio.create_task(pool.exec(b"sleep:1500"))
        await one_loop_turn()
        began = time.monotonic()
        with pytest.raises(NoFreeWorkersError, match="allocate_timeout"):
            await pool.exec(b"echo:too late")
        assert 0.15 < time.monotonic() - began < 1.4
        assert pool.queue_size == 0
        assert (await busy).body == b"slept"


@async_test(timeout=10)
async def test_job_beyond_max_queue_size_fails_at_once() -> None:
    async with Pool(config(num_workers=1, max_queue_size=2)) as pool:
        busy = asyncio.create_task(pool.exec(b"sleep:300"))
        queued = [asyncio.create_task(pool.exec(f"echo:{i}".encode())) for i in range(2)]
        await one_loop_turn()
        with pytest.raises(QueueFullError, match="max_queue_size"):
            await pool.exec(b"echo:one too many")
        assert not busy.done()
        assert [(await q).body for q in queued] == [b"0", b"1"]
        await busy


@async_test(timeout=10)
async def test_jobs_within_max_queue_size_all_succeed() -> None:
    async with Pool(config(num_workers=1, max_queue_size=3)) as pool:
        replies = await asyncio.gather(*(pool.exec(f"echo:{i}".encode()) for i in range(4)))
        assert [r.body for r in replies] == [b"0", b"1", b"2", b"3"]


@async_test(timeout=10)
async def test_cancelled_queued_job_never_runs() -> None:
    async with Pool(config(num_workers=1)) as pool:
        (pid,) = pids(pool)
        busy = asyncio.create_task(pool.exec(b"sleep:200"))
        doomed = asyncio.create_task(pool.exec(b"crash:9"))  # would replace the worker if run
        await one_loop_turn()
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert pool.queue_size == 0
        assert (await busy).body == b"slept"
        assert (await pool.exec(b"pid")).body == str(pid).encode()


@async_test(timeout=10)
async def test_stream_failing_before_it_starts_logs_no_unretrieved_error() -> None:
    async with Pool(config(num_workers=1, allocate_timeout="200ms")) as pool:
        busy = asyncio.create_task(pool.exec(b"sleep:600"))
        await one_loop_turn()
        with loop_errors() as errors:
            outcome = await bodies_or_error(pool.stream(b"stream:2"))
            gc.collect()  # here, not in the middle of a later test
        await busy
        assert isinstance(outcome, str) and outcome.startswith("NoFreeWorkersError")
        assert [e.get("message") for e in errors] == []


# ---------------------------------------------------------------- soft errors, stop requests


@async_test(timeout=10)
async def test_soft_error_returns_the_workers_text_and_keeps_the_worker() -> None:
    async with Pool(config(num_workers=1)) as pool:
        (pid,) = pids(pool)
        with pytest.raises(SoftJobError) as caught:
            await pool.exec(b"error:bad input")
        assert str(caught.value) == "bad input"
        assert (await pool.exec(b"pid")).body == str(pid).encode()


@async_test(timeout=10)
async def test_stop_request_runs_the_job_again_on_another_worker() -> None:
    env = {"SHARDPOOL_STOP_AFTER": "1"}
    async with Pool(config("stop_after.php", num_workers=1, env=env)) as pool:
        first = pids(pool)
        assert (await pool.exec(b"one")).body == b"one"
        assert (await pool.exec(b"two")).body == b"two"  # refused by the first worker
        await until(pool, settled(pool, 1, gone=first))


@async_test(timeout=15)
async def test_stop_requests_are_invisible_to_concurrent_callers() -> None:
    env = {"SHARDPOOL_STOP_AFTER": "2"}
    async with Pool(config("stop_after.php", env=env)) as pool:
        bodies = [f"job {i}".encode() for i in range(20)]
        replies = await asyncio.gather(*(pool.exec(body) for body in bodies))
        assert [r.body for r in replies] == bodies
        await until(pool, settled(pool, 2))


@async_test(timeout=15)
async def test_job_refused_by_every_worker_fails_with_worker_stopped() -> None:
    async with Pool(config()) as pool:
        with pytest.raises(WorkerStoppedError, match="refused"):
            await pool.exec(b"stop")
        await until(pool, settled(pool, 2))


# ---------------------------------------------------------------- crashes


@async_test(timeout=15)
async def test_crash_mid_job_raises_with_exit_status_and_stderr(relay: str) -> None:
    async with Pool(config(relay=relay)) as pool:
        with pytest.raises(WorkerCrashedError) as caught:
            await pool.exec(b"crash:7")
        assert "exited with status 7" in str(caught.value)
        assert "crashing on purpose with exit code 7" in str(caught.value)


@async_test(timeout=15)
async def test_crashed_worker_is_replaced(relay: str) -> None:
    async with Pool(config(relay=relay)) as pool:
        before = pids(pool)
        with pytest.raises(WorkerCrashedError):
            await pool.exec(b"crash:1")
        await until(pool, lambda: settled(pool, 2)() and len(pids(pool) - before) == 1)
        assert (await pool.exec(b"echo:ok")).body == b"ok"


@async_test(timeout=15)
async def test_pool_never_shrinks_under_concurrent_crashes() -> None:
    async with Pool(config()) as pool:
        before = pids(pool)
        results = await asyncio.gather(
            *(pool.exec(b"crash:2") for _ in range(6)), return_exceptions=True
        )
        assert all(isinstance(r, WorkerCrashedError) for r in results), results
        await until(pool, settled(pool, 2, gone=before))


@async_test(timeout=10)
async def test_worker_killed_while_idle_is_replaced() -> None:
    async with Pool(config()) as pool:
        victim = pool.workers()[0].pid
        os.kill(victim, signal.SIGKILL)
        await until(pool, settled(pool, 2, gone={victim}))
        replies = await asyncio.gather(*(pool.exec(b"echo:%d" % i) for i in range(4)))
        assert [r.body for r in replies] == [b"0", b"1", b"2", b"3"]


@async_test(timeout=10)
async def test_crash_during_reset_reports_exit_status_and_stderr() -> None:
    async with Pool(config(num_workers=1)) as pool:
        job = asyncio.create_task(pool.exec(b"crash:7"))
        await one_loop_turn()
        await pool.reset()
        with pytest.raises(WorkerCrashedError) as caught:
            await job
        assert "exited with status 7" in str(caught.value)
        assert "crashing on purpose with exit code 7" in str(caught.value)


# ---------------------------------------------------------------- max_jobs


@async_test(timeout=10)
async def test_max_jobs_retires_the_worker_unnoticed() -> None:
    async with Pool(config("pid.php", num_workers=1, max_jobs=3)) as pool:
        served = [int((await pool.exec(b"who")).body) for _ in range(9)]
        assert len(set(served)) == 3
        assert served[0:3] == [served[0]] * 3
        assert served[3:6] == [served[3]] * 3
        assert served[6:9] == [served[6]] * 3
        await until(pool, settled(pool, 1, gone={served[0], served[3]}))


@async_test(timeout=15)
async def test_max_jobs_never_fails_a_concurrent_job() -> None:
    async with Pool(config("pid.php", max_jobs=3)) as pool:
        replies = await asyncio.gather(*(pool.exec(b"who") for _ in range(30)))
        counts = collections.Counter(int(r.body) for r in replies)
        assert sum(counts.values()) == 30
        assert max(counts.values()) <= 3
        await until(pool, settled(pool, 2))


# ---------------------------------------------------------------- supervisor


@async_test(timeout=10)
async def test_ttl_retires_a_ready_worker() -> None:
    supervisor = {**FAST_TICK, "ttl": "300ms"}
    async with Pool(config(num_workers=1, supervisor=supervisor)) as pool:
        before = pids(pool)
        await until(pool, settled(pool, 1, gone=before))


@async_test(timeout=10)
async def test_ttl_never_kills_a_worker_under_a_running_job() -> None:
    # The supervisor is ticked by hand while the job runs, so the test does
    # not depend on when a periodic tick falls (the periodic ticks are tested above).
    async with Pool(config(num_workers=1, supervisor=MANUAL_TICK | {"ttl": "1ms"})) as pool:
        (pid,) = pids(pool)
        job = asyncio.create_task(pool.exec(b"sleep:300"))
        await one_loop_turn()
        pool._supervisor.tick()
        assert [(i.pid, i.state) for i in pool.workers()] == [(pid, "ttl_reached")]
        assert (await job).body == b"slept"
        await until(pool, settled(pool, 1, gone={pid}))


@async_test(timeout=10)
async def test_idle_ttl_retires_an_idle_worker() -> None:
    supervisor = {**FAST_TICK, "idle_ttl": "300ms"}
    async with Pool(config(num_workers=1, supervisor=supervisor)) as pool:
        before = pids(pool)
        await until(pool, settled(pool, 1, gone=before))


@async_test(timeout=10)
async def test_idle_ttl_does_not_count_time_spent_on_a_job() -> None:
    supervisor = {**FAST_TICK, "idle_ttl": "300ms"}
    async with Pool(config(num_workers=1, supervisor=supervisor)) as pool:
        (pid,) = pids(pool)
        assert (await pool.exec(b"sleep:600")).body == b"slept"
        assert (await pool.exec(b"pid")).body == str(pid).encode()


@async_test(timeout=10)
async def test_max_worker_memory_retires_a_ready_worker() -> None:
    supervisor = {**FAST_TICK, "max_worker_memory": 48}
    env = {"SHARDPOOL_LEAK_KB": str(40 * 1024)}
    async with Pool(config("memleak.php", num_workers=1, env=env, supervisor=supervisor)) as pool:
        (pid,) = pids(pool)
        await pool.exec(b"leak")
        await until(pool, settled(pool, 1, gone={pid}))


@async_test(timeout=10)
async def test_max_worker_memory_never_kills_a_worker_under_a_running_job() -> None:
    supervisor = MANUAL_TICK | {"max_worker_memory": 48}
    async with Pool(config(num_workers=1, supervisor=supervisor)) as pool:
        (pid,) = pids(pool)
        # The sleep job is written in the same callback that answers the leak,
        # so the worker is never idle in between; the supervisor is ticked by hand.
        leak = asyncio.create_task(pool.exec(f"mem:{40 * 1024}".encode()))
        slow = asyncio.create_task(pool.exec(b"sleep:500"))
        await leak
        pool._supervisor.tick()
        assert [(i.pid, i.state) for i in pool.workers()] == [(pid, "max_memory_reached")]
        assert (await slow).body == b"slept"
        await until(pool, settled(pool, 1, gone={pid}))


@async_test(timeout=10)
async def test_small_memory_use_keeps_the_worker() -> None:
    supervisor = {**FAST_TICK, "max_worker_memory": 256}
    async with Pool(config(num_workers=1, supervisor=supervisor)) as pool:
        (pid,) = pids(pool)
        await pool.exec(b"mem:1024")
        await pool.exec(b"sleep:200")  # several ticks
        assert (await pool.exec(b"pid")).body == str(pid).encode()


@async_test(timeout=10)
async def test_exec_ttl_kills_the_job_and_replaces_the_worker() -> None:
    supervisor = {"exec_ttl": "200ms"}
    async with Pool(config(num_workers=1, supervisor=supervisor)) as pool:
        before = pids(pool)
        began = time.monotonic()
        with pytest.raises(ExecTTLError):
            await pool.exec(b"sleep:5000")
        assert time.monotonic() - began < 2.0
        await until(pool, settled(pool, 1, gone=before))
        assert (await pool.exec(b"echo:next")).body == b"next"


@async_test(timeout=10)
async def test_exec_timeout_argument_is_the_jobs_exec_ttl() -> None:
    async with Pool(config(num_workers=1)) as pool:
        before = pids(pool)
        with pytest.raises(ExecTTLError, match=re.escape("0.2s")):
            await pool.exec(b"sleep:5000", timeout=0.2)
        await until(pool, settled(pool, 1, gone=before))


@async_test(timeout=10)
async def test_a_jobs_timeout_cannot_outlast_the_operators_exec_ttl() -> None:
    async with Pool(config(num_workers=1, supervisor={"exec_ttl": "200ms"})) as pool:
        with pytest.raises(ExecTTLError, match=re.escape("0.2s")):
            await pool.exec(b"sleep:5000", timeout=60)


@async_test(timeout=10)
async def test_job_within_exec_ttl_is_answered() -> None:
    async with Pool(config(num_workers=1, supervisor={"exec_ttl": "5s"})) as pool:
        (pid,) = pids(pool)
        assert (await pool.exec(b"sleep:50")).body == b"slept"
        assert pids(pool) == {pid}


# ---------------------------------------------------------------- dynamic allocator


@async_test(timeout=10)
async def test_dynamic_allocator_spawns_extra_workers_when_none_is_free() -> None:
    dynamic = {"max_workers": 2, "spawn_rate": 2, "idle_timeout": "10s"}
    async with Pool(config(num_workers=1, dynamic_allocator=dynamic)) as pool:
        jobs = [asyncio.create_task(pool.exec(b"sleep:400")) for _ in range(3)]
        await until(pool, lambda: pool.size == 3)
        assert [(await j).body for j in jobs] == [b"slept"] * 3
        assert sorted(i.jobs for i in pool.workers()) == [1, 1, 1]  # all ran side by side


@async_test(timeout=10)
async def test_dynamic_allocator_spawns_at_most_spawn_rate_per_burst() -> None:
    dynamic = {"max_workers": 5, "spawn_rate": 1, "idle_timeout": "10s"}
    async with Pool(config(num_workers=1, dynamic_allocator=dynamic)) as pool:
        replies = await asyncio.gather(*(pool.exec(b"sleep:300") for _ in range(4)))
        assert [r.body for r in replies] == [b"slept"] * 4
        assert pool.size == len(pool.workers()) == 2


@async_test(timeout=10)
async def test_dynamic_allocator_never_exceeds_max_workers_extras() -> None:
    dynamic = {"max_workers": 2, "spawn_rate": 5, "idle_timeout": "10s"}
    async with Pool(config(num_workers=1, dynamic_allocator=dynamic)) as pool:
        replies = await asyncio.gather(*(pool.exec(b"sleep:300") for _ in range(6)))
        assert [r.body for r in replies] == [b"slept"] * 6
        assert pool.size == len(pool.workers()) == 3


@async_test(timeout=10)
async def test_dynamic_allocator_bursts_at_most_once_per_interval_up_to_max_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The burst interval is one second; shortened here so that three bursts fit.
    monkeypatch.setattr(allocator, "BURST_INTERVAL", 0.1)
    dynamic = {"max_workers": 2, "spawn_rate": 1, "idle_timeout": "10s"}
    async with Pool(config(num_workers=1, dynamic_allocator=dynamic)) as pool:
        jobs = []
        for expected in (2, 3, 3):
            jobs += [asyncio.create_task(pool.exec(b"sleep:300")) for _ in range(4)]
            await until(pool, lambda n=expected: pool.size >= n)  # type: ignore[misc]
            await asyncio.sleep(0.15)  # past the burst interval (time is what is tested)
            assert pool.size == expected
        await asyncio.gather(*jobs)
        assert pool.size == 3


@async_test(timeout=10)
async def test_extra_workers_are_removed_after_idle_timeout() -> None:
    dynamic = {"max_workers": 2, "spawn_rate": 2, "idle_timeout": "200ms"}
    async with Pool(config(num_workers=1, dynamic_allocator=dynamic, supervisor=FAST_TICK)) as pool:
        jobs = [asyncio.create_task(pool.exec(b"sleep:200")) for _ in range(3)]
        await until(pool, lambda: pool.size == 3)
        await asyncio.gather(*jobs)
        await until(pool, settled(pool, 1))
        assert (await pool.exec(b"echo:base")).body == b"base"


# ---------------------------------------------------------------- debug mode


@async_test(timeout=10)
async def test_debug_mode_runs_every_job_on_a_fresh_worker() -> None:
    async with Pool(config("pid.php", debug=True)) as pool:
        served = [int((await pool.exec(b"who")).body) for _ in range(3)]
        assert len(set(served)) == 3


@async_test(timeout=10)
async def test_debug_mode_stops_each_worker_after_its_job() -> None:
    async with Pool(config("pid.php", debug=True)) as pool:
        pid = int((await pool.exec(b"who")).body)
        assert not running(pid)
        assert pool.workers() == []


@async_test(timeout=10)
async def test_debug_mode_streams_on_a_fresh_worker() -> None:
    async with Pool(config(debug=True, allocate_timeout="1s")) as pool:
        with loop_errors() as errors:
            outcome = await bodies_or_error(pool.stream(b"stream:2"))
            gc.collect()
        assert outcome == [b"chunk 0", b"chunk 1", b"end"]
        assert errors == []
        assert pool.workers() == []


@async_test(timeout=15)
async def test_debug_mode_runs_at_most_num_workers_jobs_at_once() -> None:
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, len(running_children()))
            await asyncio.sleep(0.005)

    async with Pool(config(debug=True, num_workers=2)) as pool:
        watcher = asyncio.create_task(watch())
        started = time.monotonic()
        jobs = [asyncio.create_task(pool.exec(b"sleep:200")) for _ in range(6)]
        await poll(lambda: pool.queue_size == 4)  # two run, four wait their turn
        replies = await asyncio.gather(*jobs)
        took = time.monotonic() - started
        watcher.cancel()
    assert len(replies) == 6
    assert most == 2, most  # never more PHP processes than num_workers
    assert took >= 0.55, took  # three rounds of two


@async_test(timeout=15)
async def test_debug_mode_waits_for_a_worker_as_queued_jobs_do() -> None:
    outcomes = Outcomes()
    async with Pool(config(debug=True, num_workers=1, allocate_timeout="300ms")) as pool:
        pool.submit(Payload(b"sleep:800"), outcomes.callback("busy"))
        # past its deadline before the one worker frees up: it never runs
        pool.submit(
            Payload(b"echo:late"), outcomes.callback("late"), deadline=time.monotonic() + 0.1
        )
        # no deadline: it waits allocate_timeout, then gives up
        pool.submit(Payload(b"echo:waits"), outcomes.callback("waits"))
        await outcomes.wait(2)
        (late,) = outcomes.got["late"]
        assert isinstance(late, JobTimeoutError) and "never ran" in str(late)
        (waits,) = outcomes.got["waits"]
        assert isinstance(waits, NoFreeWorkersError), waits
        await outcomes.wait(3)
        assert isinstance(outcomes.got["busy"][0], Payload)


@async_test(timeout=15)
async def test_destroy_in_debug_mode_fails_the_jobs_waiting_for_a_turn() -> None:
    pool = Pool(config(debug=True, num_workers=1))
    await pool.start()
    running = asyncio.create_task(pool.exec(b"sleep:300"))
    waiting = asyncio.create_task(pool.exec(b"echo:never"))
    await poll(lambda: pool.queue_size == 1)
    await pool.destroy()
    assert (await running).body == b"slept"
    with pytest.raises(PoolClosedError):
        await waiting
    assert running_children() == []


@async_test(timeout=10)
async def test_destroy_in_debug_mode_waits_for_jobs_in_flight() -> None:
    pool = Pool(config(debug=True))
    await pool.start()
    job = asyncio.create_task(pool.exec(b"sleep:400"))
    await poll(lambda: bool(running_children()))  # the job's worker is up
    await pool.destroy()
    finished = job.done()
    await job  # clean up either way
    assert finished


# ---------------------------------------------------------------- spawn failures


_OPEN_FILES_SCRIPT = """
import asyncio, resource, sys
from shardpool import Pool, ShardpoolError, pool_config

async def main():
    config = pool_config(command=["php", sys.argv[1]], num_workers=30)
    try:
        async with Pool(config) as pool:
            replies = await asyncio.gather(*(pool.exec(b"x") for _ in range(60)))
            print("ok", len(replies), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except ShardpoolError as exc:
        print(type(exc).__name__, exc)

asyncio.run(main())
"""


@pytest.mark.parametrize("hard", [100_000, 100], ids=["room-above-soft", "hard-limit-too-low"])
def test_a_pool_makes_room_for_its_open_files_or_says_why_it_cannot(hard: int) -> None:
    # 30 workers need about 300 descriptors; the soft limit is 100.
    hard = min(hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1])

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))

    done = subprocess.run(
        [sys.executable, "-c", _OPEN_FILES_SCRIPT, str(WORKERS / "echo.php")],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = done.stdout.strip()
    if hard > 100:
        assert out.startswith("ok 60"), out + done.stderr[-2000:]
        assert int(out.split()[-1]) > 100  # the soft limit was raised
    else:
        assert out.startswith("AllocateError"), out + done.stderr[-2000:]
        assert "too many open files (the limit is 100" in out and "ulimit -n" in out


@pytest.mark.parametrize("why", ["in use", "path too long", "no such directory"])
@async_test(timeout=10)
async def test_start_fails_naming_a_relay_it_cannot_listen_on(why: str, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        if why == "in use":
            taken = stack.enter_context(socket.socket())
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            relay = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        elif why == "path too long":
            relay = f"unix://{tmp_path}/{'d' * 120}.sock"
        else:
            relay = f"unix://{tmp_path}/missing/w.sock"
        pool = Pool(config(relay=relay))
        with pytest.raises(ConfigError, match="cannot listen there") as caught:
            await pool.start()
    assert relay in str(caught.value)
    assert running_children() == []


@async_test(timeout=10)
async def test_start_fails_when_the_command_is_missing() -> None:
    command = ["/nonexistent/shardpool-worker"]
    pool = Pool(pool_config(command=command, num_workers=2, allocate_timeout="5s"))
    with pytest.raises(AllocateError, match="command not found"):
        await pool.start()
    assert pool.workers() == []


@async_test(timeout=10)
async def test_start_fails_with_the_fatal_error_of_a_worker_failing_at_boot() -> None:
    pool = Pool(config("failboot.php"))
    with pytest.raises(AllocateError, match="undefined_function_at_boot"):
        await pool.start()
    assert pool.workers() == []


@async_test(timeout=10)
async def test_start_stops_the_workers_that_did_boot_when_another_fails(tmp_path: Path) -> None:
    # The first worker to create the directory runs PHP; the others exit 3,
    # after their handshake began (the other order has its own test below).
    lock = tmp_path / "first"
    echo = WORKERS / "echo.php"
    script = f"mkdir {lock} 2>/dev/null && exec php {echo}; sleep 0.2; echo no-boot >&2; exit 3"
    pool = Pool(pool_config(command=["sh", "-c", script], num_workers=3, allocate_timeout="5s"))
    with pytest.raises(AllocateError, match="no-boot"):
        await pool.start()
    assert pool.workers() == []  # and no_leaked_php checks that PHP is gone


@async_test(timeout=10)
async def test_start_fails_at_once_with_the_cause_when_a_worker_dies_before_the_handshake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Force the order a loaded machine produces now and then: the process has
    # exited and been reaped before the handshake starts.
    handshake = Worker.handshake

    async def late_handshake(self: Worker, timeout: float) -> None:
        await asyncio.wait_for(asyncio.shield(self.done), WAIT)
        await handshake(self, timeout)

    monkeypatch.setattr(Worker, "handshake", late_handshake)
    command = ["sh", "-c", "echo gone-at-boot >&2; exit 3"]
    pool = Pool(pool_config(command=command, num_workers=1, allocate_timeout="1s"))
    began = time.monotonic()
    with pytest.raises(AllocateError, match="gone-at-boot"):
        await pool.start()
    assert time.monotonic() - began < 0.8


# ---------------------------------------------------------------- destroy


@async_test(timeout=10)
async def test_destroy_lets_jobs_in_flight_finish() -> None:
    pool = Pool(config())
    await pool.start()
    job = asyncio.create_task(pool.exec(b"sleep:300"))
    await one_loop_turn()
    await pool.destroy()
    assert (await job).body == b"slept"


@async_test(timeout=10)
async def test_destroy_kills_jobs_running_past_destroy_timeout() -> None:
    pool = Pool(config(destroy_timeout="200ms"))
    await pool.start()
    job = asyncio.create_task(pool.exec(b"sleep:5000"))
    await one_loop_turn()
    began = time.monotonic()
    await pool.destroy()
    assert time.monotonic() - began < 2.0
    with pytest.raises((WorkerCrashedError, PoolClosedError)):
        await job


@async_test(timeout=10)
async def test_queued_jobs_fail_with_pool_closed_on_destroy() -> None:
    pool = Pool(config(num_workers=1))
    await pool.start()
    running_job = asyncio.create_task(pool.exec(b"sleep:300"))
    queued = [asyncio.create_task(pool.exec(b"echo:queued")) for _ in range(2)]
    await one_loop_turn()
    await pool.destroy()
    assert (await running_job).body == b"slept"
    for job in queued:
        with pytest.raises(PoolClosedError):
            await job


@async_test(timeout=10)
async def test_exec_during_destroy_fails_with_pool_closed() -> None:
    pool = Pool(config(num_workers=1))
    await pool.start()
    running_job = asyncio.create_task(pool.exec(b"sleep:300"))
    await one_loop_turn()
    destroying = asyncio.create_task(pool.destroy())
    await one_loop_turn()
    with pytest.raises(PoolClosedError):
        await pool.exec(b"echo:late")
    await destroying
    assert (await running_job).body == b"slept"


@async_test(timeout=10)
async def test_exec_after_destroy_fails_with_pool_closed() -> None:
    async with Pool(config()) as pool:
        pass
    with pytest.raises(PoolClosedError):
        await pool.exec(b"echo:too late")


@async_test(timeout=10)
async def test_pool_operations_after_destroy_fail_with_pool_closed() -> None:
    async with Pool(config()) as pool:
        pass
    for operation in (pool.reset, pool.add_worker, pool.remove_worker):
        with pytest.raises(PoolClosedError):
            await operation()


SLOW_BOOT = ["sh", "-c", f"sleep 0.3; exec php {WORKERS / 'commands.php'}"]


def reap_leftovers() -> list[tuple[int, str]]:
    """Our children still running a moment after destroy(); killed, for the record."""
    children = [psutil.Process(pid) for pid in running_children()]
    _, alive = psutil.wait_procs(children, timeout=1.0)  # killed ones: a moment to exit
    left = [(proc.pid, proc.name()) for proc in alive]
    for proc in alive:  # clean up before asserting, so only this test fails
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=3)
    return left


@async_test(timeout=10)
async def test_destroy_during_a_replacement_handshake_leaves_no_php(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handshaking = asyncio.Event()
    handshake = Worker.handshake

    async def signalled_handshake(self: Worker, timeout: float) -> None:
        handshaking.set()
        await handshake(self, timeout)

    monkeypatch.setattr(Worker, "handshake", signalled_handshake)
    pool = Pool(pool_config(command=SLOW_BOOT, num_workers=1))
    await pool.start()
    handshaking.clear()
    with pytest.raises(WorkerCrashedError):
        await pool.exec(b"crash:1")
    await asyncio.wait_for(handshaking.wait(), WAIT)  # the replacement's handshake
    await pool.destroy()
    assert reap_leftovers() == []


@async_test(timeout=10)
async def test_destroy_just_after_a_replacement_process_starts_leaves_no_php() -> None:
    pool = Pool(pool_config(command=SLOW_BOOT, num_workers=1))
    await pool.start()
    first = pids(pool)
    with pytest.raises(WorkerCrashedError):
        await pool.exec(b"crash:1")
    # Destroy in the first loop turn that sees the replacement's process (no
    # pool event says so: look every turn).
    while not set(running_children()) - first:
        await one_loop_turn()
    await pool.destroy()
    assert reap_leftovers() == []


@async_test(timeout=10)
async def test_every_destroy_call_returns_once_the_workers_are_gone() -> None:
    pool = Pool(config())
    await pool.start()
    job = asyncio.create_task(pool.exec(b"sleep:300"))
    await one_loop_turn()
    first = asyncio.create_task(pool.destroy())
    await one_loop_turn()
    await pool.destroy()
    left = pool.workers()
    await first
    await job
    assert left == []


# ---------------------------------------------------------------- concurrency


@async_test(timeout=30)
async def test_5000_concurrent_execs_each_get_exactly_their_own_answer() -> None:
    async with Pool(config("echo.php")) as pool:
        with loop_errors() as errors:
            bodies = [b"job %d" % i for i in range(5000)]
            replies = await asyncio.gather(
                *(pool.exec(Payload(body, b"c%d" % i)) for i, body in enumerate(bodies))
            )
            assert [r.body for r in replies] == bodies
            assert [r.context for r in replies] == [b"c%d" % i for i in range(5000)]
            assert sum(i.jobs for i in pool.workers()) == 5000
        assert errors == []
