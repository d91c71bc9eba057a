"""Second by second: the service's throughput, and whether each shard ran beside its worker.

Starts ``shardpool serve --shards 2 --workers 1`` (plus any ``--serve`` flags,
e.g. ``--no-pin-shards``), drives it from a child process with one
AsyncClient keeping ``--concurrency`` jobs of 16 B in flight, and every
second prints the jobs answered and, for each shard, how often it and its
PHP worker were last seen on the same CPU (``/proc/PID/stat``, sampled
every 2 ms). On machines where waking another CPU is dear, throughput
follows that pairing; this is what ``pin_shards: auto`` decides from.

    .venv/bin/python bench/placement_trace.py --serve=--no-pin-shards [--seconds 20]
    .venv/bin/python bench/placement_trace.py                # as shipped (auto)
"""

from __future__ import annotations

import argparse
import asyncio
import selectors
import statistics
import subprocess
import sys
import time

from common import ECHO, machine

from shardpool.benchmark.cpu import descendants
from shardpool.benchmark.service import inspect_service
from shardpool.embedded import EmbeddedService

SAMPLE_EVERY = 0.002


def _load(address: str, concurrency: int, seconds: float) -> None:
    """Role ``load``: keep jobs in flight; print the jobs answered each second."""
    import uvloop

    from shardpool.client import AsyncClient

    async def run() -> None:
        async with AsyncClient(address) as client:
            done = 0
            stop = time.monotonic() + seconds

            async def caller() -> None:
                nonlocal done
                while time.monotonic() < stop:
                    await client.exec(b"x" * 16)
                    done += 1

            async def ticks() -> None:
                last = 0
                for _ in range(int(seconds)):
                    await asyncio.sleep(1)
                    print(done - last, flush=True)
                    last = done

            await asyncio.gather(ticks(), *(caller() for _ in range(concurrency)))

    uvloop.run(run())


def last_cpu(pid: int) -> int:
    """The CPU a process last ran on (field 39 of /proc/PID/stat), -1 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return -1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--serve", action="append", default=[], help="a flag for serve")
    args = parser.parse_args()
    print(machine(), flush=True)
    with EmbeddedService(shards=2, workers=1, worker=str(ECHO), extra=args.serve) as svc:
        info = inspect_service(svc.address)
        pairs = [(shard, descendants([shard])[0]) for shard in sorted(info.shard_pids)]
        print(f"serve {' '.join(args.serve) or '(as shipped)'}; pinned: {info.pinned}")
        me = [sys.executable, __file__, "--role", "load", svc.address]
        load = subprocess.Popen(
            [*me, str(args.concurrency), str(args.seconds)], stdout=subprocess.PIPE, text=True
        )
        assert load.stdout is not None
        print("second  jobs/s  paired % (shard 1, shard 2)")
        rows: list[tuple[int, float]] = []
        together = [0] * len(pairs)
        samples = 0
        next_sample = time.monotonic()
        sel = selectors.DefaultSelector()
        sel.register(load.stdout, selectors.EVENT_READ)
        while True:
            if sel.select(timeout=max(0.0, next_sample - time.monotonic())):
                line = load.stdout.readline()
                if not line:
                    break
                paired = [100 * t / max(1, samples) for t in together]
                rows.append((int(line), min(paired)))
                shown = ", ".join(f"{p:3.0f}" for p in paired)
                print(f"{len(rows):6d} {int(line):7,d}  {shown}", flush=True)
                together, samples = [0] * len(pairs), 0
                continue
            for i, (shard, php) in enumerate(pairs):
                together[i] += last_cpu(shard) == last_cpu(php)
            samples += 1
            next_sample = time.monotonic() + SAMPLE_EVERY
        load.wait()
    if rows:
        print(f"every second: median {statistics.median(j for j, _ in rows):,.0f} jobs/s")
    paired = [jobs for jobs, p in rows if p >= 75]
    parted = [jobs for jobs, p in rows if p < 25]
    groups = (("both shards paired (>= 75 %)", paired), ("a shard parted (< 25 %)", parted))
    for name, part in groups:
        if part:
            print(f"{name}: {len(part)} s, median {statistics.median(part):,.0f} jobs/s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--role"]:
        _load(sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    else:
        main()
