"""Busy polling: the event loop keeps polling for a moment after it writes a
job, instead of blocking at once.

A process that blocks while its worker runs a job is woken by the reply. On
machines where that wake-up is cheap, blocking costs nothing. On many
virtual machines it is not: an idle virtual CPU halts, and waking it takes
the hypervisor tens of microseconds, longer than a 16 B job itself. There
the loop does better to poll (the event loop's own wait with a zero timeout)
for as long as a reply is likely to be on its way.

The spin adapts, as Linux's guest halt-polling does: after a spin that ran
out and a reply to a job that took little longer, the next spin is longer
(up to the configured limit); after a reply to a job that took far longer,
shorter, down to none. Short jobs keep the loop polling; slow jobs
(milliseconds) soon stop it, so a pool waiting on them costs no CPU. And a
spin gives way when the CPUs are contended: a thread that the kernel keeps
preempting while it polls is taking time that runnable PHP workers need
(more workers than cores, say), so spinning pauses for 50 ms, then tries
again.

A pool makes one BusyPoll for its workers (``busy_poll`` in its config),
unless its process may run on one CPU only (:func:`may_spin`). A
program driving a lone :class:`~shardpool.worker.worker.Worker` can give it
one: ``worker.busy_poll = BusyPoll(asyncio.get_running_loop(), 50e-6)``.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time

#: A spin that grows from nothing starts here (seconds).
GROW_START = 10e-6
#: Shorter than this, a shrinking spin stops altogether.
SHRINK_STOP = 2e-6
#: Every CHECK_EVERY loop passes a spin reads how often its thread was
#: preempted (involuntary context switches) since the last check: CONTENDED
#: times or more says the CPUs are wanted elsewhere, and no spin starts for
#: BACK_OFF seconds.
CHECK_EVERY = 64
CONTENDED = 2
BACK_OFF = 0.05
_RUSAGE = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)

#: A reply this many times the limit after its job started, or sooner, says
#: a spin of the limit would (nearly) have caught it: the time measured
#: includes the wake-up that spinning would have saved.
GROW_SLACK = 2.0


def may_spin() -> bool:
    """Whether spinning can pay in this thread: only if it may run on more than
    one CPU. On one CPU (``taskset``, a cpuset, a pinned shard) the reply a spin
    waits for needs that very CPU, so the spin only delays it."""
    affinity = getattr(os, "sched_getaffinity", None)
    return affinity is None or len(affinity(0)) > 1


class BusyPoll:
    """Adaptive busy polling for one event loop, shared by a pool's workers.

    A worker calls :meth:`kick` when it writes a job to an idle pipe, and
    :meth:`woke` when it reads while :attr:`asleep` is set, with the time its
    job started: the spin adapts to how long jobs take, each measured on its
    own worker, not to when the last job went out. A job written behind
    others in a pipe stops the spin (:meth:`saturated`): the workers stay
    busy without the loop's help, polling would take CPU they need, and the
    loop's own wait gathers several replies per read.
    """

    __slots__ = (
        "asleep", "backoff_until", "kicked_at", "limit", "loop", "passes", "preempted",
        "spinning", "spins", "window",
    )  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float) -> None:
        self.loop = loop
        #: The longest spin (seconds): the pool's ``busy_poll``.
        self.limit = limit
        #: The spin now (seconds), between 0 and ``limit``.
        self.window = limit
        self.kicked_at = 0.0
        self.spinning = False
        #: Set when the loop may be blocked waiting for a reply (the last spin
        #: ran out, or none ran): the next read tells how long the wait was.
        self.asleep = False
        #: Spins started (for tests and stats).
        self.spins = 0
        self.passes = 0
        #: Involuntary context switches of this thread at the last check.
        self.preempted = resource.getrusage(_RUSAGE).ru_nivcsw
        #: No spin before this time (time.monotonic()): the CPUs were contended.
        self.backoff_until = 0.0

    def kick(self, now: float) -> None:
        """A job went to an idle worker at ``now`` (time.monotonic())."""
        self.kicked_at = now
        if self.window <= 0.0 or now < self.backoff_until:
            # No spin (none left, or the CPUs are contended): the loop may
            # block, and the reply still tells how long the job took.
            self.asleep = True
        elif not self.spinning:
            self.spinning = True
            self.spins += 1
            self.loop.call_soon(self._spin)

    def saturated(self) -> None:
        """A job was written behind another in a busy pipe: every worker is
        busy without the loop's help, and the CPU a spin takes is theirs. The
        spin stops at its next pass."""
        self.kicked_at = 0.0

    def _spin(self) -> None:
        # A pending callback makes the loop poll with a zero timeout: replies
        # are read on the pass they arrive, with no wake-up to wait for.
        self.passes += 1
        if self.passes % CHECK_EVERY == 0 and self._contended():
            self.backoff_until = time.monotonic() + BACK_OFF
        elif time.monotonic() - self.kicked_at < self.window:
            self.loop.call_soon(self._spin)
            return
        self.spinning = False
        self.asleep = True

    def _contended(self) -> bool:
        """Was this thread preempted again and again since the last check?
        Then the CPUs are wanted by others: the PHP workers, most likely."""
        switches = resource.getrusage(_RUSAGE).ru_nivcsw
        was, self.preempted = self.preempted, switches
        return switches - was >= CONTENDED

    def woke(self, since: float) -> None:
        """A worker read a reply after the spin ran out; its job started at
        ``since`` (time.monotonic()): adapt the next spin to how long it took."""
        self.asleep = False
        took = time.monotonic() - since
        if took <= self.limit * GROW_SLACK:
            self.window = min(self.limit, max(self.window * 2.0, GROW_START))
        else:
            self.window = self.window / 2.0 if self.window > SHRINK_STOP else 0.0
