"""Client: the core driven by blocking zmq.Poller calls with bounded timeouts."""

from __future__ import annotations

import math
from collections.abc import Generator, Iterable
from typing import Any, Literal, overload

import zmq

from shardpool.client.connection import (
    _as_map,
    _ClientBase,
    _Connection,
)
from shardpool.client.core import (
    Body,
    MapWindow,
    Request,
    to_payload,
)
from shardpool.errors import (
    ShardpoolError,
    UnavailableError,
)
from shardpool.payload import Payload


class Client(_ClientBase):
    """A blocking client of a shardpool broker: the same core as :class:`AsyncClient`.

    >>> with Client("tcp://127.0.0.1:7400", timeout=30) as client:  # doctest: +SKIP
    ...     print(client.exec(b"hello").body)
    ...     for reply in client.map(bodies, window=512):
    ...         print(reply.body)

    Replies are read only while a call is waiting. One thread at a time.
    """

    def _init_io(self) -> None:
        self._conn: _Connection | None = _Connection(self.address, self._curve)
        self._poller = zmq.Poller()
        self._poller.register(self._conn.sock, zmq.POLLIN)
        self._poller.register(self._conn.monitor, zmq.POLLIN)
        self._polling_out = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Fail what is in flight (and cancel it at the broker, best effort); close the socket."""
        self._core.close()
        if self._conn is not None:
            self._conn.send(self._core)
            self._conn.close()
            self._conn = None

    # -- jobs ------------------------------------------------------------------

    def exec(self, body: Body, context: bytes = b"", timeout: float | None = None) -> Payload:
        """Run one job and return its reply; an error reply raises its typed error."""
        request = self._core.submit_bytes(body, context, timeout)
        self._wait(request)
        return request.result()

    def stream(
        self, body: Body, context: bytes = b"", timeout: float | None = None
    ) -> Generator[Payload, None, None]:
        """Yield a streamed reply's chunks, the final one included; leaving early cancels it."""
        request = self._core.submit(to_payload(body, context), timeout=timeout, stream=True)
        try:
            while True:
                self._wait(request)
                chunk = request.take()
                if chunk is None:
                    return
                yield chunk
        finally:
            self._cancel(request)

    @overload
    def map(
        self,
        items: Iterable[Body],
        *,
        window: int = ...,
        timeout: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> Generator[Payload, None, None]: ...

    @overload
    def map(
        self,
        items: Iterable[Body],
        *,
        window: int = ...,
        timeout: float | None = ...,
        return_exceptions: Literal[True],
    ) -> Generator[Payload | ShardpoolError, None, None]: ...

    def map(
        self,
        items: Iterable[Body],
        *,
        window: int = 256,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> Generator[Payload | ShardpoolError, None, None]:
        """Run many jobs, yielding their replies in input order, ``window`` at most in flight.

        The first error is raised (the rest cancelled), unless
        ``return_exceptions`` is true: then errors are yielded in their place.
        """
        jobs = MapWindow(self._core, items, window, timeout, return_exceptions)
        try:
            while (request := jobs.head()) is not None:
                self._wait(request)
                yield jobs.pop()
        finally:
            jobs.close()
            self._send()

    # -- control ---------------------------------------------------------------

    def workers(self, timeout: float | None = None) -> dict[str, Any]:
        """Every shard's workers: ``{shard: [{pid, state, jobs, in_flight, created_at, memory}]}``.

        A shard that did not answer maps to ``{"error": ..., "code": ...}``.
        """
        return _as_map(self._control("workers", timeout), "workers")

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """Job counts, queue length and per-shard load (see docs/protocol.md)."""
        return _as_map(self._control("stats", timeout), "stats")

    def reset(self, timeout: float | None = None) -> dict[str, Any]:
        """Replace every worker, one shard at a time: ``{shard: "ok" or an error map}``."""
        return _as_map(self._control("reset", timeout), "reset")

    def shutdown(self, timeout: float | None = None) -> None:
        """Ask the service to drain and stop."""
        self._control("shutdown", timeout)

    def ping(self, timeout: float | None = None) -> float:
        """The broker's round-trip time, in seconds."""
        start = self._core.clock()
        self._control("ping", timeout)
        return self._core.clock() - start

    def _control(self, cmd: str, timeout: float | None) -> Any:
        request = self._core.control(cmd, timeout=timeout)
        self._wait(request)
        return request.control_data()

    # -- plumbing --------------------------------------------------------------

    def _wait(self, request: Request) -> None:
        """Send, poll and receive until the request is ready; every poll is bounded."""
        core = self._core
        try:
            while not request.ready:
                conn = self._connection()
                want_out = not conn.send(core)
                self._poll(conn, core.next_deadline(), want_out)
                conn.receive(core)
                core.tick()
        except BaseException:
            self._cancel(request)
            raise

    def _poll(self, conn: _Connection, deadline: float | None, want_out: bool) -> None:
        if want_out != self._polling_out:
            self._polling_out = want_out
            self._poller.register(conn.sock, zmq.POLLIN | (zmq.POLLOUT if want_out else 0))
        if deadline is None:  # cannot happen while a request waits (the heartbeat)
            deadline = self._core.clock() + self._core.heartbeat
        self._poller.poll(max(0, math.ceil((deadline - self._core.clock()) * 1000)))

    def _connection(self) -> _Connection:
        if self._conn is None:
            raise UnavailableError("the client is closed")
        return self._conn

    def _cancel(self, request: Request) -> None:
        if not request.done:
            self._core.cancel(request)
            self._send()

    def _send(self) -> None:
        if self._conn is not None:
            self._conn.send(self._core)
