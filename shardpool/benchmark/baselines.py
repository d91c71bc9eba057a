"""Two of the baselines every ``shardpool bench`` figure is a ratio of.

- :func:`measure_pool`: the in-process :class:`shardpool.Pool` with the same
  total PHP workers, driven at the same concurrency: what the service costs
  over using the library directly.
- :func:`measure_per_job`: one ``php`` process per job, a tiny script that
  echoes its STDIN: what running PHP without persistent workers gives.

The third, the raw limit of the PHP workers, is in :mod:`shardpool.benchmark.limit`.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path

from shardpool.benchmark.cpu import CpuMeter
from shardpool.benchmark.drive import Sample, drive
from shardpool.benchmark.limit import BenchmarkError
from shardpool.config import pool_config
from shardpool.payload import Payload
from shardpool.pool import Pool

PER_JOB_SCRIPT = "<?php\n// one process per job: read the job from STDIN, answer on STDOUT\n"
PER_JOB_SCRIPT += "echo stream_get_contents(STDIN);\n"
PER_JOB_TIMEOUT = 30.0  # seconds for one php process to start, answer and exit


async def measure_pool(
    command: Sequence[str],
    workers: int,
    concurrency: int,
    size: int,
    duration: float,
    warmup: float,
    depth: str = "1",
    busy_poll: float | None = None,
) -> tuple[Sample, dict[str, float]]:
    """The in-process pool of ``workers`` PHP workers, ``concurrency`` jobs in flight,
    up to ``depth`` of them in one worker's pipe (``busy_poll``: None for the default).

    CPU: this process (``client``: the callers and the pool) and the workers (``php``).
    """
    payload = Payload(b"x" * size)
    config = pool_config(
        None if busy_poll is None else {"busy_poll": busy_poll},
        command=list(command),
        num_workers=workers,
        pipeline_depth=depth if depth == "auto" else int(depth),
    )
    async with Pool(config) as pool:
        return await measure_echo(
            lambda: pool.exec(payload),
            payload.body,
            f"the worker {' '.join(command)}",
            lambda: {"client": [os.getpid()], "php": [w.pid for w in pool.workers()]},
            concurrency,
            duration,
            warmup,
        )


async def measure_echo(
    call: Callable[[], Awaitable[Payload]],
    body: bytes,
    who: str,
    cpu_groups: Callable[[], Mapping[str, Iterable[int]]],
    concurrency: int,
    duration: float,
    warmup: float,
) -> tuple[Sample, dict[str, float]]:
    """Check ``call`` echoes ``body``, then drive it and meter the CPU of ``cpu_groups``."""
    reply = await call()
    if reply.body != body:
        raise BenchmarkError(f"{who} does not echo the job body")
    meter = CpuMeter(cpu_groups())
    sample = await drive(
        call, concurrency, duration, warmup=warmup, on_start=meter.start, on_stop=meter.stop
    )
    return sample, meter.result


async def _one_php(script: str, body: bytes) -> None:
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec("php", script, stdin=pipe, stdout=pipe, stderr=pipe)
    try:
        async with asyncio.timeout(PER_JOB_TIMEOUT):
            out, err = await proc.communicate(body)
    finally:
        if proc.returncode is None:  # cancelled or timed out: leave no php behind
            proc.kill()
            await proc.wait()
    if out != body:
        why = err.decode(errors="replace").strip() or f"{len(out)} bytes back for {len(body)}"
        raise BenchmarkError(f"php per job did not echo: {why}")


async def measure_per_job(
    parallel: int, size: int, duration: float, warmup: float
) -> tuple[Sample, dict[str, float]]:
    """``parallel`` callers each spawning ``php echo.php`` per job and waiting for it.

    CPU: this process (``client``: spawning and waiting) and the php
    processes that finished in the window (``php``).
    """
    body = b"x" * size
    with tempfile.TemporaryDirectory(prefix="shardpool-bench-") as tmp:
        script = Path(tmp) / "echo_once.php"
        script.write_text(PER_JOB_SCRIPT)
        meter = CpuMeter({"client": [os.getpid()]}, reaped="php")
        sample = await drive(
            lambda: _one_php(str(script), body),
            parallel,
            duration,
            warmup=warmup,
            on_start=meter.start,
            on_stop=meter.stop,
        )
    return sample, meter.result
