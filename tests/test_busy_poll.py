"""Busy polling (``busy_poll``): after writing a job to an idle worker, the
pool's event loop polls for a moment instead of blocking, and adapts how long.

What a user relies on: it is on by default and ``0`` turns it off; it never
changes a reply; a pool waiting on slow jobs, or on nothing, stops polling and
costs no CPU. The adaptation itself is driven by hand on a real event loop
(the time since the last kick is set, not waited for).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from conftest import async_test, php

from shardpool import Payload, Pool, PoolConfig, pool_config
from shardpool.config import DEFAULT_BUSY_POLL
from shardpool.worker.busypoll import (
    CHECK_EVERY,
    CONTENDED,
    GROW_START,
    SHRINK_STOP,
    BusyPoll,
)

LONGEST = "10ms"  # the largest busy_poll: what a spin that never adapted would cost
ALLOWED = os.sched_getaffinity(0)
# A pool on one CPU does not poll (test_a_pool_that_may_run_on_one_cpu_does_not_poll).
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="a pool on one CPU does not poll")


def config(**options: Any) -> PoolConfig:
    options.setdefault("num_workers", 1)
    options.setdefault("destroy_timeout", "5s")
    return pool_config(command=php("commands.php"), **options)


@needs_two_cpus
@async_test()
async def test_a_pool_polls_by_default_and_0_turns_it_off() -> None:
    async with Pool(config()) as on, Pool(config(busy_poll=0)) as off:
        for pool in (on, off):
            assert (await pool.exec(b"echo:hi")).body == b"hi"
        assert [w.busy_poll for w in off._workers] == [None]
        polling = {w.busy_poll for w in on._workers}
        assert len(polling) == 1
        (shared,) = polling
        assert shared is not None and shared.limit == DEFAULT_BUSY_POLL
        assert shared.spins >= 1


@needs_two_cpus
@async_test()
async def test_workers_of_a_pool_share_one_poller_and_every_job_is_answered() -> None:
    async with Pool(config(num_workers=3, busy_poll="50us")) as pool:
        bodies = [f"echo:{i}".encode() for i in range(300)]
        replies = await asyncio.gather(*(pool.exec(body) for body in bodies))
        assert [r.body for r in replies] == [str(i).encode() for i in range(300)]
        assert len({id(w.busy_poll) for w in pool._workers}) == 1


@needs_two_cpus
@async_test()
async def test_a_pool_waiting_on_slow_jobs_stops_polling() -> None:
    # 30 jobs of 20 ms one after another. A spin of 10 ms that never adapted
    # would burn 300 ms of CPU; the adaptive one halves on each long wait.
    async with Pool(config(busy_poll=LONGEST)) as pool:
        cpu = time.process_time()
        for _ in range(30):
            assert (await pool.exec(b"sleep:20")).body == b"slept"
        spent = time.process_time() - cpu
        (worker,) = pool._workers
        assert worker.busy_poll is not None
        assert worker.busy_poll.window == 0.0
    assert spent < 0.15, f"the pool's process spent {spent:.3f}s of CPU on 30 slow jobs"


@needs_two_cpus
@async_test()
async def test_many_workers_on_slow_jobs_stop_polling_though_replies_come_often() -> None:
    # 4 workers on 40 ms jobs, started 10 ms apart: a reply comes every 10 ms,
    # soon after the last job went out, but each job took 40 ms. The spin
    # adapts to the jobs' own times: it must stop, not poll between replies.
    async with Pool(config(num_workers=4, busy_poll=LONGEST)) as pool:

        async def caller(offset: float) -> None:
            await asyncio.sleep(offset)  # staggers the load; not a synchronisation
            for _ in range(10):
                assert (await pool.exec(b"sleep:40")).body == b"slept"

        cpu = time.process_time()
        await asyncio.gather(*(caller(i * 0.01) for i in range(4)))
        spent = time.process_time() - cpu
        assert {w.busy_poll.window for w in pool._workers if w.busy_poll} == {0.0}
    assert spent < 0.15, f"the pool's process spent {spent:.3f}s of CPU on 40 slow jobs"


@needs_two_cpus
@async_test()
async def test_an_idle_pool_stops_polling() -> None:
    async with Pool(config(busy_poll=LONGEST)) as pool:
        await pool.exec(b"echo:x")
        (worker,) = pool._workers
        poller = worker.busy_poll
        assert poller is not None
        async with asyncio.timeout(5):
            while poller.spinning:  # a spin runs out 10 ms after the last kick
                await asyncio.sleep(0.005)
        cpu = time.process_time()
        await asyncio.sleep(0.3)  # idle, measured: not a synchronisation
        spent = time.process_time() - cpu
    assert spent < 0.1, f"an idle pool spent {spent:.3f}s of CPU in 0.3s"


@needs_two_cpus
def test_a_pool_that_may_run_on_one_cpu_does_not_poll() -> None:
    # On one CPU the reply a spin waits for needs that very CPU: no spin.
    os.sched_setaffinity(0, {min(ALLOWED)})
    try:

        @async_test()
        async def run() -> None:
            async with Pool(config(busy_poll=LONGEST)) as pool:
                assert (await pool.exec(b"echo:one")).body == b"one"
                assert [w.busy_poll for w in pool._workers] == [None]

        run()
    finally:
        os.sched_setaffinity(0, ALLOWED)


# ------------------------------------------------- the adaptation, by hand


@async_test()
async def test_a_spin_runs_out_after_its_window_and_the_loop_may_block() -> None:
    poller = BusyPoll(asyncio.get_running_loop(), 0.002)
    poller.kick(time.monotonic())
    assert poller.spinning and not poller.asleep
    async with asyncio.timeout(5):
        while poller.spinning:
            await asyncio.sleep(0.001)
    assert poller.asleep
    assert poller.spins == 1


@async_test()
async def test_a_job_pipelined_behind_another_stops_the_spin_at_its_next_pass() -> None:
    poller = BusyPoll(asyncio.get_running_loop(), 0.01)
    poller.kick(time.monotonic())
    poller.saturated()  # every worker is busy: the CPU is theirs
    for _ in range(3):  # loop passes, each far shorter than the 10 ms spin
        await asyncio.sleep(0)
    assert not poller.spinning and poller.asleep


@async_test()
async def test_a_spin_that_keeps_being_preempted_pauses_spinning() -> None:
    poller = BusyPoll(asyncio.get_running_loop(), 1.0)  # a spin far longer than 64 passes
    poller.preempted -= CONTENDED  # as if the kernel had preempted it since the last check
    poller.kick(time.monotonic())
    async with asyncio.timeout(5):
        while poller.spinning:  # stops at its first check
            await asyncio.sleep(0)
    assert poller.passes == CHECK_EVERY
    assert poller.backoff_until > time.monotonic()
    poller.woke(time.monotonic())  # the reply to that job
    poller.kick(time.monotonic())  # during the pause a job starts no spin
    assert not poller.spinning and poller.spins == 1
    # ... but its reply still adapts the spin: slow jobs during a pause must
    # not leave a long spin waiting for the pause to end.
    assert poller.asleep


@async_test()
async def test_a_long_wait_halves_the_spin_down_to_none() -> None:
    limit = 50e-6
    poller = BusyPoll(asyncio.get_running_loop(), limit)
    windows = []
    while poller.window:
        poller.woke(time.monotonic() - 1.0)  # a job that took a second
        windows.append(poller.window)
    assert windows[:3] == [limit / 2, limit / 4, limit / 8]
    assert windows[-2] <= SHRINK_STOP and windows[-1] == 0.0
    # With no spin, a kick leaves the loop to block and says so.
    poller.kick(time.monotonic())
    assert not poller.spinning and poller.asleep


@async_test()
async def test_a_reply_soon_after_the_spin_ran_out_grows_it_back_to_the_limit() -> None:
    limit = 100e-6
    poller = BusyPoll(asyncio.get_running_loop(), limit)
    poller.window = 0.0
    windows = []
    for _ in range(6):
        poller.woke(time.monotonic())  # a job that took no time
        windows.append(poller.window)
    assert windows[0] == GROW_START
    assert windows[1] == 2 * GROW_START
    assert windows[-1] == limit


@async_test()
async def test_a_reply_never_changes_with_busy_polling() -> None:
    payload = Payload(b"body " * 1000, b"ctx")
    async with Pool(config(busy_poll=0)) as plain, Pool(config(busy_poll=LONGEST)) as polled:
        a = await plain.exec(payload)
        b = await polled.exec(payload)
    assert (a.body, a.context) == (b.body, b.context) == (payload.body, payload.context)
