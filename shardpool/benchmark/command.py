"""``shardpool bench``: its options, its progress display, and the whole run.

``shardpool.cli`` registers the subcommand with :func:`register` and calls
:func:`run` with the parsed arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardpool.argtypes import add_curve_options, busy_poll, curve_keys, pipeline_depth
from shardpool.config import DEFAULT_WORKER
from shardpool.errors import ShardpoolError

if TYPE_CHECKING:
    from shardpool.benchmark.runner import Settings, Step

DEFAULT_CONCURRENCY = [1, 16, 256]
DEFAULT_SIZES = [16]
DEFAULT_DURATION = 4.0  # seconds per measured run
QUICK_DURATION = 0.3
PER_JOB_DURATION = 2.0  # php per job is slow and steady: a short run is enough
MAX_CONCURRENCY = 65536
MAX_SIZE = 64 << 20  # the client's and broker's default max payload

DESCRIPTION = """\
Measure the service (broker + shards + PHP workers) on the bundled echo
worker: jobs/s, p50/p99/max latency per job (from submit to reply), the CPU
used by the broker, the shards and the PHP workers, and their context
switches per job (how often a process waits to be woken). Every figure is
also a ratio of three baselines measured in the same run on the same
machine: the raw limit of the PHP workers (a minimal blocking driver per
worker, no pool logic), the in-process shardpool.Pool with the same workers
and jobs in flight, and one php process per job.

Default sweep (about a minute on 2 CPUs): 1 and 2 shards (1 on a single
CPU) with the same total of PHP workers, one per CPU; 1, 16 and 256 jobs in
flight (one caller at a time, a busy web app, a backlog); 16-byte bodies
(the dispatch cost, not copying); 4 s per run after a short warm-up. --quick
runs the same sweep at 0.3 s per run, for a first look in about ten seconds.
Each configuration is measured once: on a busy machine, run it twice.
--pipeline-depth D runs the service and the in-process pool with up to D jobs
in each PHP worker's pipe (default 1: RoadRunner's dispatch); several depths
are measured side by side. --busy-poll sets the pools' busy polling (default
50us, 0: off; see docs/pool.md) for the service and the in-process pool.
The service places its shards as serve does by default (pin_shards: auto):
each shard and its PHP workers on CPUs of their own where a hand-over across
CPUs costs much more than one on a CPU (virtual machines), and the label says
", pinned" when it did. --pin-shards or --no-pin-shards decides instead.

--connect measures a running server instead (its own shards and workers;
the baselines get as many PHP workers); the CPU columns are filled only
when the server runs on this machine. Ctrl-C stops early and still prints
(and writes) the results so far."""

EXAMPLES = """\
examples:
  shardpool bench
  shardpool bench --quick --json bench.json --plot bench.png
  shardpool bench --shards 1,2,4 --concurrency 16,256 --size 16,1k,64k
  shardpool bench --pipeline-depth 1,4 --concurrency 256
  shardpool bench --connect tcp://127.0.0.1:7400 --concurrency 64"""


# -- argument types ------------------------------------------------------------------


def _count(text: str, most: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to {most}, got {value}")
    return value


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. 1,16,256")
    return parts


def counts(text: str) -> list[int]:
    """``1,16,256`` -> [1, 16, 256] (each from 1 up)."""
    return sorted({_count(p, MAX_CONCURRENCY) for p in _parts(text)})


_SUFFIXES: tuple[tuple[str, int], ...] = (
    *(("kib", 1 << 10), ("mib", 1 << 20), ("kb", 1 << 10), ("mb", 1 << 20)),
    *(("k", 1 << 10), ("m", 1 << 20), ("b", 1)),
)


def sizes(text: str) -> list[int]:
    """``16,1k,64KiB,1m`` -> bytes."""
    out = set()
    for part in _parts(text):
        low, scale = part.lower(), 1
        for suffix, mult in _SUFFIXES:
            if low.endswith(suffix):
                low, scale = low[: -len(suffix)], mult
                break
        try:
            value = int(low) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a size like 16, 1k or 64KiB, got {part!r}"
            ) from None
        if not 1 <= value <= MAX_SIZE:
            raise argparse.ArgumentTypeError(f"a body size is from 1 B to 64 MiB, got {part}")
        out.add(value)
    return sorted(out)


def depths(text: str) -> list[str]:
    """``1,4,auto`` -> pipeline depths (1 to 64, or auto), in that order."""
    out: list[str] = []
    for part in _parts(text):
        value = str(pipeline_depth(part))
        if value not in out:
            out.append(value)
    return out


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds above 0 (at most 3600), got {text}")
    return value


def php_script(text: str) -> str:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such PHP script: {text}")
    return str(path.resolve())


def output_file(text: str) -> Path:
    path = Path(text)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {parent}")
    return path


def plot_file(text: str) -> Path:
    path = output_file(text)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise argparse.ArgumentTypeError(f"the plot is a .png (or .svg, .pdf) file, got {text}")
    return path


# -- the parser ----------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` subcommand to the ``shardpool`` parser."""
    bench = sub.add_parser(
        "bench",
        help="measure jobs/s, latency and CPU against baselines (bundled echo worker)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        usage="shardpool bench [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = bench.add_argument
    add("--connect", metavar="ADDR", help="measure a running server instead of an embedded one")
    add_curve_options(bench)
    add("--shards", type=counts, metavar="N[,N...]", help="shard processes (default 1,2)")
    add(
        "--workers",
        type=counts,
        metavar="N[,N...]",
        help="PHP workers per shard (default: CPU count / shards)",
    )
    add("--concurrency", type=counts, metavar="N[,N...]", help="jobs in flight (default 1,16,256)")
    add("--size", type=sizes, metavar="SIZE[,SIZE...]", help="body bytes, e.g. 16,1k (default 16)")
    add(
        "--pipeline-depth",
        type=depths,
        metavar="D[,D...]",
        help="jobs per PHP worker's pipe, for the service and the pool baseline: "
        "1 (default), N or auto",
    )
    add(
        "--busy-poll",
        type=busy_poll,
        metavar="DURATION",
        help="the pools' busy_poll, for the service and the pool baseline (default 50us; 0: off)",
    )
    add(
        "--pin-shards",
        action=argparse.BooleanOptionalAction,
        help="run the service as serve --pin-shards (each shard and its PHP workers on "
        "CPUs of their own) or --no-pin-shards (default: serve's own choice, auto)",
    )
    add("--duration", type=seconds, metavar="SECONDS", help="per measured run (default 4)")
    add("--worker", type=php_script, metavar="SCRIPT", help="a PHP worker that echoes its job")
    add("--json", type=output_file, metavar="FILE", help="write the results as JSON")
    add("--plot", type=plot_file, metavar="FILE.png", help="plot jobs/s and p99 latency")
    add("--quick", action="store_true", help="the same sweep, 0.3 s per run")
    bench.set_defaults(bench_parser=bench)


def settings_from(args: argparse.Namespace) -> Settings:
    """The sweep the arguments ask for; a contradiction is a usage error (exit 2)."""
    from shardpool.benchmark.runner import Settings

    parser: argparse.ArgumentParser = args.bench_parser
    if args.connect and (
        args.shards
        or args.workers
        or args.pipeline_depth
        or args.busy_poll is not None
        or args.pin_shards is not None
    ):
        parser.error(
            "--shards, --workers, --pipeline-depth, --busy-poll and --pin-shards set up the "
            "embedded service; with --connect the server's own are measured"
        )
    cpus = os.cpu_count() or 1
    duration = args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    shards = args.shards or ([1, 2] if cpus > 1 else [1])
    services = [(s, w) for s in shards for w in (args.workers or [max(1, cpus // s)])]
    return Settings(
        worker=args.worker or str(DEFAULT_WORKER),
        sizes=args.size or DEFAULT_SIZES,
        concurrency=args.concurrency or DEFAULT_CONCURRENCY,
        depths=args.pipeline_depth or ["1"],
        busy_poll=args.busy_poll,
        pin_shards=args.pin_shards,
        duration=duration,
        warmup=0.1 if args.quick else min(0.5, duration / 4),
        per_job_duration=min(duration, PER_JOB_DURATION),
        services=[] if args.connect else services,
        connect=args.connect,
        cpus=cpus,
    )


# -- progress --------------------------------------------------------------------------


class ProgressView:
    """Which run, how many left: a rich progress bar on a terminal, else one line per run."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._started = time.monotonic()

    def start(self, runs: int, estimate: float) -> None:
        print(
            f"shardpool bench: {runs} runs, about {estimate:.0f} s; "
            "Ctrl-C stops early with the results so far",
            file=sys.stderr,
            flush=True,
        )
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("starting", total=runs)

    def step(self, index: int, runs: int, step: Step) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=index, description=step.describe())
        else:
            elapsed = time.monotonic() - self._started
            print(f"[{index + 1}/{runs}] {step.describe()} ({elapsed:.0f} s)", file=sys.stderr)
            sys.stderr.flush()

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Ignore further Ctrl-C while the results are written (it takes a moment)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# -- the run ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the sweep, print the table, write JSON and plot; 130 after a Ctrl-C."""
    from shardpool.benchmark.report import Report, machine
    from shardpool.benchmark.runner import Runner, estimate, plan
    from shardpool.benchmark.service import inspect_service

    settings = settings_from(args)
    report = Report(settings, machine())
    progress = ProgressView()
    code, error = 0, None
    try:
        server = None
        if settings.connect:
            server = inspect_service(settings.connect, curve=curve_keys(args))
        steps = plan(settings, server)
        runner = Runner(settings, server)
        report.results = runner.results  # filled as runs finish: kept when interrupted
        progress.start(len(steps), estimate(settings, steps))
        runner.run(steps, progress.step)
    except KeyboardInterrupt:
        report.interrupted, code = True, 130
    except ShardpoolError as exc:
        error, code = str(exc), 1
    finally:
        progress.stop()
    report.finished = time.time()
    with _no_interrupts():
        if error is not None:
            print(f"shardpool bench: {error}", file=sys.stderr)
        if report.results or error is None:
            report.print(sys.stdout)
            sys.stdout.flush()
        if args.json:
            doc = report.to_json()
            if error is not None:
                doc["error"] = error
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
        if args.plot and report.results:
            report.plot(args.plot)
    return code
