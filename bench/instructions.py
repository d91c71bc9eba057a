"""CPU instructions per job in the pool's own process, counted by callgrind.

Timings on a shared VM move by 10-30 % from run to run, which hides the
effect of most hot-path changes. An instruction count does not move: the
same code, the same jobs, the same count, whatever else the machine does.
This runs the in-process pool (2 echo workers by default) under
``valgrind --tool=callgrind`` twice, with a small and a larger number of
jobs, and reports the difference per job: start-up and shutdown cancel out.
Only the Python process is counted (PHP runs natively, untraced), and
kernel time is not an instruction count: this measures our code's CPU, not
throughput. Under valgrind Python runs some 50x slower than PHP, so each
read finds several replies waiting: the count is that of the per-job code,
with the event loop's per-pass costs spread thinner than at full speed.
Busy polling is off here (``busy_poll: 0``): what a polling loop executes
while it waits is waiting, not per-job code.
Repeated runs agree within 0.2 %. Needs valgrind (``apt-get install
valgrind``).

    .venv/bin/python bench/instructions.py [--depth 1,4] [--api exec,submit]

To compare two versions, run it with ``PYTHONPATH`` pointing at a checkout
of the other one.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys

import uvloop
from common import ECHO, EventLoopFloor, blocking_roundtrip, echo_worker, machine, names_of, table

from shardpool import Payload, Pool, pool_config
from shardpool.argtypes import positive_int
from shardpool.benchmark.command import depths
from shardpool.ipc import PipeFactory
from shardpool.protocol import encode_job

_REFS = re.compile(r"Collected\s*:\s*(\d+)")


async def _jobs(api: str, jobs: int, workers: int, concurrency: int, depth: str) -> None:
    """Run ``jobs`` jobs through a pool, ``concurrency`` at a time."""
    config = pool_config(
        command=["php", str(ECHO)],
        num_workers=workers,
        pipeline_depth=depth if depth == "auto" else int(depth),
        # A busy-polling loop runs while it waits: its instructions are time
        # spent waiting, not per-job code, and valgrind slows PHP's replies.
        busy_poll=0,
    )
    payload = Payload(b"x" * 16)
    if api in ("blocking", "floor"):
        await _baseline(api, jobs)
        return
    if api == "worker":  # one worker, one job at a time: Worker.exec alone
        worker = await PipeFactory().spawn(["php", str(ECHO)])
        for _ in range(jobs):
            await worker.exec(payload)
        await worker.stop()
        return
    async with Pool(config) as pool:
        if api == "exec":
            left = jobs

            async def caller() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await pool.exec(payload)

            await asyncio.gather(*(caller() for _ in range(concurrency)))
        else:
            loop = asyncio.get_running_loop()
            finished = loop.create_future()
            started = done = 0

            def next_job(_: object = None) -> None:
                nonlocal started, done
                if _ is not None:
                    done += 1
                    if done == jobs:
                        finished.set_result(None)
                if started < jobs:
                    started += 1
                    pool.submit(payload, next_job)

            for _ in range(concurrency):
                next_job()
            await finished


async def _baseline(api: str, jobs: int) -> None:
    """The references, one job at a time on the echo worker, with no shardpool
    code: a blocking write/read driver, or a bare uvloop Protocol that resolves
    a future per reply (the event loop's own cost)."""
    proc = echo_worker()
    assert proc.stdin is not None and proc.stdout is not None
    job = encode_job(b"x" * 16)
    if api == "blocking":
        wfd, rfd = proc.stdin.fileno(), proc.stdout.fileno()
        for _ in range(jobs):
            blocking_roundtrip(wfd, rfd, job)
    else:
        floor = await EventLoopFloor.attach(proc)
        for _ in range(jobs):
            await floor.roundtrip(job)
        floor.close()
    proc.stdin.close()
    proc.wait(5)


def _count(api: str, jobs: int, workers: int, concurrency: int, depth: str) -> int:
    """Instructions of one child process running ``jobs`` jobs under callgrind."""
    argv = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--child", api, str(jobs), str(workers), str(concurrency), depth,
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    found = _REFS.search(result.stderr.replace(",", ""))
    if result.returncode != 0 or found is None:
        raise SystemExit(f"the counted run failed:\n{result.stderr[-2000:]}")
    return int(found.group(1))


APIS = ("exec", "submit", "worker", "blocking", "floor")


def job_counts(text: str) -> tuple[int, int]:
    """``2000,12000`` -> the two job counts, the first the smaller."""
    try:
        few, many = (int(part) for part in text.split(","))
    except ValueError:
        few = many = 0
    if not 0 < few < many:
        raise argparse.ArgumentTypeError(
            f"expected two job counts, the smaller first, e.g. 2000,12000; got {text!r}"
        )
    return few, many


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=positive_int, default=2)
    parser.add_argument("--concurrency", type=positive_int, default=16)
    parser.add_argument(
        "--depth", type=depths, default=["1", "4"], help="pipeline depths, comma-separated"
    )
    parser.add_argument(
        "--api",
        type=names_of(APIS),
        default=["exec", "submit"],
        help="exec (awaiting callers), submit (callbacks), worker (Worker.exec, one at a "
        "time); references, one at a time with no shardpool code: blocking (os.write and "
        "os.read), floor (a bare uvloop Protocol)",
    )
    parser.add_argument("--jobs", type=job_counts, default=(2000, 12000), help="the two job counts")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        api, jobs, workers, concurrency, depth = args.child
        uvloop.run(_jobs(api, int(jobs), int(workers), int(concurrency), depth))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    few, many = args.jobs
    rows = []
    for depth in args.depth:
        for api in args.api:
            low = _count(api, few, args.workers, args.concurrency, depth)
            high = _count(api, many, args.workers, args.concurrency, depth)
            per_job = (high - low) / (many - few)
            rows.append([depth, api, f"{low:,}", f"{high:,}", f"{per_job:,.0f}"])
            print(f"depth {depth}, {api}: {per_job:,.0f} instructions per job", flush=True)
    print()
    print(machine())
    print(
        f"{args.workers} echo workers, {args.concurrency} jobs in flight, 16 B; "
        f"instructions of the pool's process for {few:,} and {many:,} jobs"
    )
    headers = ["depth", "api", f"{few:,} jobs", f"{many:,} jobs", "per job"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
