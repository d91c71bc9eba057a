"""The service end to end: client -> broker -> shards -> PHP and back.

Same total PHP workers in every configuration; baselines in the same run:
the in-process Pool and the C limit dispatcher (../shared/tools/limit).

    .venv/bin/python bench/service_bench.py [--workers 2] [--shards 1,2] [--concurrency 16,256]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import uvloop
from common import (
    ECHO,
    ROOT,
    Run,
    Series,
    drive,
    limit_run,
    machine,
    series_row,
    size_label,
    table,
)
from pool_bench import measure_pool

from shardpool.argtypes import positive_int
from shardpool.benchmark.command import counts, seconds, sizes
from shardpool.client import AsyncClient, Client


def start_service(shards: int, workers_per_shard: int, port: int) -> subprocess.Popen[bytes]:
    address = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardpool", "serve", "--frontend", address,
         "--shards", str(shards), "--workers", str(workers_per_shard), "--worker", str(ECHO)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    with Client(address, timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                if len(client.stats()["shards"]) == shards:
                    return proc
            except Exception:
                pass
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the service did not start")


async def measure_service(address: str, concurrency: int, size: int, duration: float) -> Run:
    body = b"x" * size
    async with AsyncClient(address, timeout=30) as client:
        return await drive(lambda: client.exec(body), concurrency, duration)


def measure_map(address: str, size: int, duration: float, window: int) -> Run:
    body = b"x" * size
    with Client(address, timeout=30) as client:
        done = 0
        start = time.perf_counter()
        deadline = start + duration
        while time.perf_counter() < deadline:
            done += sum(1 for _ in client.map([body] * 20_000, window=window))
        elapsed = time.perf_counter() - start
    return Run(done / elapsed, 0.0, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=positive_int, default=2, help="total PHP workers")
    parser.add_argument("--shards", type=counts, default=[1, 2])
    parser.add_argument("--concurrency", type=counts, default=[16, 256])
    parser.add_argument("--sizes", type=sizes, default=[16, 1024])
    parser.add_argument("--repeat", type=positive_int, default=3)
    parser.add_argument("--duration", type=seconds, default=2.0)
    args = parser.parse_args()
    print(machine(), flush=True)
    headers = ["body", "path", "in flight", "jobs/s", "p50 µs", "p99 µs", "× limit", "× Pool"]
    rows: list[list[str]] = []
    port = 17600 + os.getpid() % 1000
    for size in args.sizes:
        limit = Series("C limit")
        pools = {c: Series("in-process Pool") for c in args.concurrency}
        services = {
            (s, c): Series(f"serve, {s} shard(s)") for s in args.shards for c in args.concurrency
        }
        maps = {s: Series(f"serve, {s} shard(s), Client.map") for s in args.shards}
        for _ in range(args.repeat):
            limit.runs.append(limit_run(args.workers, size, args.duration))
            for c in args.concurrency:
                pools[c].runs.append(
                    uvloop.run(measure_pool(args.workers, c, size, args.duration, "1", False))
                )
            for s in args.shards:
                proc = start_service(s, max(1, args.workers // s), port)
                address = f"tcp://127.0.0.1:{port}"
                try:
                    for c in args.concurrency:
                        services[(s, c)].runs.append(
                            uvloop.run(measure_service(address, c, size, args.duration))
                        )
                    maps[s].runs.append(measure_map(address, size, args.duration, 1024))
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
        block = [
            [
                size_label(size),
                limit.name,
                "W",
                f"{limit.jobs_s:,.0f}",
                f"{limit.p50_us:.0f}",
                f"{limit.p99_us:.0f}",
                "1.00",
                "",
            ]
        ]
        for c, series in pools.items():
            block.append(
                series_row(
                    [size_label(size), series.name, str(c)],
                    series,
                    series.jobs_s / limit.jobs_s,
                    1.0,
                )
            )
        for (_s, c), series in services.items():
            ratios = (series.jobs_s / limit.jobs_s, series.jobs_s / pools[c].jobs_s)
            block.append(series_row([size_label(size), series.name, str(c)], series, *ratios))
        for series in maps.values():
            best_pool = max(p.jobs_s for p in pools.values())
            block.append(
                [
                    size_label(size),
                    series.name,
                    "1024",
                    f"{series.jobs_s:,.0f}",
                    "-",
                    "-",
                    f"{series.jobs_s / limit.jobs_s:.2f}",
                    f"{series.jobs_s / best_pool:.2f}",
                ]
            )
        print(table(headers, block), flush=True)
        rows.extend(block)
    print()
    print(
        f"W={args.workers} PHP workers in total; "
        f"medians of {args.repeat} interleaved runs of {args.duration:g}s"
    )
    print(table(headers, rows))


if __name__ == "__main__":
    main()
