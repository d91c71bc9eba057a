"""Whether serve pins its shards (``pin_shards: auto``): measure a hand-over.

A shard and its PHP worker hand every job back and forth over a pipe. On one
CPU each hand-over is a context switch; across two it wakes the other CPU,
which on many virtual machines costs tens of microseconds (an idle virtual
CPU halts, and an interrupt to another one exits to the hypervisor). There
a pinned shard hands jobs to its worker many times cheaper, while left to
itself the kernel keeps pairing and parting each shard and its worker, and
the service's throughput swings with it. Where a hand-over across CPUs costs
little more, pinning gains little and only takes the kernel's freedom to
move a busy shard's workers to an idle CPU.

So ``auto`` measures it once, when serve starts its shards: a small child
process echoes bytes over pipes while serve's own thread sits first on the
child's CPU, then on another, a few hundred round trips each. It takes some
tens of milliseconds.
"""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

#: ``auto`` pins when a round trip across CPUs takes at least DEAR_RATIO times
#: one on a single CPU, and at least DEAR_EXTRA seconds more.
DEAR_RATIO = 4.0
DEAR_EXTRA = 10e-6
SAME_TRIPS = 400
CROSS_TRIPS = 100
ROUNDS = 3
#: The probe gives up (and serve does not pin) past this, the child's start included.
PROBE_TIMEOUT = 5.0

_ECHO = "import os\nwhile True:\n b = os.read(0, 1)\n if not b: break\n os.write(1, b)\n"


class ProbeError(Exception):
    """The hand-over could not be measured."""


@dataclass(frozen=True)
class Handover:
    """A pipe round trip between two processes, in seconds (medians of ROUNDS)."""

    same_cpu: float
    cross_cpu: float

    @property
    def dear(self) -> bool:
        """Whether crossing CPUs costs enough more that pinned shards should pay."""
        return (
            self.cross_cpu >= DEAR_RATIO * self.same_cpu
            and self.cross_cpu - self.same_cpu >= DEAR_EXTRA
        )

    def describe(self) -> str:
        return (
            f"a hand-over between two processes took {self.same_cpu * 1e6:.1f} µs on one CPU "
            f"and {self.cross_cpu * 1e6:.1f} µs across two"
        )


def measure_handover(cpus: list[int]) -> Handover:
    """Round trips over pipes with a child on ``cpus[1]``: from it, and from ``cpus[0]``.

    Only the calling thread moves, and it gets its CPUs back. Raises
    :class:`ProbeError` naming the cause when the child cannot run or answer.
    """
    if len(cpus) < 2:
        raise ProbeError("one CPU: nothing to cross")
    home, away = cpus[1], cpus[0]
    before = os.sched_getaffinity(0)
    deadline = time.monotonic() + PROBE_TIMEOUT
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _ECHO],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
    except OSError as exc:
        raise ProbeError(f"cannot start the probe process: {exc}") from None
    assert child.stdin is not None and child.stdout is not None
    to_child, from_child = child.stdin.fileno(), child.stdout.fileno()
    try:
        os.sched_setaffinity(child.pid, {home})
        _trips(to_child, from_child, 20, deadline)  # the child is up, and its code warm
        same, cross = [], []
        for _ in range(ROUNDS):
            os.sched_setaffinity(0, {home})
            same.append(_trips(to_child, from_child, SAME_TRIPS, deadline) / SAME_TRIPS)
            os.sched_setaffinity(0, {away})
            cross.append(_trips(to_child, from_child, CROSS_TRIPS, deadline) / CROSS_TRIPS)
        return Handover(statistics.median(same), statistics.median(cross))
    except OSError as exc:
        raise ProbeError(f"the probe failed: {exc}") from None
    finally:
        os.sched_setaffinity(0, before)
        child.stdin.close()
        try:
            child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()


def _trips(to_child: int, from_child: int, count: int, deadline: float) -> float:
    """Seconds for ``count`` one-byte round trips; ProbeError past ``deadline``."""
    start = time.perf_counter()
    for _ in range(count):
        os.write(to_child, b"x")
        if not select.select([from_child], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise ProbeError(f"the probe process did not answer within {PROBE_TIMEOUT:g} s")
        if not os.read(from_child, 1):
            raise ProbeError("the probe process exited")
    return time.perf_counter() - start


def decide(setting: bool | Literal["auto"], count: int) -> tuple[Placement, list[int]]:
    """Whether ``count`` shards serve starts run pinned, and the CPUs serve may use.

    Where the system cannot pin (no ``sched_setaffinity``), nothing is pinned.
    """
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is None:
        return Placement(setting, False, "this system cannot pin processes to CPUs"), []
    allowed = sorted(affinity(0))
    return placement_for(setting, count, allowed), allowed


def placement_for(setting: bool | Literal["auto"], count: int, allowed: list[int]) -> Placement:
    """Whether ``count`` shards on the CPUs ``allowed`` run pinned, and why.

    Only two or more shards on two or more CPUs are ever pinned (one shard
    keeps every CPU, and on one CPU there is nowhere else to run). ``true``
    and ``false`` are then taken as given; ``auto`` pins only where a
    hand-over across CPUs is dear (:meth:`Handover.dear`).
    """
    if count < 2 or len(allowed) < 2:
        return Placement(setting, False, "one shard or one CPU: nothing to pin")
    if setting is not True and setting is not False:
        try:
            handover = measure_handover(sorted(allowed))
        except ProbeError as exc:
            return Placement(setting, False, f"could not measure a hand-over ({exc})")
        verdict = (
            "so each runs on CPUs of its own"
            if handover.dear
            else "close enough to leave their placement to the kernel"
        )
        return Placement(setting, handover.dear, f"{handover.describe()}, {verdict}", handover)
    return Placement(setting, setting, "as configured")


@dataclass(frozen=True)
class Placement:
    """What serve chose for its shards' CPUs, for the log and ``stats``."""

    setting: bool | Literal["auto"]
    pinned: bool
    reason: str
    handover: Handover | None = None

    def describe(self) -> str:
        state = "pinned" if self.pinned else "not pinned"
        return f"shards {state} (pin_shards: {str(self.setting).lower()}); {self.reason}"

    def figures(self) -> dict[str, object]:
        out: dict[str, object] = {"pin_shards": self.setting, "pinned": self.pinned}
        if self.handover is not None:
            out["same_cpu_us"] = round(self.handover.same_cpu * 1e6, 1)
            out["cross_cpu_us"] = round(self.handover.cross_cpu * 1e6, 1)
        return out
