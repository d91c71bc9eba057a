"""The client's sans-IO core: requests, batching, replies, deadlines (see shardpool.client)."""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import Enum
from typing import Any, TypeVar

import msgspec

from shardpool import wire
from shardpool.curve import CurveKeys
from shardpool.errors import (
    BadRequestError,
    ConfigError,
    ShardpoolError,
    UnavailableError,
    error_from_code,
)
from shardpool.payload import Payload

log = logging.getLogger("shardpool.client")


DEFAULT_ADDRESS = "tcp://127.0.0.1:7400"
GRACE = 1.0  # seconds the client waits past a job's own timeout before giving up on it
HEARTBEAT = 5.0  # silence (s) with requests pending before a ping; as long again for its answer
MAX_BATCH_JOBS = 1024  # jobs per message, at most ...
MAX_BATCH_BYTES = 1 << 20  # ... and body+context bytes per message (a bigger job goes alone)
LINGER_MS = 1000  # a closed socket still tries this long to deliver cancels


Body = bytes | Payload
K = TypeVar("K")
Curve = CurveKeys | tuple[str, str] | None
Waker = Callable[[], None]


def to_payload(body: Body, context: bytes = b"") -> Payload:
    """The Payload of a job given as bytes (and a context) or as a Payload."""
    if isinstance(body, Payload):
        if context:
            raise ConfigError("give the context inside the Payload or as context=, not both")
        return body
    if isinstance(body, bytes) and isinstance(context, bytes):
        return Payload(body, context)
    raise TypeError(
        f"a job is bytes or a Payload, with a bytes context; got {type(body).__name__} "
        f"and {type(context).__name__} (encode text first)"
    )


def _check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    if timeout is not None and not timeout > 0:  # also refuses NaN
        raise ConfigError(f"{what} must be a number of seconds greater than 0, or None")
    return timeout


class Kind(Enum):
    JOB = "job"
    STREAM = "stream"
    CONTROL = "command"


# Reading an enum member through its class costs ~100 ns in Python 3.11: the
# per-job paths use these module-level names instead.
_JOB, _STREAM, _CONTROL = Kind.JOB, Kind.STREAM, Kind.CONTROL


class Request:
    """One request in flight: a job, a streamed job or a control command.

    The core fills it; a driver waits until :attr:`ready`, then takes from it.
    ``waker``, when set, is called once (then cleared) as soon as something
    arrives or the request ends.
    """

    __slots__ = (
        "_error",
        "_items",
        "_last",
        "data",
        "deadline",
        "done",
        "id",
        "kind",
        "sent",
        "timeout",
        "waker",
    )

    def __init__(self, rid: int, kind: Kind, timeout: float | None, deadline: float | None) -> None:
        self.id = rid
        self.kind = kind
        self.timeout = timeout
        self.deadline = deadline  # on the core's clock; None: bounded by the heartbeat only
        self.sent = False  # encoded into a message (it may still sit in a socket buffer)
        self.done = False  # terminal reply received, or failed/cancelled locally
        self.data: Any = None  # a control command's result
        self.waker: Waker | None = None
        self._items: collections.deque[Payload] | None = None  # stream chunks, made on the first
        self._last: Payload | None = None  # the terminal reply's payload
        self._error: ShardpoolError | None = None

    def __repr__(self) -> str:
        state = "done" if self.done else "sent" if self.sent else "queued"
        return f"<Request {self.id} {self.kind.value} {state}>"

    @property
    def ready(self) -> bool:
        """True when :meth:`take` would not come back empty-handed for lack of news."""
        return self.done or bool(self._items)

    def take(self) -> Payload | None:
        """The next chunk or result; raises the request's error once the chunks are taken.

        None means nothing more has arrived yet, or (when :attr:`done`) the end.
        """
        if self._items:
            return self._items.popleft()
        last = self._last
        if last is not None:
            self._last = None
            return last
        if self._error is not None:
            raise self._error
        return None

    def result(self) -> Payload:
        """A finished job's reply, or its error raised."""
        payload = self.take()
        if payload is None:
            raise ShardpoolError(f"request {self.id} has no result yet")  # a driver bug
        return payload

    def control_data(self) -> Any:
        """A finished control command's ``data``, or its error raised."""
        if self._error is not None:
            raise self._error
        return self.data

    # -- filled by the core ----------------------------------------------------

    def _push(self, payload: Payload) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(payload)
        self._wake()

    def _finish(self, payload: Payload | None = None, error: ShardpoolError | None = None) -> None:
        self._last = payload  # taken after any chunks
        self._error = error
        self.done = True
        self._wake()

    def _wake(self) -> None:
        waker = self.waker
        if waker is not None:
            self.waker = None
            waker()


class _Deadlines:
    """Request deadlines in the order they fall due, cheaply.

    One deque per timeout value: requests with the same timeout fall due in
    the order they were made (the clock only moves forward), so each deque is
    sorted and the earliest deadline is the least of a few heads. A heap
    compared tuples in Python on every push and pop: a few microseconds a job
    at thousands of jobs a second. Entries of finished requests stay until
    they reach a head, or until :meth:`compact`.
    """

    __slots__ = ("_by_timeout", "_size")

    def __init__(self) -> None:
        self._by_timeout: dict[float, collections.deque[tuple[float, int]]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, timeout: float, deadline: float, rid: int, live: Mapping[int, object]) -> None:
        """Add request ``rid``; first drop finished ones if they outnumber ``live``."""
        if self._size > 2 * len(live) + 64:
            self.compact(live)
        queue = self._by_timeout.get(timeout)
        if queue is None:
            queue = self._by_timeout[timeout] = collections.deque()
        queue.append((deadline, rid))
        self._size += 1

    def earliest(self, live: Mapping[int, object]) -> float | None:
        """The earliest deadline of a request still in ``live``; drops the others."""
        best: float | None = None
        for timeout, queue in list(self._by_timeout.items()):
            while queue and queue[0][1] not in live:
                queue.popleft()
                self._size -= 1
            if not queue:
                del self._by_timeout[timeout]
            elif best is None or queue[0][0] < best:
                best = queue[0][0]
        return best

    def due(self, now: float) -> list[int]:
        """Take out the request ids whose deadline is ``now`` or earlier."""
        out: list[int] = []
        for queue in self._by_timeout.values():
            while queue and queue[0][0] <= now:
                out.append(queue.popleft()[1])
                self._size -= 1
        return out

    def compact(self, live: Mapping[int, object]) -> None:
        """Drop every entry of a request no longer in ``live``."""
        self._by_timeout = {
            timeout: kept
            for timeout, queue in self._by_timeout.items()
            if (kept := collections.deque(entry for entry in queue if entry[1] in live))
        }
        self._size = sum(len(queue) for queue in self._by_timeout.values())


class ClientCore:
    """The protocol state of one client connection, with no I/O.

    A driver calls :meth:`submit` / :meth:`control` / :meth:`cancel`, sends
    the frames of :meth:`outbox`, feeds every received frame to
    :meth:`receive`, calls :meth:`tick` by :meth:`next_deadline`, and reports
    a lost connection with :meth:`connection_lost`.

    >>> core = ClientCore(clock=lambda: 0.0)
    >>> a, b = core.submit(Payload(b"x")), core.submit(Payload(b"y"))
    >>> len(core.outbox())          # both jobs in one message
    1
    >>> core.receive(wire.encode(wire.Replies(replies=[wire.Reply(a.id, b"X")])))
    >>> a.result().body, b.ready
    (b'X', False)
    """

    def __init__(
        self,
        *,
        timeout: float | None = None,
        grace: float = GRACE,
        heartbeat: float = HEARTBEAT,
        max_payload: int = wire.DEFAULT_MAX_PAYLOAD,
        peer: str = "the broker",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = _check_timeout(timeout)
        if not grace >= 0:
            raise ConfigError("grace must be a number of seconds, 0 or more")
        _check_timeout(heartbeat, "heartbeat")
        if max_payload < 1:
            raise ConfigError("max_payload must be at least 1 byte")
        self.grace = grace
        self.heartbeat = heartbeat
        self.max_payload = max_payload
        self.peer = peer
        self.clock = clock
        self.closed = False
        self._ids = itertools.count(1)  # 0 is the broker's "cannot tell which request"
        self._requests: dict[int, Request] = {}
        self._jobs: dict[int, wire.Job] = {}  # submitted, not yet encoded
        self._controls: dict[int, wire.Control] = {}
        self._cancels: list[int] = []
        self._frames: collections.deque[bytes] = collections.deque()  # encoded, not yet sent
        self._deadlines = _Deadlines()  # entries of finished requests linger until compacted
        self._last_heard = 0.0
        self._ping_at: float | None = None

    @property
    def in_flight(self) -> int:
        """Requests without a terminal reply yet."""
        return len(self._requests)

    # -- requests --------------------------------------------------------------

    def submit(
        self, payload: Payload, *, timeout: float | None = None, stream: bool = False
    ) -> Request:
        """Queue a job; it goes out with the next :meth:`outbox`.

        ``timeout`` (default: the core's) is sent as the job's deadline, and
        the request fails with :class:`UnavailableError` ``grace`` seconds
        after it if no terminal reply came.
        """
        return self.submit_bytes(payload.body, payload.context, timeout, stream)

    def submit_bytes(
        self, body: Body, context: bytes = b"", timeout: float | None = None, stream: bool = False
    ) -> Request:
        """:meth:`submit` for a job given as in ``exec``: bytes and a context, or a Payload."""
        if type(body) is not bytes or type(context) is not bytes:  # others: checked, converted
            payload = to_payload(body, context)
            body, context = payload.body, payload.context
        size = len(body) + len(context)
        if size > self.max_payload:
            raise BadRequestError(
                f"job of {size} bytes exceeds max_payload ({self.max_payload}); "
                "raise it on the client and the broker's max_payload_size together"
            )
        timeout = self._timeout(timeout)
        request = self._register(_STREAM if stream else _JOB, timeout)
        job = wire.Job(request.id, body, context, stream=stream)
        if timeout is not None:  # else the default stays, and off the wire
            job.timeout = timeout
        self._jobs[request.id] = job
        return request

    def control(self, cmd: str, *, timeout: float | None = None) -> Request:
        """Queue a control command (workers, stats, reset, shutdown, ping)."""
        request = self._register(Kind.CONTROL, self._timeout(timeout))
        self._controls[request.id] = wire.Control(id=request.id, cmd=cmd)
        return request

    @staticmethod
    def failed(error: ShardpoolError) -> Request:
        """A request that failed before it could be sent (it holds ``error``)."""
        request = Request(0, Kind.JOB, None, None)
        request._finish(error=error)
        return request

    def cancel(self, request: Request) -> None:
        """Give up on a request: a queued job is never sent, a sent one is cancelled.

        Replies that still come for it are ignored.
        """
        if request.done or self._requests.get(request.id) is not request:
            return
        self._drop(request, cancel=True)
        request._finish(error=UnavailableError("the request was cancelled by the client"))

    def close(self, why: str = "the client was closed") -> None:
        """Fail every request in flight; later submissions raise :class:`UnavailableError`."""
        self.closed = True
        self._fail(list(self._requests.values()), lambda: UnavailableError(why))

    # -- bytes out -------------------------------------------------------------

    @property
    def wants_send(self) -> bool:
        return bool(self._frames or self._jobs or self._controls or self._cancels)

    def outbox(self) -> collections.deque[bytes]:
        """Encode what is queued; the driver sends these frames in order, popping each sent one."""
        if self._jobs:
            self._encode_jobs()
        if self._controls:
            for rid, control in self._controls.items():
                self._frames.append(wire.encode(control))
                request = self._requests.get(rid)
                if request is not None:
                    request.sent = True
            self._controls.clear()
        if self._cancels:
            self._frames.append(wire.encode(wire.Cancel(ids=self._cancels)))
            self._cancels = []
        return self._frames

    def _encode_jobs(self) -> None:
        batch: list[wire.Job] = []
        size = 0
        for job in self._jobs.values():
            n = len(job.body) + len(job.ctx)
            if batch and (len(batch) >= MAX_BATCH_JOBS or size + n > MAX_BATCH_BYTES):
                self._frames.append(wire.encode(wire.Submit(jobs=batch)))
                batch, size = [], 0
            batch.append(job)
            size += n
            self._requests[job.id].sent = True
        self._frames.append(wire.encode(wire.Submit(jobs=batch)))
        self._jobs.clear()

    # -- bytes in --------------------------------------------------------------

    def receive(self, frame: bytes) -> None:
        """Route every reply of one message from the broker to its request."""
        try:
            message = wire.replies_decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignored a malformed message from %s: %s", self.peer, exc)
            return
        if message.v != wire.VERSION:
            log.warning(
                "ignored a message of protocol version %d from %s (this client speaks %d)",
                message.v,
                self.peer,
                wire.VERSION,
            )
            return
        self._last_heard = self.clock()
        self._ping_at = None
        requests, jobs = self._requests, self._jobs
        for reply in message.replies:
            # A job's result, most replies: _route's last branch, inlined.
            request = requests.get(reply.id)
            if request is None or request.kind is not _JOB or reply.code or reply.more:
                self._route(reply)
                continue
            del requests[reply.id]
            jobs.pop(reply.id, None)
            request._finish(Payload(reply.body, reply.ctx))

    def _route(self, reply: wire.Reply) -> None:
        request = self._requests.get(reply.id)
        if request is None:
            if reply.id == 0 and reply.code:
                self._unattributed(reply)
            else:  # cancelled, expired, or a heartbeat ping: normal
                log.debug("ignored a reply for id %d, which is not in flight", reply.id)
            return
        if reply.code:
            self._drop(request)
            request._finish(error=error_from_code(reply.code, reply.error or reply.code))
        elif reply.more:
            if request.kind is _STREAM:
                request._push(Payload(reply.body, reply.ctx))
            else:
                log.warning(
                    "ignored a stream chunk for request %d, which is not a stream", reply.id
                )
        else:
            self._drop(request)
            if request.kind is _CONTROL:
                request.data = reply.data
                request._finish()
            else:
                request._finish(Payload(reply.body, reply.ctx))

    def _unattributed(self, reply: wire.Reply) -> None:
        # The broker could not read one of our messages, so it cannot say which
        # jobs it lost: any sent request may be among them. Fail them all,
        # loudly, rather than leave some waiting for replies that never come.
        message = f"the broker could not read a message from this client: {reply.error}"
        log.error("%s (%s)", message, reply.code)
        sent = [r for r in self._requests.values() if r.sent]
        self._fail(sent, lambda: error_from_code(reply.code, message))

    def connection_lost(self, why: str) -> None:
        """The connection dropped: replies to sent requests can no longer arrive.

        The broker knows a reconnected client as a new peer, so sent requests
        fail (their fate is unknown) and unsent frames are discarded; requests
        not yet encoded stay queued for the new connection.
        """
        sent = [r for r in self._requests.values() if r.sent]
        self._frames.clear()
        self._cancels = []
        self._ping_at = None
        self._last_heard = self.clock()
        error = f"lost the connection to {self.peer} ({why}); the job's fate is unknown"
        for request in sent:
            self._drop(request)
            request._finish(error=UnavailableError(error))

    # -- time ------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work (on the core's clock); None when idle."""
        best = self._deadlines.earliest(self._requests)
        if self._requests:
            since = self._last_heard if self._ping_at is None else self._ping_at
            best = since + self.heartbeat if best is None else min(best, since + self.heartbeat)
        return best

    def tick(self) -> None:
        """Fail requests past their deadline; ping a silent broker, give up on a mute one."""
        now = self.clock()
        for rid in self._deadlines.due(now):
            request = self._requests.get(rid)
            if request is not None:
                self._expire(request)
        if not self._requests:
            self._ping_at = None
        elif self._ping_at is None:
            if now - self._last_heard >= self.heartbeat:
                self._ping_at = now
                ping = next(self._ids)  # no Request: its reply only proves the broker alive
                self._controls[ping] = wire.Control(id=ping, cmd="ping")
        elif now - self._ping_at >= self.heartbeat:
            silence = now - self._last_heard
            self._ping_at = None
            self._fail(
                list(self._requests.values()),
                lambda: UnavailableError(
                    f"no reply from {self.peer} for {silence:.1f}s, not even to a ping; "
                    "is it running?"
                ),
            )

    def _expire(self, request: Request) -> None:
        assert request.timeout is not None
        self._drop(request, cancel=True)
        request._finish(
            error=UnavailableError(
                f"no reply from {self.peer} within {request.timeout + self.grace:g}s "
                f"(the {request.kind.value}'s timeout of {request.timeout:g}s "
                f"+ {self.grace:g}s grace)"
                + ("" if request.kind is Kind.CONTROL else "; it was cancelled")
            )
        )

    # -- bookkeeping -----------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float | None:
        if self.closed:
            raise UnavailableError("the client is closed")
        return self.timeout if timeout is None else _check_timeout(timeout)

    def _register(self, kind: Kind, timeout: float | None) -> Request:
        requests = self._requests
        if not requests:
            self._last_heard = self.clock()  # silence counts from when we start waiting
            self._ping_at = None
        rid = next(self._ids)
        deadline = None
        if timeout is not None:
            deadline = self.clock() + timeout + self.grace
            self._deadlines.add(timeout, deadline, rid, requests)
        request = requests[rid] = Request(rid, kind, timeout, deadline)
        return request

    def _drop(self, request: Request, cancel: bool = False) -> None:
        """Forget a request; with ``cancel``, tell the broker too if the job went out."""
        del self._requests[request.id]
        if request.kind is _CONTROL:
            self._controls.pop(request.id, None)  # a command cannot be cancelled once sent
        elif self._jobs.pop(request.id, None) is None and cancel:
            self._cancels.append(request.id)

    def _fail(self, requests: list[Request], error: Callable[[], ShardpoolError]) -> None:
        for request in requests:  # one exception object each: they are raised separately
            self._drop(request, cancel=True)
            request._finish(error=error())


class MapWindow:
    """The order and flow rules of ``map``: at most ``window`` jobs submitted and not yet taken.

    The window is topped up only when the oldest job is not ready yet, so
    the freed slots go out together in one message rather than one by one.
    """

    def __init__(
        self,
        core: ClientCore,
        items: Iterable[Body],
        window: int,
        timeout: float | None,
        return_exceptions: bool,
    ) -> None:
        if window < 1:
            raise ConfigError("window must be at least 1")
        _check_timeout(timeout)
        self._core = core
        self._items: Iterator[Body] | None = iter(items)
        self._window = window
        self._timeout = timeout
        self._return_exceptions = return_exceptions
        self._pending: collections.deque[Request] = collections.deque()

    def head(self) -> Request | None:
        """The oldest job to wait for (after topping up the window); None at the end."""
        pending = self._pending
        if not (pending and pending[0].ready):
            self._fill()
        return pending[0] if pending else None

    def _fill(self) -> None:
        while self._items is not None and len(self._pending) < self._window:
            try:
                item = next(self._items)
            except StopIteration:
                self._items = None
                break
            try:
                request = self._core.submit(to_payload(item), timeout=self._timeout)
            except BadRequestError as exc:  # refused locally: fails in its place in the order
                request = self._core.failed(exc)
            self._pending.append(request)

    def pop(self) -> Payload | ShardpoolError:
        """The oldest job's result (it must be ready): its error raised, or returned if asked."""
        request = self._pending.popleft()
        try:
            return request.result()
        except ShardpoolError as exc:
            if self._return_exceptions:
                return exc
            raise

    def close(self) -> None:
        """Cancel the jobs not taken yet (the caller left early or an error was raised)."""
        self._items = None
        while self._pending:
            self._core.cancel(self._pending.popleft())
