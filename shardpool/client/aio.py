"""AsyncClient: the core driven by an asyncio loop (the socket's FD on add_reader)."""

from __future__ import annotations

import asyncio
import collections
import functools
import math
from collections.abc import AsyncGenerator, Iterable, Iterator
from typing import Any, Literal, overload

from shardpool.client.connection import (
    _as_map,
    _ClientBase,
    _Connection,
)
from shardpool.client.core import (
    Body,
    K,
    MapWindow,
    Request,
    _check_timeout,
    to_payload,
)
from shardpool.errors import (
    BadRequestError,
    ConfigError,
    ShardpoolError,
    UnavailableError,
)
from shardpool.payload import Payload
from shardpool.wire import POLLIN, POLLOUT


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class AsyncClient(_ClientBase):
    """An asyncio client of a shardpool broker.

    >>> async with AsyncClient(timeout=30) as client:  # doctest: +SKIP
    ...     reply = await client.exec(b"hello")
    ...     async for chunk in client.stream(b"3"):
    ...         print(chunk.body)
    ...     async for reply in client.map(bodies, window=512):
    ...         print(reply.body)

    ``timeout`` is the default for every request: sent as each job's
    deadline, and the client gives up ``grace`` seconds after it with
    :class:`UnavailableError`. With no timeout, a wait is still bounded by
    the broker's liveness (``heartbeat``). Bound to one event loop; not for
    use from other threads.
    """

    def _init_io(self) -> None:
        self._conn: _Connection | None = None  # opened on first use, on the running loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    async def __aenter__(self) -> AsyncClient:
        self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Fail what is in flight (and cancel it at the broker, best effort); close the socket."""
        self._core.close()
        conn, loop = self._conn, self._loop
        if conn is None or loop is None:
            return
        self._conn = None
        conn.send(self._core)
        if self._timer is not None:
            self._timer.cancel()
        if not loop.is_closed():
            for fd in conn.fds:
                loop.remove_reader(fd)
        conn.close()

    # -- jobs ------------------------------------------------------------------

    async def exec(self, body: Body, context: bytes = b"", timeout: float | None = None) -> Payload:
        """Run one job and return its reply; an error reply raises its typed error."""
        self._open()
        request = self._core.submit_bytes(body, context, timeout)
        self._schedule_flush()
        # _wait, inlined: one coroutine less per job.
        loop = self._loop
        assert loop is not None
        try:
            while not request.done:
                future: asyncio.Future[None] = loop.create_future()
                request.waker = functools.partial(_resolve, future)
                await future
        except BaseException:
            self._cancel(request)
            raise
        return request.result()

    async def stream(
        self, body: Body, context: bytes = b"", timeout: float | None = None
    ) -> AsyncGenerator[Payload, None]:
        """Yield a streamed reply's chunks, the final one included.

        Leaving early cancels the stream at the broker; use
        ``contextlib.aclosing`` to make that immediate.
        """
        self._open()
        request = self._core.submit(to_payload(body, context), timeout=timeout, stream=True)
        self._schedule_flush()
        try:
            while True:
                await self._wait(request)
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
    ) -> AsyncGenerator[Payload, None]: ...

    @overload
    def map(
        self,
        items: Iterable[Body],
        *,
        window: int = ...,
        timeout: float | None = ...,
        return_exceptions: Literal[True],
    ) -> AsyncGenerator[Payload | ShardpoolError, None]: ...

    async def map(
        self,
        items: Iterable[Body],
        *,
        window: int = 256,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> AsyncGenerator[Payload | ShardpoolError, None]:
        """Run many jobs, yielding their replies in input order, ``window`` at most in flight.

        The first error is raised (the rest cancelled), unless
        ``return_exceptions`` is true: then errors are yielded in their place.
        """
        self._open()
        jobs = MapWindow(self._core, items, window, timeout, return_exceptions)
        try:
            while (request := jobs.head()) is not None:
                self._schedule_flush()
                await self._wait(request)
                yield jobs.pop()
        finally:
            jobs.close()
            self._schedule_flush()

    async def map_unordered(
        self,
        items: Iterable[tuple[K, Body]],
        *,
        window: int = 256,
        timeout: float | None = None,
    ) -> AsyncGenerator[tuple[K, Payload | ShardpoolError], None]:
        """Run many ``(key, body)`` jobs, yielding ``(key, reply or error)`` as each finishes.

        At most ``window`` jobs are in flight; slots freed together are refilled
        together, so under load jobs still leave in batches. Errors come back in
        place of replies, never raised. Leaving the loop early cancels the rest.
        """
        if window < 1:
            raise ConfigError("window must be at least 1")
        _check_timeout(timeout)
        self._open()
        assert self._loop is not None
        loop = self._loop
        source: Iterator[tuple[K, Body]] | None = iter(items)
        in_flight: dict[Request, K] = {}
        finished: collections.deque[Request] = collections.deque()
        wake: list[asyncio.Future[None]] = []

        def done(request: Request) -> None:
            finished.append(request)
            if wake:
                _resolve(wake.pop())

        try:
            while True:
                while source is not None and len(in_flight) < window:
                    try:
                        key, body = next(source)
                    except StopIteration:
                        source = None
                        break
                    try:
                        request = self._core.submit(to_payload(body), timeout=timeout)
                    except BadRequestError as exc:  # refused locally
                        yield key, exc
                        continue
                    in_flight[request] = key
                    request.waker = functools.partial(done, request)
                if not in_flight:
                    return
                self._schedule_flush()
                while not finished:
                    future: asyncio.Future[None] = loop.create_future()
                    wake.append(future)
                    await future
                while finished:
                    request = finished.popleft()
                    key = in_flight.pop(request)
                    try:
                        yield key, request.result()
                    except ShardpoolError as exc:
                        yield key, exc
        finally:
            for request in in_flight:
                if not request.done:
                    self._core.cancel(request)
            self._schedule_flush()

    # -- control ---------------------------------------------------------------

    async def workers(self, timeout: float | None = None) -> dict[str, Any]:
        """Every shard's workers: ``{shard: [{pid, state, jobs, in_flight, created_at, memory}]}``.

        A shard that did not answer maps to ``{"error": ..., "code": ...}``.
        """
        return _as_map(await self._control("workers", timeout), "workers")

    async def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """Job counts, queue length and per-shard load (see docs/protocol.md)."""
        return _as_map(await self._control("stats", timeout), "stats")

    async def reset(self, timeout: float | None = None) -> dict[str, Any]:
        """Replace every worker, one shard at a time: ``{shard: "ok" or an error map}``."""
        return _as_map(await self._control("reset", timeout), "reset")

    async def shutdown(self, timeout: float | None = None) -> None:
        """Ask the service to drain and stop."""
        await self._control("shutdown", timeout)

    async def ping(self, timeout: float | None = None) -> float:
        """The broker's round-trip time, in seconds."""
        start = self._core.clock()
        await self._control("ping", timeout)
        return self._core.clock() - start

    async def _control(self, cmd: str, timeout: float | None) -> Any:
        self._open()
        request = self._core.control(cmd, timeout=timeout)
        self._schedule_flush()
        await self._wait(request)
        return request.control_data()

    # -- plumbing --------------------------------------------------------------

    def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            if loop is not self._loop:
                raise ShardpoolError("an AsyncClient is bound to the event loop that first used it")
            return self._conn
        if self._core.closed:
            raise UnavailableError("the client is closed")
        conn = _Connection(self.address, self._curve)
        self._loop, self._conn = loop, conn
        sock_fd, monitor_fd = conn.fds
        loop.add_reader(sock_fd, self._service)
        loop.add_reader(monitor_fd, self._watch)  # only our calls on the monitor take its edge
        # A ZeroMQ descriptor signals new events only once EVENTS has been read
        # and found empty: read the monitor now, or a drop may never wake us.
        conn.watch(self._core)
        return conn

    async def _wait(self, request: Request) -> None:
        try:
            while not request.ready:
                assert self._loop is not None
                future: asyncio.Future[None] = self._loop.create_future()
                request.waker = functools.partial(_resolve, future)
                await future
        except BaseException:
            self._cancel(request)
            raise

    def _cancel(self, request: Request) -> None:
        if not request.done:
            self._core.cancel(request)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Everything submitted in this pass of the loop leaves in one message.
        if not self._flush_pending and self._loop is not None and self._conn is not None:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        self._service()

    def _service(self) -> None:
        """Send, receive, and re-arm the timer; loop until the socket is quiet."""
        conn, core = self._conn, self._core
        if conn is None:
            return
        while True:
            conn.send(core)
            events = conn.read(core)  # after the send: a send can consume the FD's edge
            if not (events & POLLIN or (core.wants_send and events & POLLOUT)):
                break
        self._arm()

    def _watch(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.watch(self._core)
            self._service()  # a lost connection may have failed requests: re-arm

    def _arm(self) -> None:
        deadline = self._core.next_deadline()
        if deadline is None or deadline >= self._timer_at:
            return  # nothing to time, or an earlier wake-up is armed (it re-arms)
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        delay = max(0.0, deadline - self._core.clock())
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._core.tick()
        self._service()
