"""Shared benchmark helpers: the C limit dispatcher, percentiles, medians, tables."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from shardpool.benchmark.drive import drive as _drive
from shardpool.benchmark.runner import size_label as size_label  # for the bench scripts

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
ECHO = ROOT / "workers" / "echo.php"
LIMIT_SRC = ROOT.parent / "shared" / "tools" / "limit" / "gbench.c"


def echo_worker() -> subprocess.Popen[bytes]:
    """The echo worker on pipes, past its pid handshake (done with blocking I/O):
    for the baselines that talk to PHP without shardpool."""
    from shardpool.protocol import FrameDecoder, encode_control

    proc = subprocess.Popen(
        ["php", str(ECHO)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    assert proc.stdin is not None and proc.stdout is not None
    os.write(proc.stdin.fileno(), encode_control(json.dumps({"pid": os.getpid()}).encode()))
    decoder = FrameDecoder()
    while not decoder.feed(os.read(proc.stdout.fileno(), 65536)):
        pass
    return proc


def blocking_roundtrip(wfd: int, rfd: int, job: bytes) -> None:
    """The least a blocking Python driver of the echo worker does: write the
    frame, read until as many bytes are back (the echo worker's reply frame is
    as long as the job's). Blocking pipes: ``os.write`` writes it all."""
    os.write(wfd, job)
    left = len(job)
    while left > 0:
        left -= len(os.read(rfd, 65536))


class EventLoopFloor(asyncio.Protocol):
    """The least an asyncio driver of a PHP worker does: write a frame, await a
    future that the read callback resolves once the reply's bytes are back (the
    echo worker's reply frame is as long as the job's). No parsing, no state."""

    def __init__(self) -> None:
        self.expect = 0
        self.waiter: asyncio.Future[None] | None = None
        self.writer: asyncio.WriteTransport | None = None
        self.reader: asyncio.ReadTransport | None = None

    @classmethod
    async def attach(cls, proc: subprocess.Popen[bytes]) -> EventLoopFloor:
        """Drive ``proc`` (past its handshake, see :func:`echo_worker`) on this loop."""
        assert proc.stdin is not None and proc.stdout is not None
        loop = asyncio.get_running_loop()
        floor = cls()
        floor.writer, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, proc.stdin)
        floor.reader, _ = await loop.connect_read_pipe(lambda: floor, proc.stdout)
        return floor

    def data_received(self, data: bytes) -> None:
        self.expect -= len(data)
        if self.expect <= 0 and self.waiter is not None:
            self.waiter.set_result(None)

    async def roundtrip(self, job: bytes) -> None:
        assert self.writer is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.expect = len(job)
        self.writer.write(job)
        await self.waiter

    def close(self) -> None:
        assert self.writer is not None and self.reader is not None
        self.writer.close()
        self.reader.close()


@dataclass
class Run:
    """One measured run."""

    jobs_s: float
    p50_us: float
    p99_us: float


@dataclass
class Series:
    """Repeated runs of one configuration; figures are medians."""

    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def jobs_s(self) -> float:
        return statistics.median(r.jobs_s for r in self.runs) if self.runs else 0.0

    @property
    def p50_us(self) -> float:
        return statistics.median(r.p50_us for r in self.runs) if self.runs else 0.0

    @property
    def p99_us(self) -> float:
        return statistics.median(r.p99_us for r in self.runs) if self.runs else 0.0

    def ratios(self, base: Series) -> list[float]:
        """jobs/s of each run over ``base``'s run of the same round (the two are
        interleaved): slow drifts of the machine's speed cancel out."""
        return [r.jobs_s / b.jobs_s for r, b in zip(self.runs, base.runs, strict=True)]

    def ratio(self, base: Series) -> float:
        """The median of :meth:`ratios`."""
        return statistics.median(self.ratios(base))

    def ratio_range(self, base: Series) -> str:
        found = self.ratios(base)
        return f"{min(found):.2f}-{max(found):.2f}"


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run_from_latencies(done: int, elapsed: float, latencies: list[float]) -> Run:
    latencies.sort()
    return Run(done / elapsed, percentile(latencies, 0.5) * 1e6, percentile(latencies, 0.99) * 1e6)


async def drive(call: Callable[[], Awaitable[object]], concurrency: int, duration: float) -> Run:
    """``concurrency`` clients each awaiting ``call()`` in a loop: a warm-up,
    then ``duration`` seconds measured (the load loop of ``shardpool bench``)."""
    sample = await _drive(call, concurrency, duration)
    return run_from_latencies(sample.done, sample.elapsed, sample.latencies)


def series_row(label: list[str], series: Series, *ratios: float) -> list[str]:
    """A table row: ``label`` cells, then jobs/s, p50, p99 and the given ratios."""
    return [
        *label,
        f"{series.jobs_s:,.0f}",
        f"{series.p50_us:.0f}",
        f"{series.p99_us:.0f}",
        *(f"{r:.2f}" for r in ratios),
    ]


def gbench_path() -> Path:
    """Build the C limit dispatcher once (bench/out/gbench)."""
    binary = OUT / "gbench"
    if binary.exists() and binary.stat().st_mtime >= LIMIT_SRC.stat().st_mtime:
        return binary
    if not LIMIT_SRC.exists():
        sys.exit(f"cannot find the limit dispatcher source at {LIMIT_SRC}")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("a C compiler is needed to build the limit dispatcher: apt-get install gcc")
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(LIMIT_SRC)], check=True)
    return binary


_RESULT = re.compile(r"jobs_s=([\d.]+) p50_us=([\d.]+) p99_us=([\d.]+)")


def limit_run(
    workers: int, size: int, duration: float, worker: Path = ECHO, busy_poll: bool = False
) -> Run:
    """The physical limit: C dispatcher, one job in flight per worker, no pool logic.

    With ``busy_poll`` it never blocks waiting for a reply (``-b``): the limit
    for a dispatcher that polls, on machines where waking a blocked process
    is costly."""
    out = subprocess.run(
        [
            str(gbench_path()),
            *(["-b"] if busy_poll else []),
            "-q",
            "-w",
            str(workers),
            "-s",
            str(size),
            "-d",
            str(duration),
            "-u",
            "0.5",
            "--",
            "php",
            str(worker),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    match = _RESULT.search(out)
    if match is None:
        raise RuntimeError(f"unexpected gbench output: {out!r}")
    return Run(float(match[1]), float(match[2]), float(match[3]))


def names_of(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: ``a,b`` -> ``["a", "b"]``, each one of ``allowed``."""

    def parse(text: str) -> list[str]:
        found = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [part for part in found if part not in allowed]
        if unknown or not found:
            raise argparse.ArgumentTypeError(
                f"expected some of {', '.join(allowed)}, comma-separated; got {text!r}"
            )
        return found

    return parse


def machine() -> str:
    import platform

    python = platform.python_version()
    return (
        f"{os.cpu_count()} cores, Python {python}, {php_version()}, {platform.platform()}, "
        f"{idle_polling()}"
    )


def idle_polling() -> str:
    """How long an idle CPU polls before it halts (Linux's guest halt-polling):
    what a blocked process pays to be woken on a virtual machine depends on it."""
    try:
        driver = Path("/sys/devices/system/cpu/cpuidle/current_driver").read_text().strip()
    except OSError:
        return "cpuidle driver unknown"
    try:
        ns = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text().strip()
    except OSError:
        return f"cpuidle {driver}"
    return f"cpuidle {driver}, guest_halt_poll_ns={ns}"


def php_version() -> str:
    out = subprocess.run(["php", "-r", "echo PHP_VERSION;"], capture_output=True, text=True).stdout
    return f"PHP {out.strip()}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])
