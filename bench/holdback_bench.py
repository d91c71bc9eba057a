"""Fast jobs behind slow ones: the service's latency tail with occasional slow jobs.

2 shards x 1 PHP worker (commands.php); callers keep ``--concurrency`` jobs in
flight; a fraction ``--slow`` of them sleep 50 ms, the rest echo. Reported
for the fast jobs only: jobs/s and p50/p99/p99.9 latency. The baseline in
the same run is ``--prefetch 0`` (strict credit: a shard holds nothing, so
nothing can wait behind its slow job); the default prefetch holds jobs for
the workers, and hands them back when every worker is stuck (docs/pool.md).

    .venv/bin/python bench/holdback_bench.py [--slow 0.002] [--concurrency 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import uvloop
from common import ROOT, machine, table

from shardpool.client import AsyncClient
from shardpool.embedded import EmbeddedService

COMMANDS = ROOT / "workers" / "commands.php"


async def measure(address: str, concurrency: int, slow: float, duration: float) -> list[float]:
    """Fast jobs/s, then their p50, p99 and p99.9 latency in ms."""
    rng = random.Random(7)
    latencies: list[float] = []
    async with AsyncClient(address, timeout=30) as client:

        async def caller(until: float, record: bool) -> None:
            while time.perf_counter() < until:
                is_slow = rng.random() < slow
                start = time.perf_counter()
                await client.exec(b"sleep:50" if is_slow else b"echo:x")
                if record and not is_slow:
                    latencies.append(time.perf_counter() - start)

        warm = time.perf_counter() + 0.5
        await asyncio.gather(*(caller(warm, False) for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(caller(start + duration, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def ms(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3

    return [len(latencies) / elapsed, ms(0.5), ms(0.99), ms(0.999)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slow", type=float, default=0.002, help="fraction of 50 ms jobs")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    args = parser.parse_args()
    print(machine(), flush=True)
    runs: dict[str, list[list[float]]] = {"--prefetch 0": [], "default prefetch": []}
    for _ in range(args.repeat):
        for name in runs:
            extra = ["--prefetch", "0"] if name == "--prefetch 0" else []
            with EmbeddedService(shards=2, workers=1, worker=str(COMMANDS), extra=extra) as svc:
                figures = uvloop.run(
                    measure(svc.address, args.concurrency, args.slow, args.duration)
                )
            runs[name].append(figures)
            print(f"{name}: {figures[0]:,.0f} fast jobs/s, p50/p99/p99.9 ms", *figures[1:])
    rows = []
    for name, got in runs.items():
        medians = [statistics.median(r[i] for r in got) for i in range(4)]
        rows.append([name, f"{medians[0]:,.0f}", *(f"{m:.2f}" for m in medians[1:])])
    print()
    print(
        f"2 shards x 1 PHP worker, {args.concurrency} in flight, {args.slow:.1%} of jobs "
        f"sleep 50 ms; fast jobs only; medians of {args.repeat} interleaved runs"
    )
    print(table(["shards hold", "fast jobs/s", "p50 ms", "p99 ms", "p99.9 ms"], rows))


if __name__ == "__main__":
    main()
