"""The ``shardpool`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence

import uvloop

from shardpool.config import DEFAULT_WORKER, pool_config
from shardpool.errors import ShardpoolError
from shardpool.payload import Payload
from shardpool.pool import Pool


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part]


def _size_list(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = 1
        for suffix, mult in (
            ("kib", 1024),
            ("kb", 1024),
            ("k", 1024),
            ("mib", 1 << 20),
            ("m", 1 << 20),
            ("b", 1),
        ):
            if part.endswith(suffix):
                part, scale = part[: -len(suffix)], mult
                break
        sizes.append(_positive_int(part) * scale)
    return sizes


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardpool",
        description="Run jobs on persistent PHP workers (RoadRunner's worker model).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser(
        "bench",
        help="measure jobs/s and latency on the bundled echo worker",
        description="Run echo jobs through an in-process pool and print jobs/s and latency.",
    )
    bench.add_argument(
        "--workers", type=_int_list, default=[2], help="workers, e.g. 1,2,4 (default 2)"
    )
    bench.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 16, 64],
        help="jobs in flight (default 1,16,64)",
    )
    bench.add_argument("--size", type=_size_list, default=[16], help="body bytes, e.g. 16,1k,64k")
    bench.add_argument("--duration", type=_positive_float, default=2.0, help="seconds per run")
    bench.add_argument(
        "--worker", default=str(DEFAULT_WORKER), help="PHP worker script (must echo)"
    )
    bench.add_argument("--quick", action="store_true", help="one short run per configuration")
    return parser


async def _bench_one(
    pool: Pool, concurrency: int, size: int, duration: float
) -> tuple[int, float, list[float]]:
    payload = Payload(b"x" * size)
    latencies: list[float] = []
    deadline = time.perf_counter() + duration
    done = 0

    async def client() -> None:
        nonlocal done
        clock = time.perf_counter
        while True:
            start = clock()
            if start >= deadline:
                return
            await pool.exec(payload)
            latencies.append(clock() - start)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done, time.perf_counter() - start, latencies


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _bench(args: argparse.Namespace) -> int:
    duration = 0.5 if args.quick else args.duration
    print(f"{'workers':>7} {'in flight':>9} {'size':>7} {'jobs/s':>9} {'p50 µs':>8} {'p99 µs':>8}")
    for workers in args.workers:
        async with Pool(pool_config(command=["php", args.worker], num_workers=workers)) as pool:
            await _bench_one(pool, 4, 16, 0.2)  # warm-up
            for size in args.size:
                for concurrency in args.concurrency:
                    done, elapsed, lat = await _bench_one(pool, concurrency, size, duration)
                    print(
                        f"{workers:>7} {concurrency:>9} {size:>7} {done / elapsed:>9.0f} "
                        f"{_pct(lat, 0.5) * 1e6:>8.0f} {_pct(lat, 0.99) * 1e6:>8.0f}",
                        flush=True,
                    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "bench":
            return uvloop.run(_bench(args))
    except ShardpoolError as exc:
        print(f"shardpool: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    os._exit(main())
