"""Measuring the service (client -> broker -> shards -> PHP workers and back).

The service is either an :class:`~shardpool.embedded.EmbeddedService` the
bench starts itself, or a running server given by ``--connect``. Its
processes are found for the CPU columns: the broker (the embedded child, or
whatever process listens on the address when it is local), the shards the
broker's ``stats`` lists on this host, and their descendants (the PHP
workers). A remote server has no CPU figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import psutil

from shardpool.benchmark.baselines import measure_echo
from shardpool.benchmark.cpu import descendants
from shardpool.benchmark.drive import Sample
from shardpool.benchmark.limit import BenchmarkError
from shardpool.client import AsyncClient, Client
from shardpool.curve import CurveKeys
from shardpool.errors import ShardpoolError

# Seconds past the run's end for the last jobs to come back, or the run fails. One
# bound for the whole run, not a timeout on every job: a job's deadline costs the
# client, the broker and the shard work per job (about a tenth of the service's
# throughput with 256 in flight), and the in-process pool it is compared with
# runs its jobs with none.
JOB_TIMEOUT = 30.0
CONTROL_TIMEOUT = 10.0


@dataclass
class ServiceInfo:
    """What the bench knows of a service: its address, workers, and local pids."""

    address: str
    workers: int  # PHP workers in total
    shards: int
    broker_pid: int | None = None
    shard_pids: list[int] = field(default_factory=list)
    curve: CurveKeys | None = None  # to connect to a server that uses CURVE
    pinned: bool = False  # its shards run pinned (serve's placement, from stats)

    @property
    def local(self) -> bool:
        return self.broker_pid is not None or bool(self.shard_pids)

    def cpu_groups(self) -> dict[str, list[int]]:
        groups = {"client": [os.getpid()]}
        if self.broker_pid is not None:
            groups["broker"] = [self.broker_pid]
        if self.shard_pids:
            groups["shards"] = list(self.shard_pids)
            groups["php"] = descendants(self.shard_pids)
        return groups


def _local_addresses() -> set[str]:
    addrs = {"0.0.0.0", "::", "*", "localhost", "127.0.0.1", "::1"}
    with contextlib.suppress(OSError):
        for nics in psutil.net_if_addrs().values():
            addrs.update(a.address.split("%")[0] for a in nics)
    return addrs


def listener_pid(address: str) -> int | None:
    """The pid of the local process listening on a ``tcp://`` or ``ipc://`` address."""
    scheme, _, rest = address.partition("://")
    try:
        if scheme == "tcp":
            host, _, port = rest.rpartition(":")
            host = host.strip("[]")
            if host not in _local_addresses() and not host.startswith("127."):
                with contextlib.suppress(OSError):
                    host = socket.gethostbyname(host)
                if host not in _local_addresses():
                    return None
            for conn in psutil.net_connections("tcp"):
                listening = conn.status == psutil.CONN_LISTEN and conn.pid
                if listening and getattr(conn.laddr, "port", None) == int(port):
                    return conn.pid
        elif scheme == "ipc":
            for conn in psutil.net_connections("unix"):
                path: Any = conn.laddr  # a str for unix sockets
                if path == rest and conn.pid:
                    return conn.pid
    except (psutil.Error, OSError, ValueError):
        return None
    return None


def _shard_pids(stats: dict[str, Any]) -> list[int]:
    here = socket.gethostname()
    pids = []
    for shard in (stats.get("shards") or {}).values():
        pid = shard.get("pid") if isinstance(shard, dict) else None
        if isinstance(pid, int) and shard.get("host") == here and psutil.pid_exists(pid):
            pids.append(pid)
    return pids


def _parent_serve(pids: list[int]) -> int | None:
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(pid).parent()
            if parent is not None and "serve" in parent.cmdline():
                return parent.pid
    return None


def inspect_service(
    address: str, broker_pid: int | None = None, curve: CurveKeys | None = None
) -> ServiceInfo:
    """Ask a running service for its shards and workers; find its local processes.

    Raises :class:`BenchmarkError` naming the address when it does not answer.
    """
    try:
        with Client(address, timeout=CONTROL_TIMEOUT, curve=curve) as client:
            stats = client.stats(timeout=CONTROL_TIMEOUT)
            workers = client.workers(timeout=CONTROL_TIMEOUT)
    except ShardpoolError as exc:
        raise BenchmarkError(f"no shardpool server answers at {address}: {exc}") from None
    total = sum(len(w) for w in workers.values() if isinstance(w, list))
    if total == 0:
        raise BenchmarkError(f"the server at {address} has no workers")
    shard_pids = _shard_pids(stats)
    if broker_pid is None:
        broker_pid = listener_pid(address) or _parent_serve(shard_pids)
    shards = len(stats.get("shards") or {})
    pinned = (stats.get("placement") or {}).get("pinned") is True
    return ServiceInfo(address, total, shards, broker_pid, shard_pids, curve, pinned)


async def measure_service(
    info: ServiceInfo, concurrency: int, size: int, duration: float, warmup: float
) -> tuple[Sample, dict[str, float]]:
    """``concurrency`` jobs in flight through one AsyncClient; CPU of every local process.

    The jobs carry no deadline, as the pool's do not (see JOB_TIMEOUT).
    """
    body = b"x" * size
    async with AsyncClient(info.address, curve=info.curve) as client:
        try:
            async with asyncio.timeout(warmup + duration + JOB_TIMEOUT):
                return await measure_echo(
                    lambda: client.exec(body),
                    body,
                    f"the server at {info.address}",
                    info.cpu_groups,
                    concurrency,
                    duration,
                    warmup,
                )
        except TimeoutError:
            raise BenchmarkError(
                f"the server at {info.address} left jobs unanswered {JOB_TIMEOUT:g} s after the run"
            ) from None
