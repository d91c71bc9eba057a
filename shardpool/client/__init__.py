"""The client of a shardpool broker (docs/protocol.md): a sans-IO core and two drivers.

:class:`ClientCore` holds every rule of the protocol and does no I/O: it
assigns request ids, batches queued jobs into ``jobs`` messages, decodes
``replies`` messages and routes each reply to its :class:`Request`, turns
error replies into typed exceptions, and keeps every wait bounded (per-request
deadlines, and a ping when the broker has been silent for ``heartbeat``
seconds while requests are pending). Time comes from an injectable clock.

Two drivers move its bytes over one ZeroMQ DEALER socket:

- :class:`AsyncClient` for asyncio: the socket's FD on ``loop.add_reader``
  (no ``zmq.asyncio``). Requests made in one pass of the event loop leave in
  one message; a lone request leaves on the next pass.
- :class:`Client`, blocking, with ``zmq.Poller`` and bounded poll timeouts.

>>> with Client("tcp://127.0.0.1:7400", timeout=30) as client:  # doctest: +SKIP
...     client.exec(b"hello").body
b'hello'

The package: :mod:`~shardpool.client.core` (the sans-IO core),
:mod:`~shardpool.client.connection` (the socket and what both drivers share),
:mod:`~shardpool.client.aio` (AsyncClient), :mod:`~shardpool.client.blocking`
(Client).
"""

from shardpool.client.aio import AsyncClient
from shardpool.client.blocking import Client
from shardpool.client.core import (
    DEFAULT_ADDRESS,
    MAX_BATCH_BYTES,
    MAX_BATCH_JOBS,
    ClientCore,
    Kind,
    MapWindow,
    Request,
    to_payload,
)
from shardpool.curve import CurveKeys

__all__ = [
    "DEFAULT_ADDRESS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_JOBS",
    "AsyncClient",
    "Client",
    "ClientCore",
    "CurveKeys",
    "Kind",
    "MapWindow",
    "Request",
    "to_payload",
]
