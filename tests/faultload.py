"""Steady load for the fault tests: raw protocol clients that count every reply.

The bundled clients ignore a reply whose request is no longer in flight, so
they would hide a duplicate. These clients speak docs/protocol.md directly on
a DEALER socket and keep *every* reply per request id: a test can then say
that each request got exactly one terminal reply, and that each echo reply
carries the request's own token (no reply went to the wrong request).
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psutil
import zmq

from shardpool.errors import ErrorCode

KNOWN_CODES = {code.value for code in ErrorCode}


@dataclass
class Sent:
    body: bytes
    stream: bool
    kind: str  # "echo", "stream" or the fault's own label
    at: float


@dataclass
class Summary:
    requests: int = 0
    results: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    misrouted: list[int] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def add(self, other: Summary) -> None:
        self.requests += other.requests
        self.results += other.results
        self.errors.update(other.errors)
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.misrouted += other.misrouted
        self.unexpected += other.unexpected


class LoadClient(threading.Thread):
    """One client: keeps ``window`` jobs in flight at about ``rate`` jobs/s.

    Every ``stream_every``-th job is a short stream. ``inject`` sends one
    extra job (a fault's body) from this client's socket.
    """

    def __init__(
        self,
        address: str,
        name: str,
        *,
        window: int = 16,
        rate: float = 400.0,
        stream_every: int = 10,
        job_timeout: float = 10.0,
    ) -> None:
        super().__init__(name=f"load-{name}", daemon=True)
        self.address = address
        self.label = name
        self.window = window
        self.rate = rate
        self.stream_every = stream_every
        self.job_timeout = job_timeout
        self.sent: dict[int, Sent] = {}
        self.replies: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
        self.terminal: set[int] = set()
        self.answered_at: dict[int, float] = {}
        self.bad_frames: list[bytes] = []
        self._ids = itertools.count(1)
        self._inject: queue.Queue[tuple[bytes, bool, str, float | None, threading.Event]] = (
            queue.Queue()
        )
        self._stop_sending = threading.Event()
        self._quit = threading.Event()
        self._drain_until = 0.0
        self.injected: dict[str, list[int]] = collections.defaultdict(list)
        self.error: BaseException | None = None
        self.progress = threading.Condition()

    # -- control from the test thread -------------------------------------------

    def inject(
        self, body: bytes, kind: str, *, stream: bool = False, timeout: float | None = None
    ) -> None:
        """Send one extra job from this client; returns once it left.

        ``timeout`` 0 sends the job without a deadline (the pool's limits apply).
        """
        done = threading.Event()
        self._inject.put((body, stream, kind, timeout, done))
        assert done.wait(5), "the load client did not send an injected job"

    def answered(self) -> int:
        return len(self.terminal)

    def wait_answered(self, count: int, timeout: float = 10.0) -> None:
        """Block until this client has ``count`` terminal replies (bounded).

        A failure says whether this client's own thread failed, or how long
        its oldest unanswered jobs have waited, and of which kind they are.
        """
        with self.progress:
            done = self.progress.wait_for(
                lambda: len(self.terminal) >= count or self.error is not None, timeout
            )
        if self.error is not None:
            raise AssertionError(f"{self.label}: the load client failed") from self.error
        if not done:
            now = time.monotonic()
            waiting = sorted(self.outstanding(), key=lambda rid: self.sent[rid].at)[:5]
            oldest = ", ".join(
                f"#{rid} {self.sent[rid].kind} {now - self.sent[rid].at:.1f} s" for rid in waiting
            )
            raise AssertionError(
                f"{self.label}: only {len(self.terminal)} of {count} answered in {timeout}s; "
                f"{len(self.outstanding())} unanswered, oldest: {oldest}"
            )

    def stop_sending(self, drain: float = 15.0) -> None:
        """Send no more new jobs; keep reading replies for up to ``drain`` seconds."""
        self._drain_until = time.monotonic() + drain
        self._stop_sending.set()

    def finish(self, drain: float = 15.0) -> None:
        """Stop sending; wait (bounded) for the replies still owed, then stop."""
        if not self._stop_sending.is_set():
            self.stop_sending(drain)
        self.join(drain + 5)
        assert not self.is_alive(), f"{self.label} did not stop"
        if self.error is not None:
            raise self.error

    def outstanding(self) -> set[int]:
        return set(self.sent) - self.terminal

    # -- the thread -------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by finish() and wait_answered()
            with self.progress:
                self.error = exc
                self.progress.notify_all()

    def _run(self) -> None:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(self.address)
        start = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                stopping = self._stop_sending.is_set()
                if stopping and (not self.outstanding() or now > self._drain_until):
                    return
                jobs = [] if stopping else self._new_jobs(now, start)
                injected, sent_events = self._injected(now)
                jobs += injected
                if jobs:
                    sock.send(msgspec.msgpack.encode({"t": "jobs", "jobs": jobs}))
                for event in sent_events:
                    event.set()
                if sock.poll(10):
                    while sock.poll(0):
                        self._receive(sock.recv_multipart())
        finally:
            sock.close(linger=0)

    def _new_jobs(self, now: float, start: float) -> list[dict[str, Any]]:
        jobs = []
        allowed = int((now - start) * self.rate) - len(self.sent)
        in_flight = len(self.sent) - len(self.terminal)
        for _ in range(max(0, min(allowed, self.window - in_flight))):
            rid = next(self._ids)
            if self.stream_every and rid % self.stream_every == 0:
                body, stream, kind = b"stream:3", True, "stream"
            else:
                body, stream, kind = f"echo:{self.label}-{rid}".encode(), False, "echo"
            jobs.append(self._job(rid, body, stream, kind, now, self.job_timeout))
        return jobs

    def _injected(self, now: float) -> tuple[list[dict[str, Any]], list[threading.Event]]:
        jobs, events = [], []
        while True:
            try:
                body, stream, kind, timeout, done = self._inject.get_nowait()
            except queue.Empty:
                return jobs, events
            rid = next(self._ids)
            jobs.append(
                self._job(
                    rid, body, stream, kind, now, self.job_timeout if timeout is None else timeout
                )
            )
            self.injected[kind].append(rid)
            events.append(done)

    def _job(
        self, rid: int, body: bytes, stream: bool, kind: str, now: float, timeout: float
    ) -> dict[str, Any]:
        self.sent[rid] = Sent(body, stream, kind, now)
        job: dict[str, Any] = {"id": rid, "body": body}
        if timeout:
            job["timeout"] = timeout
        if stream:
            job["stream"] = True
        return job

    def _receive(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            self.bad_frames.append(b"|".join(frames))
            return
        message = msgspec.msgpack.decode(frames[0])
        for reply in message.get("replies", []):
            rid = reply.get("id", 0)
            self.replies[rid].append(reply)
            if reply.get("code") or not reply.get("more"):
                with self.progress:
                    self.terminal.add(rid)
                    self.answered_at.setdefault(rid, time.monotonic())
                    self.progress.notify_all()

    # -- the verdict ------------------------------------------------------------

    def summary(self, allowed: dict[str, set[str]]) -> Summary:
        """Check every request: one terminal reply, its own token, an allowed error code.

        ``allowed`` maps a kind ("echo", "stream", a fault label) to the error
        codes that kind may get; ``"*"`` applies to every kind.
        """
        out = Summary(requests=len(self.sent))
        everywhere = allowed.get("*", set())
        for rid, sent in self.sent.items():
            replies = self.replies.get(rid, [])
            terminals = [i for i, r in enumerate(replies) if r.get("code") or not r.get("more")]
            if not terminals:
                out.lost.append(rid)
                continue
            if len(terminals) > 1 or terminals[0] != len(replies) - 1:
                out.duplicated.append(rid)
            last = replies[terminals[0]]
            code = last.get("code", "")
            if code:
                out.errors[code] += 1
                if (
                    code not in KNOWN_CODES
                    or code not in allowed.get(sent.kind, set()) | everywhere
                ):
                    out.unexpected.append(f"{sent.kind} #{rid}: {code}: {last.get('error')}")
                continue
            out.results += 1
            if sent.kind == "echo" and last.get("body") != sent.body[len(b"echo:") :]:
                out.misrouted.append(rid)
            if sent.kind == "stream":
                chunks = [r.get("body") for r in replies[:-1]]
                if chunks != [f"chunk {i}".encode() for i in range(len(chunks))] or (
                    last.get("body") != b"end"
                ):
                    out.misrouted.append(rid)
        strays = set(self.replies) - set(self.sent)
        out.unexpected += [f"reply for an id never sent: {rid}" for rid in sorted(strays)]
        out.unexpected += [f"a message of several frames: {f[:80]!r}" for f in self.bad_frames]
        return out


class Load:
    """Several :class:`LoadClient` threads against one service."""

    def __init__(self, address: str, clients: int = 3, **kwargs: Any) -> None:
        self.clients = [LoadClient(address, f"c{i}", **kwargs) for i in range(clients)]

    def __enter__(self) -> Load:
        for client in self.clients:
            client.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for client in self.clients:
            if client.is_alive():
                client._stop_sending.set()
                client._drain_until = 0.0
                client.join(5)

    def warm_up(self, per_client: int = 20, timeout: float = 10.0) -> None:
        """Wait until every client has had ``per_client`` replies: the load is flowing."""
        for client in self.clients:
            client.wait_answered(per_client, timeout)

    def more(self, per_client: int = 20, timeout: float = 10.0) -> None:
        """Wait for ``per_client`` more replies on every client."""
        for client in self.clients:
            client.wait_answered(client.answered() + per_client, timeout)

    def finish(self, allowed: dict[str, set[str]], drain: float = 15.0) -> Summary:
        total = Summary()
        for client in self.clients:
            client.stop_sending(drain)
        for client in self.clients:
            client.finish(drain)
        for client in self.clients:
            total.add(client.summary(allowed))
        return total


def assert_exactly_once(summary: Summary) -> None:
    """What issue 7 asks: nothing lost, nothing twice, nothing misrouted, typed errors only."""
    assert not summary.lost, f"{len(summary.lost)} requests got no reply: {summary.lost[:20]}"
    assert not summary.duplicated, f"requests answered twice: {summary.duplicated[:20]}"
    assert not summary.misrouted, f"replies to the wrong request: {summary.misrouted[:20]}"
    assert not summary.unexpected, "\n".join(summary.unexpected[:20])


def tree(pid: int) -> list[psutil.Process]:
    """A process and its live descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            pass
    return total
