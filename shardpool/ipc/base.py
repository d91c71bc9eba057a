"""What every worker factory offers: spawn a connected, handshaken worker."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Protocol

from shardpool.worker.worker import Worker

DEFAULT_MODE = "shardpool"


class Factory(Protocol):
    """Spawns PHP workers and connects their frame channel."""

    relay: str

    async def spawn(
        self,
        command: Sequence[str],
        *,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        max_jobs: int = 0,
    ) -> Worker: ...

    async def close(self) -> None: ...


def worker_env(
    relay: str, env: Mapping[str, str] | None, mode: str = DEFAULT_MODE
) -> dict[str, str]:
    """The environment a RoadRunner-style PHP worker reads: RR_RELAY and RR_MODE."""
    merged = dict(os.environ)
    if env:
        merged.update(env)
    merged["RR_RELAY"] = relay
    merged.setdefault("RR_MODE", mode)
    return merged
