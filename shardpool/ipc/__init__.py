"""Factories that spawn PHP workers and connect them: pipes, TCP, unix sockets."""

from __future__ import annotations

from shardpool.ipc.base import Factory, worker_env
from shardpool.ipc.pipe import PipeFactory
from shardpool.ipc.socket import SocketFactory


def factory_for(relay: str) -> Factory:
    """``pipes`` → :class:`PipeFactory`; ``tcp://…`` / ``unix://…`` → :class:`SocketFactory`."""
    if relay == "pipes":
        return PipeFactory()
    return SocketFactory(relay)


__all__ = ["Factory", "PipeFactory", "SocketFactory", "factory_for", "worker_env"]
