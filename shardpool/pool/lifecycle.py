"""Worker lifecycle events: each worker's start and end, logged once and counted.

A worker's end reason is decided where the cause is seen (the worker itself
for a crash, exec TTL, stop request or protocol error; the pool for soft
limits, reset and removal) and the first cause wins. This module turns it
into one log line and one count, which ``stats`` and the metrics report.

End reasons: ``max_jobs``, ``ttl``, ``idle_ttl``, ``memory`` (soft limits),
``exec_ttl``, ``stream_timeout``, ``stop_request``, ``protocol_error``,
``stdout_garbage``, ``crashed`` (under a job), ``exited`` (on its own, idle),
``boot_failed``, ``killed`` (faults),
``reset``, ``removed``, ``scaled_down`` (asked for), ``destroyed`` (the pool
stopped: not a restart).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING

from shardpool.worker.state import WorkerState

if TYPE_CHECKING:
    from shardpool.worker.worker import Worker

log = logging.getLogger("shardpool.pool")

REASON_BY_STATE = {
    WorkerState.MAX_JOBS_REACHED: "max_jobs",
    WorkerState.TTL_REACHED: "ttl",
    WorkerState.IDLE_TTL_REACHED: "idle_ttl",
    WorkerState.MAX_MEMORY_REACHED: "memory",
    WorkerState.EXEC_TTL_REACHED: "exec_ttl",
}
# Ends that are faults, logged as warnings; the rest are routine.
FAULTS = frozenset(
    {
        "exec_ttl",
        "stream_timeout",
        "protocol_error",
        "stdout_garbage",
        "crashed",
        "exited",
        "boot_failed",
    }
)


class Lifecycle:
    """Counts worker spawns and ends (by reason) for one pool, and logs each once."""

    def __init__(self) -> None:
        self.spawned = 0
        self.ended: collections.Counter[str] = collections.Counter()

    @property
    def restarts(self) -> dict[str, int]:
        """Workers replaced, by reason (a pool being destroyed is not a restart)."""
        return {k: v for k, v in self.ended.items() if k != "destroyed"}

    def spawned_worker(self, worker: Worker) -> None:
        self.spawned += 1
        log.info(
            "worker pid %d spawned (%s)",
            worker.pid,
            worker.relay,
            extra={"event": "worker_spawned", "worker_pid": worker.pid},
        )

    def ended_worker(self, worker: Worker, closing: bool) -> str:
        """Record why ``worker`` is gone; return the reason."""
        reason = worker.end_reason
        if reason is None:
            reason = "destroyed" if closing else ("killed" if worker.error else "removed")
        self.ended[reason] += 1
        age = time.time() - worker.created_at
        extra = {"event": "worker_ended", "worker_pid": worker.pid, "reason": reason}
        if reason in FAULTS:
            log.warning(
                "worker pid %d %s: %s",
                worker.pid,
                reason if reason in ("crashed", "exited") else f"ended ({reason})",
                worker.error,
                extra=extra,
            )
        else:
            log.log(
                logging.DEBUG if reason == "destroyed" else logging.INFO,
                "worker pid %d retired (%s) after %d jobs, %.1fs",
                worker.pid,
                reason,
                worker.jobs_done,
                age,
                extra=extra,
            )
        return reason
