"""The shard process: one broker connection and one static pool."""

from shardpool.shard.shard import EXIT_BOOT_FAILED, Shard

__all__ = ["EXIT_BOOT_FAILED", "Shard"]
