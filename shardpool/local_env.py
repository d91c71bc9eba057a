"""How ``serve`` hands its pool config to the shard processes it starts."""

from __future__ import annotations

import os

import msgspec

from shardpool.broker.local import CONFIG_ENV
from shardpool.config import PoolConfig, convert


def pool_from_env() -> PoolConfig | None:
    text = os.environ.get(CONFIG_ENV)
    if not text:
        return None
    result: PoolConfig = convert(msgspec.json.decode(text), PoolConfig, "pool config from serve")
    return result
