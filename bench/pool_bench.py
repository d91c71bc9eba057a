"""The in-process static pool: jobs/s and p50/p99 latency against the physical limit.

For each worker count W and body size, the C limit dispatcher
(../shared/tools/limit: every PHP worker kept busy, no pool logic) is
measured in the same run, interleaved with the pool runs, and every pool
figure is given as a ratio of it.

    .venv/bin/python bench/pool_bench.py          # W 1,2,4 x c 1,16,64 x 16B,1KiB,64KiB
    .venv/bin/python bench/pool_bench.py --depth 1,2,4,auto    # pipelined dispatch
    .venv/bin/python bench/pool_bench.py --mixed --depth 1,auto --workers 2 --concurrency 16
    .venv/bin/python bench/pool_bench.py --busy-poll 0,50us    # with and without busy polling

Within a round the pools run in one order, in the next round in the reverse
order. The limit is measured twice per round: blocking on its workers' replies as
the pool's event loop does, and busy-polling (gbench -b), the limit for a
dispatcher that never blocks.
"""

from __future__ import annotations

import argparse
import random

import uvloop
from common import (
    ECHO,
    ROOT,
    Run,
    Series,
    drive,
    limit_run,
    machine,
    size_label,
    table,
)

from shardpool import Payload, Pool, pool_config
from shardpool.argtypes import busy_poll as busy_poll_arg
from shardpool.argtypes import positive_int
from shardpool.benchmark.command import counts, depths, seconds, sizes
from shardpool.config import DEFAULT_BUSY_POLL


def busy_polls(text: str) -> list[float]:
    """``0,50us`` -> [0.0, 5e-05], each checked as ``--busy-poll`` is."""
    return [busy_poll_arg(p) for p in text.split(",") if p.strip()]


def busy_label(seconds: float) -> str:
    return f", busy poll {seconds * 1e6:g} µs" if seconds else ", no busy poll"


COMMANDS = ROOT / "workers" / "commands.php"


async def measure_pool(
    workers: int,
    concurrency: int,
    size: int,
    duration: float,
    depth: str,
    mixed: bool,
    busy_poll: float = DEFAULT_BUSY_POLL,
) -> Run:
    script = COMMANDS if mixed else ECHO
    depth_value: int | str = depth if depth == "auto" else int(depth)
    config = pool_config(
        command=["php", str(script)],
        num_workers=workers,
        pipeline_depth=depth_value,
        busy_poll=busy_poll,
    )
    fast = Payload(b"echo:" + b"x" * max(0, size - 5)) if mixed else Payload(b"x" * size)
    slow = Payload(b"sleep:50")
    rng = random.Random(7)
    async with Pool(config) as pool:
        return await drive(
            lambda: pool.exec(slow if mixed and rng.random() < 0.01 else fast),
            concurrency,
            duration,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=counts, default=[1, 2, 4])
    parser.add_argument("--concurrency", type=counts, default=[1, 16, 64])
    parser.add_argument("--sizes", type=sizes, default=[16, 1024, 65536])
    parser.add_argument(
        "--depth", type=depths, default=["1"], help="pipeline depths, e.g. 1,2,4,auto"
    )
    parser.add_argument(
        "--mixed", action="store_true", help="1%% of jobs sleep 50 ms (commands.php)"
    )
    parser.add_argument(
        "--busy-poll",
        type=busy_polls,
        default=[DEFAULT_BUSY_POLL],
        help="the pools' busy_poll settings, e.g. 0,50us (default: the pool's default)",
    )
    parser.add_argument("--repeat", type=positive_int, default=3)
    parser.add_argument("--duration", type=seconds, default=2.0)
    args = parser.parse_args()
    levels: list[str] = args.depth  # pipeline depths
    print(machine(), flush=True)
    polls: list[float] = args.busy_poll
    labelled = len(polls) > 1
    headers = [
        "W", "in flight", "body", "dispatch", "jobs/s", "p50 µs", "p99 µs", "× limit", "range",
        "× busy-poll limit",
    ]  # fmt: skip
    rows: list[list[str]] = []
    for workers in args.workers:
        for size in args.sizes:
            limit = Series("C limit (1 job/worker)")
            busy = Series("C limit, busy poll")
            pools = {
                (c, d, b): Series(f"pool depth {d}" + (busy_label(b) if labelled else ""))
                for c in args.concurrency
                for d in levels
                for b in polls
            }
            for round_ in range(args.repeat):
                limit.runs.append(limit_run(workers, size, args.duration))
                busy.runs.append(limit_run(workers, size, args.duration, busy_poll=True))
                # Every other round in reverse: a run measured right after
                # another pool's is slower (by up to a quarter here), and the
                # order must not decide which configuration wins.
                order = list(pools.items())
                for (c, d, b), series in order if round_ % 2 == 0 else reversed(order):
                    run = measure_pool(workers, c, size, args.duration, d, args.mixed, b)
                    series.runs.append(uvloop.run(run))
            block = [
                [str(workers), "-", size_label(size), base.name, f"{base.jobs_s:,.0f}",
                 f"{base.p50_us:.0f}", f"{base.p99_us:.0f}", f"{base.ratio(limit):.2f}", "",
                 f"{base.ratio(busy):.2f}"]
                for base in (limit, busy)
            ]  # fmt: skip
            for (c, _, _), series in pools.items():
                block.append(
                    [
                        str(workers),
                        str(c),
                        size_label(size),
                        series.name,
                        f"{series.jobs_s:,.0f}",
                        f"{series.p50_us:.0f}",
                        f"{series.p99_us:.0f}",
                        f"{series.ratio(limit):.2f}",
                        series.ratio_range(limit),
                        f"{series.ratio(busy):.2f}",
                    ]
                )
            print(table(headers, block), flush=True)
            rows.extend(block)
    print()
    print(
        f"medians of {args.repeat} interleaved runs of {args.duration:g}s each; × limit is the "
        "median of each round's ratio to the limit run just before it, range their spread"
        + (", mixed workload" if args.mixed else "")
    )
    print(table(headers, rows))


if __name__ == "__main__":
    main()
