"""One PHP worker in-process: exec round trips per second and latency.

Baselines measured in the same run, interleaved with ours:
- a minimal blocking Python ping-pong driver (os.write / os.read on the same
  PHP worker script, no event loop);
- the event-loop floor: a bare uvloop Protocol on the same pipes that
  resolves one future per reply, with no shardpool code (what any asyncio
  driver pays: an epoll wake-up, a callback, a task wake-up per job);
- the C limit dispatcher (../shared/tools/limit) with one worker, blocking
  on its replies and busy-polling (-b).

shardpool's Worker runs twice: as is (it blocks in the event loop's wait),
and with the busy polling a pool sets up by default (``busy_poll``).

    .venv/bin/python bench/worker_bench.py [--repeat 3] [--duration 2]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator

import uvloop
from common import (
    ECHO,
    EventLoopFloor,
    Run,
    Series,
    blocking_roundtrip,
    echo_worker,
    limit_run,
    machine,
    run_from_latencies,
    size_label,
    table,
)

from shardpool.argtypes import positive_int
from shardpool.benchmark.command import seconds, sizes
from shardpool.config import DEFAULT_BUSY_POLL
from shardpool.ipc import PipeFactory
from shardpool.payload import Payload
from shardpool.protocol import encode_job
from shardpool.worker.busypoll import BusyPoll


def blocking_driver(size: int, duration: float) -> Run:
    """The simplest Python driver: write a frame, read until its reply is back."""
    proc = echo_worker()
    assert proc.stdin is not None and proc.stdout is not None
    wfd, rfd = proc.stdin.fileno(), proc.stdout.fileno()
    job = encode_job(b"x" * size)
    timed = Timed(duration)
    for _ in timed:
        blocking_roundtrip(wfd, rfd, job)
    proc.stdin.close()
    proc.wait(5)
    return timed.run()


class Timed:
    """One round trip per iteration, timed: ``for _ in timed: await one()``.

    A warm-up of 0.3 s goes unrecorded, then ``duration`` seconds are measured.
    """

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.latencies: list[float] = []
        self.elapsed = 0.0

    def __iter__(self) -> Iterator[None]:
        clock = time.perf_counter
        end = clock() + 0.3
        while clock() < end:
            yield
        latencies = self.latencies
        start = clock()
        deadline = start + self.duration
        while (t := clock()) < deadline:
            yield
            latencies.append(clock() - t)
        self.elapsed = clock() - start

    def run(self) -> Run:
        return run_from_latencies(len(self.latencies), self.elapsed, self.latencies)


async def event_loop_floor(size: int, duration: float) -> Run:
    """The asyncio floor: write a frame, await a future the read callback resolves."""
    proc = echo_worker()
    floor = await EventLoopFloor.attach(proc)
    job = encode_job(b"x" * size)
    timed = Timed(duration)
    for _ in timed:
        await floor.roundtrip(job)
    floor.close()
    await asyncio.to_thread(proc.wait, 5)
    return timed.run()


async def shardpool_worker(size: int, duration: float, busy_poll: float = 0.0) -> Run:
    worker = await PipeFactory().spawn(["php", str(ECHO)])
    if busy_poll:
        worker.busy_poll = BusyPoll(asyncio.get_running_loop(), busy_poll)
    payload = Payload(b"x" * size)
    timed = Timed(duration)
    for _ in timed:
        await worker.exec(payload)
    await worker.stop(5)
    return timed.run()


HEADERS = ["body", "driver", "jobs/s", "p50 µs", "p99 µs", "× Python", "range", "× limit"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=positive_int, default=3)
    parser.add_argument("--duration", type=seconds, default=2.0)
    parser.add_argument("--sizes", type=sizes, default=[16, 1024, 65536])
    args = parser.parse_args()
    print(machine())
    rows = []
    for size in args.sizes:
        ours, py, limit = Series("shardpool Worker"), Series("blocking Python"), Series("C limit")
        floor = Series("event-loop floor")
        busy_limit = Series("C limit, busy poll")
        busy = Series(f"shardpool Worker, busy poll {DEFAULT_BUSY_POLL * 1e6:g} µs")
        for _ in range(args.repeat):
            limit.runs.append(limit_run(1, size, args.duration))
            busy_limit.runs.append(limit_run(1, size, args.duration, busy_poll=True))
            py.runs.append(blocking_driver(size, args.duration))
            floor.runs.append(uvloop.run(event_loop_floor(size, args.duration)))
            ours.runs.append(uvloop.run(shardpool_worker(size, args.duration)))
            busy.runs.append(uvloop.run(shardpool_worker(size, args.duration, DEFAULT_BUSY_POLL)))
        for s in (limit, busy_limit, py, floor, ours, busy):
            rows.append(
                [
                    size_label(size),
                    s.name,
                    f"{s.jobs_s:,.0f}",
                    f"{s.p50_us:.0f}",
                    f"{s.p99_us:.0f}",
                    f"{s.ratio(py):.2f}",
                    s.ratio_range(py),
                    f"{s.ratio(limit):.2f}",
                ]
            )
        print(table(HEADERS, rows[-6:]), flush=True)
    print()
    print(
        f"medians of {args.repeat} interleaved runs of {args.duration:g}s each; a ratio is the "
        "median of each round's ratio to that round's baseline run, range their spread"
    )
    print(table(HEADERS, rows))


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
