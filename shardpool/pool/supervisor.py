"""The supervisor: every ``watch_tick``, check each worker's soft limits.

``ttl``, ``idle_ttl`` and ``max_worker_memory``: a ready worker is retired at
once; a working one is marked and retired when its job ends (never killed
under a running job). ``exec_ttl`` is enforced per job by a timer instead, so
it is exact rather than rounded up to a tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import psutil

from shardpool.worker.state import WorkerState

if TYPE_CHECKING:
    from shardpool.pool.static import Pool

log = logging.getLogger("shardpool.pool")
MB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, 0 if it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


class Supervisor:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.config = pool.config.supervisor
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        c = self.config
        return bool(c.ttl or c.idle_ttl or c.max_worker_memory) or self.pool._allocator.enabled

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.watch_tick)
            try:
                self.tick()
            except Exception:  # a bug here must not stop supervision
                log.exception("supervisor tick failed")

    def tick(self) -> None:
        now_wall, now = time.time(), time.monotonic()
        for worker in self.pool._all_workers():
            if worker.retiring or not worker.alive:
                continue
            mark = self._limit_reached(worker, now_wall, now)
            if mark is None:
                continue
            if worker._try_transition(mark):
                log.debug("worker pid %d: %s", worker.pid, mark.value)
            if worker.in_flight == 0:
                self.pool.retire(worker)
        self.pool._allocator.tick()

    def _limit_reached(self, worker: object, now_wall: float, now: float) -> WorkerState | None:
        from shardpool.worker.worker import Worker

        assert isinstance(worker, Worker)
        c = self.config
        if c.ttl and now_wall - worker.created_at >= c.ttl:
            return WorkerState.TTL_REACHED
        if c.idle_ttl and worker.in_flight == 0 and now - worker.last_used >= c.idle_ttl:
            return WorkerState.IDLE_TTL_REACHED
        if c.max_worker_memory and rss_bytes(worker.pid) >= c.max_worker_memory * MB:
            return WorkerState.MAX_MEMORY_REACHED
        return None
