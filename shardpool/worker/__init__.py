"""One PHP worker process: state machine, frame channel, exec/stream/stop/kill."""

from shardpool.worker.state import WorkerState
from shardpool.worker.worker import Worker

__all__ = ["Worker", "WorkerState"]
