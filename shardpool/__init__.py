"""shardpool: run jobs on persistent PHP workers (RoadRunner's model) from Python."""

from shardpool.config import (
    Config,
    DynamicAllocatorConfig,
    PoolConfig,
    SupervisorConfig,
    load_config,
    pool_config,
)
from shardpool.errors import (
    AllocateError,
    ConfigError,
    EmptyPayloadError,
    ExecTTLError,
    JobTimeoutError,
    NoFreeWorkersError,
    PoolClosedError,
    ProtocolError,
    QueueFullError,
    ShardpoolError,
    SoftJobError,
    StreamTimeoutError,
    WorkerCrashedError,
    WorkerStoppedError,
)
from shardpool.payload import Payload
from shardpool.pool import Pool, WorkerInfo

__version__ = "0.1.0"

__all__ = [
    "AllocateError",
    "Config",
    "ConfigError",
    "DynamicAllocatorConfig",
    "EmptyPayloadError",
    "ExecTTLError",
    "JobTimeoutError",
    "NoFreeWorkersError",
    "Payload",
    "Pool",
    "PoolClosedError",
    "PoolConfig",
    "ProtocolError",
    "QueueFullError",
    "ShardpoolError",
    "SoftJobError",
    "StreamTimeoutError",
    "SupervisorConfig",
    "WorkerCrashedError",
    "WorkerInfo",
    "WorkerStoppedError",
    "__version__",
    "load_config",
    "pool_config",
]
