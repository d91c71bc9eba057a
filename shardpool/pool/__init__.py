"""The static pool: worker container, supervisor and dynamic allocator."""

from shardpool.pool.static import Pool, WorkerInfo

__all__ = ["Pool", "WorkerInfo"]
