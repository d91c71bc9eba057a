"""The dynamic allocator: extra workers when jobs find none free.

When a job has to queue, up to ``spawn_rate`` extra workers are spawned (at
most one burst per second, never more than ``max_workers`` extras). Extras
are removed once no job has queued for ``idle_timeout``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from shardpool.config import DynamicAllocatorConfig

if TYPE_CHECKING:
    from shardpool.pool.static import Pool

log = logging.getLogger("shardpool.pool")
BURST_INTERVAL = 1.0


class DynamicAllocator:
    def __init__(self, pool: Pool, config: DynamicAllocatorConfig | None) -> None:
        self.pool = pool
        self.config = config
        self.extras = 0
        self._last_burst = -BURST_INTERVAL
        self._last_need = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.config is not None

    def on_queued(self) -> None:
        """A job found no free worker."""
        config = self.config
        if config is None:
            return
        now = time.monotonic()
        self._last_need = now
        if now - self._last_burst < BURST_INTERVAL or self.extras >= config.max_workers:
            return
        self._last_burst = now
        burst = min(config.spawn_rate, config.max_workers - self.extras)
        self.extras += burst
        self.pool._target += burst
        log.info("dynamic allocator: spawning %d extra worker(s), %d extra now", burst, self.extras)
        self.pool._ensure()

    def tick(self) -> None:
        """Remove idle extra workers once nothing has needed them for ``idle_timeout``."""
        config = self.config
        if config is None or not self.extras:
            return
        if time.monotonic() - self._last_need < config.idle_timeout:
            return
        pool = self.pool
        for worker in list(pool._idle):
            if not self.extras:
                break
            self.extras -= 1
            pool._target -= 1
            pool.retire(worker, reason="scaled_down")
