"""CPU use of groups of processes over a measured window, as % of one core,
and how often they were switched out.

A group is a named list of pids (``client``, ``broker``, ``shards``,
``php``). The meter reads each process's own user + system time (psutil
``cpu_times``, children not included) at the start and the end of a window.
Processes that exit or are born during the window are not counted (a
pool that replaces workers mid-run under-reports a little). The ``reaped`` group instead takes
the CPU time of this process's children that exited and were waited for in
the window (``os.times``): that is how one-PHP-process-per-job is measured.

Context switches (:data:`SWITCHES`): every time one of the measured
processes' threads left its CPU, because it blocked (waiting for a reply) or
was preempted. Each needs a wake-up later. Two processes passing jobs to and
fro on one CPU switch cheaply; a wake-up that has to rouse another, idle CPU
can cost tens of microseconds on a virtual machine, so the count says where
to look, not what it cost. Linux only (``/proc/PID/task/*/status``);
elsewhere the key is absent.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterable, Mapping

import psutil

GROUPS = ("client", "broker", "shards", "php")
#: The key of :attr:`CpuMeter.result` holding context switches per second,
#: summed over every group (voluntary and involuntary, every thread).
SWITCHES = "switches"


def _cpu(proc: psutil.Process) -> float | None:
    try:
        times = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return float(times.user + times.system)


def _reaped() -> float:
    times = os.times()
    return times.children_user + times.children_system


def _switches(pid: int) -> int | None:
    """Context switches of every live thread of ``pid``; None if unreadable."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith((b"voluntary_ctxt", b"nonvoluntary_ctxt")):
                        total += int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None  # gone, or not Linux
    return total


def _reaped_switches() -> int:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_nvcsw + usage.ru_nivcsw


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
        self._first_switches: dict[int, int] = {}
        self._reaped_first = 0.0
        self._reaped_switches = 0
        self._t0 = 0.0
        self.result: dict[str, float] = {}

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._reaped_first = _reaped()
        self._reaped_switches = _reaped_switches()
        self._first = {
            name: {p.pid: t for p in procs if (t := _cpu(p)) is not None}
            for name, procs in self._groups.items()
        }
        self._first_switches = {
            p.pid: n
            for procs in self._groups.values()
            for p in procs
            if (n := _switches(p.pid)) is not None
        }

    def stop(self) -> dict[str, float]:
        """Each group's CPU over the window in % of one core (100 = one core busy),
        and under :data:`SWITCHES` the context switches per second of them all."""
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
        switches = 0
        for pid, was in self._first_switches.items():
            now_switches = _switches(pid)
            if now_switches is not None:
                switches += now_switches - was
        if self._reaped_group is not None:
            used[self._reaped_group] = used.get(self._reaped_group, 0.0) + (
                _reaped() - self._reaped_first
            )
            switches += _reaped_switches() - self._reaped_switches
        self.result = {name: 100.0 * t / wall if wall > 0 else 0.0 for name, t in used.items()}
        if self._first_switches and wall > 0:
            self.result[SWITCHES] = switches / wall
        return self.result
