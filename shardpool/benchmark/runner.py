"""The sweep: which runs, in which order, and running them one by one.

Baselines come first (for each body size: one PHP process per job, then for
each total of PHP workers the raw limit and the in-process pool at every
concurrency), then the service configurations. Each run is measured on a
fresh event loop; an embedded service is started once per configuration and
stopped before the next. A Ctrl-C (KeyboardInterrupt) stops the sweep: the
run in progress is dropped, the service stopped, and the results so far are
kept.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import uvloop

from shardpool.benchmark.baselines import measure_per_job, measure_pool
from shardpool.benchmark.cpu import SWITCHES
from shardpool.benchmark.drive import Sample
from shardpool.benchmark.limit import measure_limit
from shardpool.benchmark.service import ServiceInfo, inspect_service, measure_service
from shardpool.embedded import EmbeddedService

SERVICE_START_ESTIMATE = 1.5  # seconds, for the time estimate only


class Kind(Enum):
    LIMIT = "limit"
    POOL = "pool"
    PER_JOB = "per-job php"
    SERVICE = "service"


BASELINES = (Kind.LIMIT, Kind.POOL, Kind.PER_JOB)


def size_label(size: int) -> str:
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size >> 10} KiB"
    return f"{size} B"


@dataclass(frozen=True)
class Step:
    """One measured run: what runs, how many PHP workers, jobs in flight, body size."""

    kind: Kind
    size: int
    concurrency: int
    workers: int  # PHP workers in total (per-job php: processes at a time)
    shards: int = 0  # service only
    address: str = ""  # service with --connect only
    depth: str = "1"  # pipeline depth of the pool and the service: "1".."64" or "auto"
    pin: bool | None = None  # service only: serve --[no-]pin-shards (None: its default, auto)
    pinned: bool = False  # service only: whether serve pinned its shards (from its stats)

    @property
    def label(self) -> str:
        if self.kind is Kind.LIMIT:
            return f"limit, {self.workers} PHP"
        if self.kind is Kind.PER_JOB:
            return "php per job"
        if self.address:
            return f"server {self.address}"
        depth = "" if self.depth == "1" else f", depth {self.depth}"
        if self.kind is Kind.POOL:
            return f"in-process Pool, {self.workers} PHP{depth}"
        per = self.workers // self.shards
        pinned = ", pinned" if self.pinned else ""
        plural = "s" if self.shards > 1 else ""
        return f"serve {self.shards} shard{plural} × {per} PHP{depth}{pinned}"

    def describe(self) -> str:
        return f"{self.label}, {self.concurrency} in flight, {size_label(self.size)}"

    @property
    def service_key(self) -> tuple[int, int, str, bool | None] | None:
        if self.kind is not Kind.SERVICE or self.address:
            return None
        return self.shards, self.workers // self.shards, self.depth, self.pin


@dataclass
class Settings:
    """The sweep as the command line asked for it."""

    worker: str
    sizes: list[int]
    concurrency: list[int]
    duration: float
    warmup: float
    per_job_duration: float
    services: list[tuple[int, int]]  # (shards, workers per shard); empty with connect
    connect: str | None = None
    depths: list[str] = field(default_factory=lambda: ["1"])  # pipeline depths
    busy_poll: float | None = None  # the pools' busy_poll (None: their default)
    pin_shards: bool | None = None  # serve --[no-]pin-shards for the embedded service
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def command(self) -> list[str]:
        return ["php", self.worker]

    def to_json(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "sizes": self.sizes,
            "concurrency": self.concurrency,
            "pipeline_depths": self.depths,
            "busy_poll": self.busy_poll,
            "pin_shards": "auto" if self.pin_shards is None else self.pin_shards,
            "duration": self.duration,
            "warmup": self.warmup,
            "per_job_duration": self.per_job_duration,
            "services": [{"shards": s, "workers_per_shard": w} for s, w in self.services],
            "connect": self.connect,
        }


def plan(settings: Settings, server: ServiceInfo | None = None) -> list[Step]:
    """Every run of the sweep, in order."""
    depths = settings.depths  # ["1"] with --connect: the server's own depth applies
    if server is not None:
        targets = [(server.shards, server.workers, server.address)]
    else:
        targets = [(s, s * w, "") for s, w in settings.services]
    totals = sorted({total for _, total, _ in targets})
    steps: list[Step] = []
    for size in settings.sizes:
        steps.append(Step(Kind.PER_JOB, size, settings.cpus, settings.cpus))
        for total in totals:
            steps.append(Step(Kind.LIMIT, size, total, total))
            for depth in depths:
                steps += [
                    Step(Kind.POOL, size, c, total, depth=depth) for c in settings.concurrency
                ]
    for depth in depths:
        for shards, total, address in targets:
            pin = None if address else settings.pin_shards
            for size in settings.sizes:
                for c in settings.concurrency:
                    steps.append(Step(Kind.SERVICE, size, c, total, shards, address, depth, pin))
    return steps


def estimate(settings: Settings, steps: list[Step]) -> float:
    """Seconds the sweep should take (runs, warm-ups and service starts)."""
    total = 0.0
    for step in steps:
        length = settings.per_job_duration if step.kind is Kind.PER_JOB else settings.duration
        total += length + settings.warmup + 0.2
    return total + SERVICE_START_ESTIMATE * len({s.service_key for s in steps} - {None})


@dataclass
class Result:
    """One run's figures."""

    step: Step
    jobs: int
    seconds: float
    jobs_s: float
    p50_us: float
    p99_us: float
    max_us: float
    cpu: dict[str, float]

    @property
    def switches_per_job(self) -> float | None:
        """Context switches of every measured process per job (None: not measured)."""
        rate = self.cpu.get(SWITCHES)
        return rate / self.jobs_s if rate is not None and self.jobs_s > 0 else None

    @classmethod
    def of(cls, step: Step, sample: Sample, cpu: dict[str, float]) -> Result:
        return cls(
            step,
            sample.done,
            sample.elapsed,
            sample.jobs_s,
            sample.percentile(0.5) * 1e6,
            sample.percentile(0.99) * 1e6,
            sample.max * 1e6,
            cpu,
        )


Progress = Callable[[int, int, Step], None]


class Runner:
    """Run steps one by one, keeping at most one embedded service alive."""

    def __init__(self, settings: Settings, server: ServiceInfo | None = None) -> None:
        self.settings = settings
        self.server = server
        self.results: list[Result] = []
        self._service: EmbeddedService | None = None
        self._service_key: tuple[int, int, str, bool | None] | None = None
        self._info: ServiceInfo | None = server

    def run(self, steps: list[Step], progress: Progress) -> None:
        """Run every step; a KeyboardInterrupt propagates after the service is stopped."""
        try:
            for i, step in enumerate(steps):
                progress(i, len(steps), step)
                sample, cpu = self._measure(step)
                if step.kind is Kind.SERVICE and self._info is not None:
                    step = dataclasses.replace(step, pinned=self._info.pinned)
                self.results.append(Result.of(step, sample, cpu))
        finally:
            self.close()

    def close(self) -> None:
        service, self._service, self._service_key = self._service, None, None
        if service is not None:
            service.stop()

    def _measure(self, step: Step) -> tuple[Sample, dict[str, float]]:
        s = self.settings
        size, c, workers = step.size, step.concurrency, step.workers
        if step.kind is Kind.PER_JOB:
            return uvloop.run(measure_per_job(workers, size, s.per_job_duration, s.warmup))
        if step.kind is Kind.LIMIT:
            return uvloop.run(measure_limit(s.command, workers, size, s.duration, s.warmup))
        if step.kind is Kind.POOL:
            return uvloop.run(
                measure_pool(
                    s.command, workers, c, size, s.duration, s.warmup, step.depth, s.busy_poll
                )
            )
        info = self._service_for(step)
        return uvloop.run(measure_service(info, c, size, s.duration, s.warmup))

    def _service_for(self, step: Step) -> ServiceInfo:
        key = step.service_key
        if key is None:
            assert self._info is not None
            return self._info
        if key != self._service_key or self._info is None:
            self.close()
            shards, per_shard, depth, pin = key
            service = EmbeddedService(
                shards=shards,
                workers=per_shard,
                worker=self.settings.worker,
                extra=[
                    "--pipeline-depth",
                    depth,
                    *(
                        ["--busy-poll", f"{self.settings.busy_poll * 1e6:g}us"]
                        if self.settings.busy_poll is not None
                        else []
                    ),
                    *([] if pin is None else ["--pin-shards" if pin else "--no-pin-shards"]),
                ],
            )
            self._service, self._service_key = service, key
            service.start()
            self._info = inspect_service(service.address, broker_pid=service.pid)
        return self._info
