"""CPU use of groups of processes over a measured window, as % of one core.

A group is a named list of pids (``client``, ``broker``, ``shards``,
``php``). The meter reads each process's own user + system time (psutil
``cpu_times``, children not included) at the start and the end of a window.
Processes that exit or are born during the window are not counted (a
pool that replaces workers mid-run under-reports a little). The ``reaped`` group instead takes
the CPU time of this process's children that exited and were waited for in
the window (``os.times``): that is how one-PHP-process-per-job is measured.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping

import psutil

GROUPS = ("client", "broker", "shards", "php")


def _cpu(proc: psutil.Process) -> float | None:
    try:
        times = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return float(times.user + times.system)


def _reaped() -> float:
    times = os.times()
    return times.children_user + times.children_system


def processes(pids: Iterable[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            out.append(psutil.Process(pid))
    return out


def descendants(pids: Iterable[int]) -> list[int]:
    """Every descendant of ``pids`` (e.g. the PHP workers of shard processes)."""
    out: list[int] = []
    for proc in processes(pids):
        with contextlib.suppress(psutil.NoSuchProcess):
            out.extend(child.pid for child in proc.children(recursive=True))
    return out


class CpuMeter:
    """Measure ``groups`` (name -> pids) between :meth:`start` and :meth:`stop`."""

    def __init__(self, groups: Mapping[str, Iterable[int]], *, reaped: str | None = None) -> None:
        self._groups = {name: processes(pids) for name, pids in groups.items()}
        self._reaped_group = reaped
        self._first: dict[str, dict[int, float]] = {}
        self._reaped_first = 0.0
        self._t0 = 0.0
        self.result: dict[str, float] = {}

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._reaped_first = _reaped()
        self._first = {
            name: {p.pid: t for p in procs if (t := _cpu(p)) is not None}
            for name, procs in self._groups.items()
        }

    def stop(self) -> dict[str, float]:
        """Each group's CPU over the window in % of one core (100 = one core busy)."""
        wall = time.perf_counter() - self._t0
        used: dict[str, float] = {}
        for name, procs in self._groups.items():
            first = self._first.get(name, {})
            total = 0.0
            for proc in procs:
                now = _cpu(proc)
                if now is not None and proc.pid in first:
                    total += now - first[proc.pid]
            used[name] = total
        if self._reaped_group is not None:
            used[self._reaped_group] = used.get(self._reaped_group, 0.0) + (
                _reaped() - self._reaped_first
            )
        self.result = {name: 100.0 * t / wall if wall > 0 else 0.0 for name, t in used.items()}
        return self.result
