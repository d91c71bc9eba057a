"""The broker process: routing, shard watch, control commands."""

from shardpool.broker.broker import Broker, ServeError

__all__ = ["Broker", "ServeError"]
