"""The figures operators ask for, as ``stats`` data and as Prometheus metrics.

The broker counts every terminal reply by outcome (``ok`` or the stable error
code) and files its duration, from acceptance to reply, into fixed buckets:
a few integer operations per job on the hot path. Shards report their
workers (by state, memory, restarts by reason) in their heartbeats.

:func:`figures` gathers all of it into one plain dict, the ``stats`` answer.
With ``serve --metrics ADDR`` an HTTP thread (``prometheus_client``) serves
the same figures in Prometheus' text format; the broker loop refreshes the
snapshot it reads every :data:`SNAPSHOT_INTERVAL` seconds, so the thread never
touches live broker state. Labels stay low-cardinality: shard names, worker
states, outcomes and reasons; a worker pid appears only on the memory gauge.
"""

from __future__ import annotations

import bisect
import collections
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from shardpool.config import metrics_address
from shardpool.errors import ConfigError

if TYPE_CHECKING:
    from shardpool.broker.broker import Broker

log = logging.getLogger("shardpool.broker")

# Upper bounds (seconds) of the job duration histogram.
BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
SNAPSHOT_INTERVAL = 0.5  # seconds between metrics snapshots taken by the broker loop


class JobFigures:
    """Terminal replies by outcome, and a histogram of accepted jobs' durations."""

    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.duration_sum = 0.0

    def count(self, code: str) -> None:
        """A reply that did not come from a run (rejected, expired, lost)."""
        self.outcomes[code or "ok"] += 1

    def observe(self, code: str, seconds: float) -> None:
        self.outcomes[code or "ok"] += 1
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def observe_runs(self, took: list[float], failed: list[str]) -> None:
        """Terminal replies from shards: how long each took, and the codes of those
        that are errors (the rest are ``ok``). One call per message, not per job."""
        buckets, bounds = self.buckets, BUCKETS
        for seconds in took:
            buckets[bisect.bisect_left(bounds, seconds)] += 1
        self.duration_sum += sum(took)
        outcomes = self.outcomes
        if len(took) > len(failed):
            outcomes["ok"] += len(took) - len(failed)
        for code in failed:
            outcomes[code] += 1

    def histogram(self) -> dict[str, Any]:
        cumulative: list[list[Any]] = []
        total = 0
        for bound, n in zip((*BUCKETS, "+Inf"), self.buckets, strict=True):
            total += n
            cumulative.append([bound, total])
        return {"buckets": cumulative, "sum": self.duration_sum, "count": total}


def figures(broker: Broker) -> dict[str, Any]:
    """Everything ``stats`` reports: broker counters, outcomes, durations, shards."""
    jobs = broker.jobs
    ok = jobs.outcomes.get("ok", 0)
    return {
        **broker.stats,
        "jobs_done": ok,
        "jobs_failed": sum(jobs.outcomes.values()) - ok,
        "outcomes": dict(jobs.outcomes),
        "duration": jobs.histogram(),
        "queue": len(broker.queue),
        "refused_peers": broker.refused_peers,
        "shard_restarts": sum(local.restarts for local in broker.local.values()),
        "placement": broker.placement.figures(),
        "shards": {
            s.name: {
                "in_flight": len(s.in_flight),
                "capacity": s.capacity,
                "jobs_done": s.jobs_done,
                "pid": s.pid,
                "host": s.host,
                **s.pool_stats,
            }
            for s in broker.shards.values()
        },
    }


class _Exporter(Collector):
    """Builds fresh metric families from the latest snapshot on each scrape."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot  # one reference, replaced whole by the broker loop
        if not snap:
            return
        jobs = CounterMetricFamily(
            "shardpool_jobs", "Jobs answered, by outcome (ok or error code)", labels=["outcome"]
        )
        for outcome, n in sorted(snap["outcomes"].items()):
            jobs.add_metric([outcome], n)
        yield jobs
        hist = snap["duration"]
        yield HistogramMetricFamily(
            "shardpool_job_duration_seconds",
            "Time from acceptance by the broker to the job's final reply",
            buckets=[(_le(b), n) for b, n in hist["buckets"]],
            sum_value=hist["sum"],
        )
        yield GaugeMetricFamily(
            "shardpool_queue_length", "Jobs waiting in the broker for a shard", value=snap["queue"]
        )
        yield from _shard_metrics(snap["shards"])
        yield GaugeMetricFamily(
            "shardpool_shards_pinned",
            "1 if the shards serve started run on CPUs of their own (pin_shards), else 0",
            value=1 if snap["placement"]["pinned"] else 0,
        )
        yield CounterMetricFamily(
            "shardpool_shard_restarts", "Local shards restarted", value=snap["shard_restarts"]
        )
        yield CounterMetricFamily(
            "shardpool_shards_lost", "Shards declared lost", value=snap["shards_lost"]
        )
        yield CounterMetricFamily(
            "shardpool_bad_messages", "Malformed client messages", value=snap["bad_messages"]
        )
        yield CounterMetricFamily(
            "shardpool_jobs_returned",
            "Jobs a stuck or stopping shard handed back unstarted, to run elsewhere",
            value=snap["jobs_returned"],
        )


def _shard_metrics(shards: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    in_flight = GaugeMetricFamily(
        "shardpool_shard_jobs_in_flight", "Jobs sent to a shard and not answered", labels=["shard"]
    )
    capacity = GaugeMetricFamily(
        "shardpool_shard_capacity", "Jobs a shard may hold at once", labels=["shard"]
    )
    workers = GaugeMetricFamily(
        "shardpool_workers", "PHP workers by state", labels=["shard", "state"]
    )
    memory = GaugeMetricFamily(
        "shardpool_worker_memory_bytes", "Resident memory of a PHP worker", labels=["shard", "pid"]
    )
    restarts = CounterMetricFamily(
        "shardpool_worker_restarts",
        "PHP workers replaced, by reason",
        labels=["shard", "reason"],
    )
    for name, shard in sorted(shards.items()):
        in_flight.add_metric([name], shard["in_flight"])
        capacity.add_metric([name], shard["capacity"])
        for state, n in sorted(shard.get("workers_by_state", {}).items()):
            workers.add_metric([name, state], n)
        for pid, rss in sorted(shard.get("worker_memory", {}).items()):
            memory.add_metric([name, pid], rss)
        for reason, n in sorted(shard.get("restarts", {}).items()):
            restarts.add_metric([name, reason], n)
    yield from (in_flight, capacity, workers, memory, restarts)


def _le(bound: float | str) -> str:
    return bound if isinstance(bound, str) else repr(bound)


class MetricsServer:
    """``serve --metrics``: an HTTP thread serving ``/metrics``."""

    def __init__(self, address: str) -> None:
        host, port = metrics_address(address)
        self.exporter = _Exporter()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.exporter)
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, host, registry=registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        self.url = f"http://{host}:{self._server.server_port}/metrics"
        log.info("metrics at %s", self.url)

    def update(self, snapshot: dict[str, Any]) -> None:
        self.exporter.snapshot = snapshot

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
