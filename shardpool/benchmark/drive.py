"""Client load for benchmarks: callers in a loop, a warm-up, then a measured window.

:func:`drive` is the one load loop of ``shardpool bench`` and of the scripts
in ``bench/``: ``concurrency`` callers each await ``call()`` in a loop, so
exactly that many jobs are in flight; a job's latency runs from its submit
to its reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Sample:
    """What one measured window saw: jobs done, wall time, every job's latency (s)."""

    done: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)  # sorted

    def __post_init__(self) -> None:
        self.latencies.sort()

    @property
    def jobs_s(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the latencies in seconds; 0 with none."""
        values = self.latencies
        if not values:
            return 0.0
        return values[min(len(values) - 1, int(q * len(values)))]

    @property
    def max(self) -> float:
        return self.latencies[-1] if self.latencies else 0.0


Hook = Callable[[], object]


async def drive(
    call: Callable[[], Awaitable[object]],
    concurrency: int,
    duration: float,
    *,
    warmup: float | None = None,
    on_start: Hook | None = None,
    on_stop: Hook | None = None,
) -> Sample:
    """Run ``concurrency`` callers of ``call()``: ``warmup`` seconds (default
    ``min(0.5, duration / 4)``) unrecorded, then ``duration`` seconds measured.

    ``on_start`` and ``on_stop`` run right at the edges of the measured
    window (for example to read CPU counters); the window ends when the last
    caller's last job returns.
    """
    latencies: list[float] = []
    clock = time.perf_counter

    async def caller(until: float, record: bool) -> None:
        while True:
            start = clock()
            if start >= until:
                return
            await call()
            if record:
                latencies.append(clock() - start)

    warm = clock() + (min(0.5, duration / 4) if warmup is None else warmup)
    await asyncio.gather(*(caller(warm, False) for _ in range(concurrency)))
    if on_start is not None:
        on_start()
    start = clock()
    await asyncio.gather(*(caller(start + duration, True) for _ in range(concurrency)))
    elapsed = clock() - start
    if on_stop is not None:
        on_stop()
    return Sample(len(latencies), elapsed, latencies)
