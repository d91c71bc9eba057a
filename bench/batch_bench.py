"""``shardpool batch`` on a million small jobs, against two baselines in the same run.

- **one PHP process per job** (``php workers/oneshot.php``, the body on STDIN,
  as a cron or xargs script would run it), measured on a sample of jobs with
  as many processes at once as there are cores;
- **the in-process Pool** running the same jobs from the same file: parse each
  line and write each result line with batch's own functions, ``window`` jobs
  in flight, as many PHP workers as the service has in total. This is batch
  without the service (no broker, no shards, no ZeroMQ hops).

While ``shardpool batch`` runs, the batch process's RSS is sampled (psutil)
to show memory stays flat: RSS at 10 % of the output, at the end, and peak.
Input and output files go to bench/out/ (git-ignored).

    .venv/bin/python bench/batch_bench.py                       # 1M jobs, ordered
    .venv/bin/python bench/batch_bench.py --repeat 2 --modes ordered,unordered
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import uvloop
from common import ECHO, OUT, ROOT, machine, table

from shardpool import Pool, pool_config
from shardpool.batch import parse_job, result_line

ONESHOT = ROOT / "workers" / "oneshot.php"
SAMPLE_EVERY = 0.1  # seconds between RSS samples


def make_input(jobs: int) -> Path:
    """bench/out/batch_N.jsonl: N small jobs ({"id": i, "body": "job i"}), made once."""
    path = OUT / f"batch_{jobs}.jsonl"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        with part.open("w") as file:
            for i in range(jobs):
                file.write(f'{{"id": {i}, "body": "job {i}"}}\n')
        part.rename(path)
    return path


@dataclass
class BatchRun:
    wall: float  # seconds, the whole command (service start and stop included)
    jobs_s: float  # from batch's own summary: jobs only
    rss_10: int  # bytes, when 10 % of the output was written
    rss_end: int  # bytes, the last sample
    rss_peak: int


_RATE = re.compile(r"\(([\d,]+) jobs/s\)")


def measure_batch(path: Path, mode: str, shards: int, workers: int) -> BatchRun:
    out = OUT / "batch_out.jsonl"
    out.unlink(missing_ok=True)  # its size tells how far the run is
    argv = [sys.executable, "-m", "shardpool", "batch", str(path), "-o", str(out)]
    argv += ["--shards", str(shards), "--workers", str(workers)]
    if mode == "unordered":
        argv.append("--unordered")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    me = psutil.Process(proc.pid)
    samples: list[tuple[int, int]] = []  # (output bytes, rss)
    while proc.poll() is None:
        try:
            rss = me.memory_info().rss
            size = out.stat().st_size if out.exists() else 0
        except (psutil.NoSuchProcess, FileNotFoundError):
            break
        samples.append((size, rss))
        time.sleep(SAMPLE_EVERY)  # sampling another process: nothing to await
    _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"shardpool batch failed ({proc.returncode}):\n{stderr}")
    match = _RATE.search(stderr)
    if match is None:
        raise RuntimeError(f"no summary from shardpool batch:\n{stderr}")
    final = out.stat().st_size
    rss_10 = next(rss for size, rss in samples if size >= final // 10)
    return BatchRun(
        wall, float(match[1].replace(",", "")), rss_10, samples[-1][1], max(r for _, r in samples)
    )


def measure_oneshot(sample: int, concurrency: int) -> float:
    """Jobs/s with one fresh ``php oneshot.php`` per job, ``concurrency`` at once."""

    php = shutil.which("php") or "php"  # a full path lets subprocess use posix_spawn

    def one(i: int) -> None:
        body = f"job {i}".encode()
        done = subprocess.run(
            [php, str(ONESHOT)], input=body, capture_output=True, check=True, close_fds=False
        )
        if done.stdout != body:
            raise RuntimeError(f"oneshot.php answered {done.stdout!r} to {body!r}")

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as threads:
        list(threads.map(one, range(sample)))
    return sample / (time.perf_counter() - start)


async def measure_pool(path: Path, workers: int, window: int) -> float:
    """Jobs/s of the same file through an in-process Pool, results written like batch's."""
    config = pool_config(command=["php", str(ECHO)], num_workers=workers)
    async with Pool(config) as pool:
        with path.open("rb") as source, (OUT / "pool_out.jsonl").open("wb") as sink:
            lines = iter(source)
            done = 0

            async def lane() -> None:
                nonlocal done
                for raw in lines:
                    jid, payload = parse_job(raw)
                    sink.write(result_line(jid, await pool.exec(payload)))
                    done += 1

            start = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                for _ in range(window):
                    group.create_task(lane())
            return done / (time.perf_counter() - start)


def mb(values: list[int]) -> str:
    return f"{statistics.median(values) / 1048576:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--oneshot-sample", type=int, default=2000)
    parser.add_argument("--modes", default="ordered", help="ordered,unordered")
    parser.add_argument("--shards", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="per shard")
    parser.add_argument("--window", type=int, default=1024, help="Pool jobs in flight")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    total_workers = args.shards * args.workers
    print(machine(), flush=True)
    path = make_input(args.jobs)
    modes = args.modes.split(",")
    oneshot: list[float] = []
    pool: list[float] = []
    runs: dict[str, list[BatchRun]] = {mode: [] for mode in modes}
    for _ in range(args.repeat):
        oneshot.append(measure_oneshot(args.oneshot_sample, cores))
        print(f"one PHP process per job: {oneshot[-1]:,.0f} jobs/s", flush=True)
        for mode in modes:
            runs[mode].append(measure_batch(path, mode, args.shards, args.workers))
            print(f"batch {mode}: {runs[mode][-1]}", flush=True)
        pool.append(uvloop.run(measure_pool(path, total_workers, args.window)))
        print(f"in-process Pool: {pool[-1]:,.0f} jobs/s", flush=True)
    base = statistics.median(oneshot)
    pool_rate = statistics.median(pool)
    rows = [
        [f"one PHP process per job ({args.oneshot_sample:,} sampled, {cores} at once)",
         f"{base:,.0f}", "–", "1", "–", "–", "–", "–"],
        [f"in-process Pool, {total_workers} workers, {args.window} in flight",
         f"{pool_rate:,.0f}", "–", f"{pool_rate / base:.0f}", "1.00", "–", "–", "–"],
    ]  # fmt: skip
    for mode, series in runs.items():
        rate = statistics.median(r.jobs_s for r in series)
        rows.append(
            [
                f"shardpool batch, {mode}, {args.shards}×{args.workers} workers",
                f"{rate:,.0f}",
                f"{statistics.median(r.wall for r in series):.1f}",
                f"{rate / base:.0f}",
                f"{rate / pool_rate:.2f}",
                mb([r.rss_10 for r in series]),
                mb([r.rss_end for r in series]),
                mb([r.rss_peak for r in series]),
            ]
        )
    print()
    print(f"{args.jobs:,} jobs of ~10 B, medians of {args.repeat} run(s)")
    headers = ["path", "jobs/s", "wall s", "× 1 proc/job", "× Pool", "RSS@10% MB"]
    print(table([*headers, "RSS@100% MB", "peak MB"], rows))


if __name__ == "__main__":
    main()
