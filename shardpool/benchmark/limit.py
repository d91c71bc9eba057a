"""The raw limit: every PHP worker kept busy by a minimal driver, no pool logic.

One Python process per PHP worker, each doing the simplest correct
ping-pong over the worker's pipes: a blocking ``os.write`` of a goridge job
frame, then blocking ``os.read`` until the reply frame is whole. With one job
in flight per worker nothing in Python does less per job, so this is what the
PHP workers themselves can do on this machine: any pool, shard or broker can
only add to it. (It is the in-package stand-in for the C dispatcher in
``bench/``: it needs no compiler.)

The parent (:func:`measure_limit`) starts one driver per worker with
``python -m shardpool.benchmark.limit``; each warms up, prints ``ready PID``
(its PHP worker's pid), waits for ``go`` on stdin, runs for the measured
time, writes a JSON line (jobs, seconds) followed by its latencies as
float64 bytes, and stops its worker when its stdin closes.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from shardpool.benchmark.cpu import CpuMeter
from shardpool.benchmark.drive import Sample
from shardpool.errors import ShardpoolError
from shardpool.ipc import worker_env
from shardpool.protocol import ERROR, FrameDecoder, encode_control, encode_job

PIPE_SIZE = 1 << 20  # as the pool's pipes (shardpool.ipc.pipe): one read per 64 KiB reply
READY_TIMEOUT = 30.0  # seconds for a driver to spawn PHP, handshake and warm up


class BenchmarkError(ShardpoolError):
    """A benchmark run could not be done (a worker that does not echo, a driver that failed)."""


# -- the driver process ---------------------------------------------------------


class _Echo:
    """One PHP worker over blocking pipes."""

    def __init__(self, command: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=worker_env("pipes", None),
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        for fd in (self.wfd, self.rfd):
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.decoder = FrameDecoder()

    def roundtrip(self, frame: bytes) -> bytes:
        view = memoryview(frame)
        while view:
            view = view[os.write(self.wfd, view) :]
        while True:
            data = os.read(self.rfd, 65536)
            if not data:
                raise BenchmarkError(f"PHP worker exited (status {self.proc.wait(5)})")
            got = self.decoder.feed(data)
            if got:
                if got[0].flags & ERROR:
                    raise BenchmarkError(f"the worker answered an error: {got[0].payload[:200]!r}")
                return got[0].payload

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _drive(echo: _Echo, job: bytes, duration: float) -> tuple[int, float, list[float]]:
    latencies: list[float] = []
    append = latencies.append
    roundtrip = echo.roundtrip
    clock = time.perf_counter
    start = clock()
    deadline = start + duration
    while True:
        t = clock()
        if t >= deadline:
            break
        roundtrip(job)
        append(clock() - t)
    return len(latencies), clock() - start, latencies


def driver_main(argv: Sequence[str]) -> int:
    """``python -m shardpool.benchmark.limit SIZE DURATION WARMUP -- COMMAND...``"""
    size, duration, warmup = int(argv[0]), float(argv[1]), float(argv[2])
    command = list(argv[argv.index("--") + 1 :])
    echo = _Echo(command)
    out = sys.stdout.buffer
    try:
        echo.roundtrip(encode_control(json.dumps({"pid": os.getpid()}).encode()))
        body = b"x" * size
        job = encode_job(body)
        if echo.roundtrip(job) != body:
            raise BenchmarkError(f"the worker {' '.join(command)} does not echo the job body")
        _drive(echo, job, warmup)
        out.write(b"ready %d\n" % echo.proc.pid)
        out.flush()
        if sys.stdin.readline().strip() != "go":
            return 0
        done, elapsed, latencies = _drive(echo, job, duration)
        out.write(json.dumps({"jobs": done, "seconds": elapsed}).encode() + b"\n")
        out.write(array.array("d", latencies).tobytes())
        out.flush()
        sys.stdin.readline()  # PHP stays up until the parent has read the CPU counters
        return 0
    except KeyboardInterrupt:  # a Ctrl-C at the terminal reaches the whole process group
        return 130
    except (BenchmarkError, OSError) as exc:
        print(f"limit driver: {exc}", file=sys.stderr)
        return 1
    finally:
        echo.close()


# -- the parent side ----------------------------------------------------------------


async def _ready(proc: asyncio.subprocess.Process) -> int:
    assert proc.stdout is not None and proc.stderr is not None
    line = await proc.stdout.readline()
    if not line.startswith(b"ready "):
        await proc.wait()
        err = (await proc.stderr.read()).decode(errors="replace").strip()
        raise BenchmarkError(f"the limit driver failed: {err or 'no output'}")
    return int(line.split()[1])


async def _result(proc: asyncio.subprocess.Process) -> tuple[int, float, list[float]]:
    assert proc.stdout is not None
    head = json.loads(await proc.stdout.readline())
    latencies = array.array("d")
    latencies.frombytes(await proc.stdout.readexactly(8 * head["jobs"]))
    return int(head["jobs"]), float(head["seconds"]), latencies.tolist()


async def measure_limit(
    command: Sequence[str], workers: int, size: int, duration: float, warmup: float
) -> tuple[Sample, dict[str, float]]:
    """``workers`` drivers, one PHP worker each, measured together for ``duration`` s.

    Returns the merged sample and the CPU use of the drivers (``client``) and
    of the PHP workers (``php``).
    """
    argv = [sys.executable, "-m", "shardpool.benchmark.limit"]
    argv += [str(size), repr(duration), repr(warmup), "--", *command]
    pipe = asyncio.subprocess.PIPE
    procs: list[asyncio.subprocess.Process] = []
    try:
        for _ in range(workers):
            procs.append(
                await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe, stderr=pipe)
            )
        async with asyncio.timeout(READY_TIMEOUT + warmup):
            php = await asyncio.gather(*(_ready(p) for p in procs))
        meter = CpuMeter({"client": [p.pid for p in procs], "php": php})
        meter.start()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        async with asyncio.timeout(duration + READY_TIMEOUT):
            results = await asyncio.gather(*(_result(p) for p in procs))
        cpu = meter.stop()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        async with asyncio.timeout(10):  # each driver stops its PHP worker, then exits
            await asyncio.gather(*(p.wait() for p in procs))
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
    jobs = sum(r[0] for r in results)
    seconds = sum(r[1] for r in results) / len(results)
    return Sample(jobs, seconds, [x for r in results for x in r[2]]), cpu


if __name__ == "__main__":
    sys.exit(driver_main(sys.argv[1:]))
