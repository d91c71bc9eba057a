"""What ``shardpool bench`` hands back: a table, a JSON document and a plot.

Every figure of a configuration is also given as a ratio of the baselines
measured in the same run: the raw limit (same body size and total of PHP
workers), the in-process pool (same workers, size and jobs in flight) and
one php process per job (same size).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
from rich import box
from rich.console import Console
from rich.table import Table

from shardpool.benchmark.cpu import GROUPS
from shardpool.benchmark.runner import BASELINES, Kind, Result, Settings, size_label

SCHEMA = 1
RATIOS = {"limit": Kind.LIMIT, "pool": Kind.POOL, "per_job_php": Kind.PER_JOB}

NOTES = """\
Baselines, measured in the same run on the same machine:
  limit        every PHP worker kept busy by a minimal blocking driver (one Python
               process per worker: os.write a goridge frame, os.read the reply), no pool
  Pool         the in-process shardpool.Pool, same PHP workers, same jobs in flight
  php per job  a new `php` process per job (a script echoing STDIN), one per CPU at a time
× limit, × pool, × php/job: jobs/s divided by that baseline's jobs/s.
CPU: user+system time of each process group over the measured run, in % of one core
(client: the bench process, or the limit drivers; PHP: the workers).
switches/job: times any thread of those processes left its CPU (blocked or preempted),
per job; each needs a wake-up, costly on many virtual machines when it rouses an idle CPU."""


def php_version() -> str:
    try:
        out = subprocess.run(
            ["php", "-r", "echo PHP_VERSION;"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "php": php_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


@dataclass
class Report:
    settings: Settings
    machine: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    interrupted: bool = False
    started: float = field(default_factory=time.time)
    finished: float = 0.0

    @property
    def baselines(self) -> list[Result]:
        return [r for r in self.results if r.step.kind in BASELINES]

    @property
    def configurations(self) -> list[Result]:
        return [r for r in self.results if r.step.kind is Kind.SERVICE]

    def baseline(self, result: Result, kind: Kind) -> Result | None:
        """The baseline of ``kind`` that ``result`` is compared with, if it was measured."""
        step = result.step
        for base in self.baselines:
            b = base.step
            if b.kind is not kind or b.size != step.size:
                continue
            if kind is Kind.LIMIT and b.workers != step.workers:
                continue
            if kind is Kind.POOL and (b.workers, b.concurrency, b.depth) != (
                step.workers,
                step.concurrency,
                step.depth,
            ):
                continue
            return base
        return None

    def ratios(self, result: Result) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, kind in RATIOS.items():
            base = self.baseline(result, kind)
            out[name] = result.jobs_s / base.jobs_s if base and base.jobs_s > 0 else None
        return out

    # -- JSON ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        ids = {id(r): _baseline_id(r) for r in self.baselines}
        configurations = []
        for r in self.configurations:
            doc = _figures(r)
            doc["ratios"] = self.ratios(r)
            doc["compared_with"] = {
                name: ids[id(b)] if (b := self.baseline(r, kind)) else None
                for name, kind in RATIOS.items()
            }
            configurations.append(doc)
        return {
            "shardpool_bench": SCHEMA,
            "machine": self.machine,
            "started": _iso(self.started),
            "finished": _iso(self.finished or time.time()),
            "interrupted": self.interrupted,
            "settings": self.settings.to_json(),
            "baselines": [{"id": ids[id(r)], **_figures(r)} for r in self.baselines],
            "configurations": configurations,
        }

    # -- table -----------------------------------------------------------------------

    def table(self, markdown: bool = False) -> Table:
        table = Table(box=box.MARKDOWN if markdown else box.SIMPLE_HEAD, pad_edge=markdown)
        table.add_column("configuration", justify="left", no_wrap=True)
        for name in ("in flight", "body", "jobs/s", "p50 µs", "p99 µs", "max µs"):
            table.add_column(name, justify="right")
        for name in ("× limit", "× pool", "× php/job"):
            table.add_column(name, justify="right")
        for name in ("client %", "broker %", "shards %", "PHP %", "switches/job"):
            table.add_column(name, justify="right")
        for r in self.baselines:
            table.add_row(*self._row(r), style=None if markdown else "dim")
        if self.baselines and self.configurations and not markdown:
            table.add_section()
        for r in self.configurations:
            table.add_row(*self._row(r))
        return table

    def _row(self, r: Result) -> list[str]:
        ratios = self.ratios(r)
        return [
            r.step.label,
            str(r.step.concurrency),
            size_label(r.step.size),
            f"{r.jobs_s:,.0f}",
            f"{r.p50_us:,.0f}",
            f"{r.p99_us:,.0f}",
            f"{r.max_us:,.0f}",
            *(_ratio(ratios[name]) for name in RATIOS),
            *(f"{r.cpu[g]:.0f}" if g in r.cpu else "" for g in GROUPS),
            "" if (switches := r.switches_per_job) is None else f"{switches:.2f}",
        ]

    def headline(self) -> str:
        m = self.machine
        load = "/".join(f"{x:g}" for x in m["load_average"])
        return (
            f"{m['cpus']} CPUs, Python {m['python']}, PHP {m['php']}, {m['platform']}; "
            f"load average {load} at the start; {self.settings.duration:g} s per run"
        )

    def print(self, file: IO[str]) -> None:
        """The table with a headline and notes: rich on a terminal, else Markdown."""
        markdown = not file.isatty()
        console = Console(file=file, width=220 if markdown else None, highlight=False)
        console.print(self.headline())
        if self.interrupted:
            console.print(f"interrupted: {len(self.results)} run(s) done, shown below")
        if self.results and markdown:
            with console.capture() as capture:
                console.print(self.table(markdown=True))
            lines = [line.rstrip() for line in capture.get().splitlines()]
            console.print("\n".join(line for line in lines if line), soft_wrap=True)
        elif self.results:
            console.print(self.table())
        console.print(NOTES, style=None if markdown else "dim")

    # -- plot ------------------------------------------------------------------------

    def plot(self, path: Path) -> None:
        """Throughput and p99 latency against jobs in flight, one line per configuration."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
        lines: dict[str, list[Result]] = {}
        for r in self.results:
            if r.step.kind in (Kind.SERVICE, Kind.POOL):
                lines.setdefault(f"{r.step.label}, {size_label(r.step.size)}", []).append(r)
        for label, rs in lines.items():
            rs.sort(key=lambda r: r.step.concurrency)
            style = "--" if rs[0].step.kind is Kind.POOL else "-"
            x = [r.step.concurrency for r in rs]
            left.plot(x, [r.jobs_s for r in rs], style, marker="o", label=label)
            right.plot(x, [r.p99_us / 1000 for r in rs], style, marker="o", label=label)
        for r in self.results:
            if r.step.kind in (Kind.LIMIT, Kind.PER_JOB):
                name = f"{r.step.label}, {size_label(r.step.size)}"
                left.axhline(r.jobs_s, linestyle=":", color="grey", linewidth=1)
                left.annotate(
                    name,
                    (0, r.jobs_s),
                    xycoords=("axes fraction", "data"),
                    xytext=(4, 3),
                    textcoords="offset points",
                    size=7,
                )
        concurrencies = sorted({r.step.concurrency for rs in lines.values() for r in rs})
        for ax, ylabel in ((left, "jobs/s"), (right, "p99 latency (ms)")):
            ax.set_xscale("log", base=2)
            if concurrencies:
                ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
            ax.set_xlabel("jobs in flight")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        if lines:
            right.set_yscale("log")
            left.legend(fontsize=7)
        left.set_ylim(bottom=0)
        fig.suptitle("shardpool bench: " + self.headline(), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _baseline_id(r: Result) -> str:
    s = r.step
    depth = f"/d{s.depth}" if s.kind is Kind.POOL and s.depth != "1" else ""
    return f"{s.kind.value.replace(' ', '-')}/W{s.workers}/c{s.concurrency}/{s.size}B{depth}"


def _figures(r: Result) -> dict[str, Any]:
    s = r.step
    doc: dict[str, Any] = {"label": s.label, "kind": s.kind.value}
    if s.kind is Kind.SERVICE:
        doc["shards"] = s.shards
        doc["address"] = s.address or None
        doc["pinned"] = s.pinned
    if s.kind in (Kind.SERVICE, Kind.POOL) and not s.address:
        doc["pipeline_depth"] = s.depth
    doc.update(
        workers=s.workers,
        concurrency=s.concurrency,
        size=s.size,
        jobs=r.jobs,
        seconds=round(r.seconds, 6),
        jobs_s=r.jobs_s,
        p50_us=round(r.p50_us, 1),
        p99_us=round(r.p99_us, 1),
        max_us=round(r.max_us, 1),
        cpu_percent={g: round(r.cpu[g], 1) for g in GROUPS if g in r.cpu},
        switches_per_job=None if (sw := r.switches_per_job) is None else round(sw, 3),
    )
    return doc


def _ratio(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
