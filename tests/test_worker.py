"""One PHP worker, over pipes, TCP and a unix socket: jobs, errors, streams, ending.

Every test starts real PHP workers from ``workers/`` and checks what a user of
:class:`~shardpool.worker.worker.Worker` sees: replies, typed errors, the
worker's state, its process. Tests are bounded in time and wait on futures,
never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import psutil
import pytest
from conftest import RELAYS, async_test, php

from shardpool.errors import (
    AllocateError,
    EmptyPayloadError,
    ExecTTLError,
    ProtocolError,
    ShardpoolError,
    SoftJobError,
    WorkerCrashedError,
    WorkerStoppedError,
)
from shardpool.ipc import Factory, factory_for
from shardpool.ipc import socket as socket_relay
from shardpool.payload import Payload
from shardpool.protocol import (
    CODEC_RAW,
    ERROR,
    PING,
    PONG,
    STOP,
    STREAM,
    Frame,
    FrameDecoder,
    encode_control,
    encode_frame,
    encode_job,
)
from shardpool.worker.process import PhpProcess, exit_fd
from shardpool.worker.state import WorkerState
from shardpool.worker.worker import FrameProtocol, Worker, jittered

SOCKET_RELAYS = pytest.mark.parametrize("relay", RELAYS[1:], ids=["tcp", "unix"])
SPAWN_TIMEOUT = 10.0
WAIT = 5.0  # bound for awaiting a worker's end

# ---------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def relay_factory(relay: str) -> AsyncIterator[Factory]:
    """``factory_for(relay)``, closed at the end whatever happens."""
    factory = factory_for(relay)
    try:
        yield factory
    finally:
        await factory.close()


@contextlib.asynccontextmanager
async def spawned(
    factory: Factory,
    script: str,
    *,
    env: Mapping[str, str] | None = None,
    max_jobs: int = 0,
) -> AsyncIterator[Worker]:
    """A worker running ``workers/<script>``, stopped (or reaped) at the end."""
    worker = await factory.spawn(php(script), timeout=SPAWN_TIMEOUT, env=env, max_jobs=max_jobs)
    try:
        yield worker
    finally:
        await worker.stop(timeout=WAIT)


async def ended(worker: Worker) -> ShardpoolError | None:
    """Wait (bounded) for the worker to be gone; return why it ended."""
    return await asyncio.wait_for(asyncio.shield(worker.done), WAIT)


class Tap:
    """Watches, beside the worker, the frames its PHP process sends and the
    control/stream frames shardpool writes back (PONG, STOP; not job frames).

    Only observes: every byte still goes to the worker unchanged.
    """

    def __init__(self, worker: Worker) -> None:
        self.received: list[Frame] = []
        self.written: list[Frame] = []
        self._decoder = FrameDecoder()
        self._watches: list[tuple[Callable[[Frame], bool], asyncio.Future[Frame]]] = []
        feed, write = worker.feed, worker._write

        def tapped_feed(data: bytes) -> None:
            feed(data)
            for frame in self._decoder.feed(data):
                self.received.append(frame)
                for predicate, seen in self._watches:
                    if not seen.done() and predicate(frame):
                        seen.set_result(frame)

        def tapped_write(data: bytes) -> None:
            write(data)
            self.written.extend(FrameDecoder().feed(data))

        worker.feed = tapped_feed  # type: ignore[method-assign]
        worker._write = tapped_write  # type: ignore[method-assign]
        # The transport calls the feed it was given when attached: give it the tap.
        assert worker._reader is not None
        worker._reader.set_protocol(FrameProtocol(worker))

    async def receives(self, predicate: Callable[[Frame], bool], timeout: float = WAIT) -> Frame:
        """The first frame from the worker that matches ``predicate``."""
        for frame in self.received:
            if predicate(frame):
                return frame
        seen: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._watches.append((predicate, seen))
        return await asyncio.wait_for(seen, timeout)


def last_frame_of_stream(body: bytes) -> Callable[[Frame], bool]:
    return lambda frame: not frame.stream & STREAM and frame.payload.endswith(body)


# ---------------------------------------------------------------- echo


@async_test(timeout=10)
async def test_echo_returns_body_and_context(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        reply = await worker.exec(Payload(b"hello", b'{"user": 7}'))
        assert reply.body == b"hello"
        assert reply.context == b'{"user": 7}'


@async_test(timeout=10)
async def test_worker_is_ready_after_spawn_with_the_php_pid(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "pid.php") as worker:
        assert worker.state is WorkerState.READY
        reply = await worker.exec(Payload(b"who"))
        assert int(reply.body) == worker.pid == worker.process.pid


@async_test(timeout=10)
async def test_echo_of_a_64_kib_body(relay: str) -> None:
    body = os.urandom(64 * 1024)
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        reply = await worker.exec(Payload(body, b"ctx"))
        assert reply.body == body
        assert reply.context == b"ctx"


@async_test(timeout=20)
async def test_echo_of_more_distinct_sizes_than_php_caches_headers_for(relay: str) -> None:
    # The PHP library caches 1024 headers each way, then starts over: every
    # size must still come back whole, before and after the cache is cleared.
    jobs = [Payload(b"b" * n, b"c" * (n % 5)) for n in range(1, 1300)]
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        for payload in jobs + jobs[:50]:
            reply = await worker.exec(payload)
            assert (reply.body, reply.context) == (payload.body, payload.context)


def test_php_refuses_a_corrupt_header_after_the_same_header_intact() -> None:
    # Checked headers are cached by their bytes: a corrupt one is not a hit.
    good = encode_job(b"x" * 16)
    bad = bytearray(good)
    bad[7] ^= 0xFF  # a CRC byte
    done = subprocess.run(
        php("echo.php"), input=good + good + bytes(bad), capture_output=True, timeout=WAIT
    )
    assert done.returncode != 0
    assert b"header CRC mismatch" in done.stderr
    assert done.stdout.count(b"x" * 16) == 2


@async_test(timeout=20)
async def test_echo_of_an_8_mib_body(relay: str) -> None:
    body = os.urandom(8 * 1024 * 1024)
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        reply = await worker.exec(Payload(body, b"ctx"))
        assert len(reply.body) == len(body)
        assert reply.body == body
        assert reply.context == b"ctx"


@async_test(timeout=10)
async def test_context_only_payload_round_trips(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        reply = await worker.exec(Payload(context=b'{"only": "context"}'))
        assert reply.body == b""
        assert reply.context == b'{"only": "context"}'


@async_test(timeout=10)
async def test_body_only_payload_round_trips(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        reply = await worker.exec(Payload(b"only body"))
        assert reply.body == b"only body"
        assert reply.context == b""


@async_test(timeout=10)
async def test_empty_payload_raises_and_worker_serves_the_next_job(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        with pytest.raises(EmptyPayloadError):
            await worker.exec(Payload())
        assert worker.state is WorkerState.READY
        reply = await worker.exec(Payload(b"next"))
        assert reply.body == b"next"


# ---------------------------------------------------------------- soft errors, stop requests


@async_test(timeout=10)
async def test_soft_error_keeps_worker_ready(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "error.php") as worker:
        with pytest.raises(SoftJobError) as caught:
            await worker.exec(Payload(b"bad input"))
        assert str(caught.value) == "soft error: bad input"
        assert worker.state is WorkerState.READY
        assert worker.alive


@async_test(timeout=10)
async def test_soft_error_worker_serves_the_next_job(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "commands.php") as worker:
        with pytest.raises(SoftJobError, match=r"^nope$"):
            await worker.exec(Payload(b"error:nope"))
        reply = await worker.exec(Payload(b"echo:fine"))
        assert reply.body == b"fine"
        assert worker.state is WorkerState.READY


@async_test(timeout=10)
async def test_stop_request_raises_worker_stopped_and_invalidates_worker(relay: str) -> None:
    env = {"SHARDPOOL_STOP_AFTER": "1"}
    async with (
        relay_factory(relay) as factory,
        spawned(factory, "stop_after.php", env=env) as worker,
    ):
        assert (await worker.exec(Payload(b"served"))).body == b"served"
        with pytest.raises(WorkerStoppedError):
            await worker.exec(Payload(b"replace me"))
        assert worker.state is WorkerState.INVALID


@async_test(timeout=10)
async def test_exec_after_stop_request_raises(relay: str) -> None:
    env = {"SHARDPOOL_STOP_AFTER": "0"}
    async with (
        relay_factory(relay) as factory,
        spawned(factory, "stop_after.php", env=env) as worker,
    ):
        with pytest.raises(WorkerStoppedError):
            await worker.exec(Payload(b"first"))
        with pytest.raises(ShardpoolError, match="takes no jobs"):
            await worker.exec(Payload(b"second"))


# ---------------------------------------------------------------- dying, timing out


@async_test(timeout=10)
async def test_crash_mid_job_reports_exit_status_and_stderr(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "crash.php") as worker:
        with pytest.raises(WorkerCrashedError) as caught:
            await worker.exec(Payload(b"job"))
        message = str(caught.value)
        assert "exited with status 3" in message
        assert "crash.php dying on purpose" in message


@pytest.fixture
def no_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    """A system without pidfds (Linux before 5.3, macOS, some sandboxes)."""

    def unsupported(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", unsupported)


def test_exit_fd_without_pidfds_turns_readable_when_the_process_exits(no_pidfd: None) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(7)"],
                             stdin=subprocess.PIPE)  # fmt: skip
    fd = exit_fd(child)
    try:
        assert select.select([fd], [], [], 0.1)[0] == []  # still running
        assert child.stdin is not None
        child.stdin.close()  # now it exits
        assert select.select([fd], [], [], 10)[0] == [fd]
        assert child.poll() == 7
    finally:
        os.close(fd)


@async_test(timeout=10)
async def test_crash_is_seen_without_pidfds(relay: str, no_pidfd: None) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "crash.php") as worker:
        with pytest.raises(WorkerCrashedError, match="exited with status 3"):
            await worker.exec(Payload(b"job"))
        assert isinstance(await ended(worker), WorkerCrashedError)
        assert worker.process.returncode == 3


@async_test(timeout=10)
async def test_crash_mid_job_resolves_done_and_errors_the_worker(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "crash.php") as worker:
        with pytest.raises(WorkerCrashedError):
            await worker.exec(Payload(b"job"))
        reason = await ended(worker)
        assert isinstance(reason, WorkerCrashedError)
        assert worker.state is WorkerState.ERRORED
        assert worker.process.returncode == 3
        assert not worker.alive


@async_test(timeout=10)
async def test_exec_after_crash_raises_worker_crashed(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "crash.php") as worker:
        with pytest.raises(WorkerCrashedError):
            await worker.exec(Payload(b"job"))
        await ended(worker)
        with pytest.raises(WorkerCrashedError, match="status 3"):
            await worker.exec(Payload(b"again"))


@async_test(timeout=10)
async def test_exec_timeout_raises_and_kills_the_worker(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "slow.php") as worker:
        with pytest.raises(ExecTTLError, match=r"0\.3s"):
            await worker.exec(Payload(b"5000"), timeout=0.3)
        await ended(worker)
        assert worker.process.returncode == -signal.SIGKILL
        assert worker.state in (WorkerState.EXEC_TTL_REACHED, WorkerState.STOPPED)


@async_test(timeout=10)
async def test_a_short_exec_ttl_behind_a_long_one_still_fires_on_time(relay: str) -> None:
    """Pipelined: the second job's TTL is far shorter than the first's. It must
    still be killed at its own TTL, counted from when PHP started it."""
    async with relay_factory(relay) as factory, spawned(factory, "slow.php") as worker:
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(worker.exec(Payload(b"100"), timeout=30.0))
        second = asyncio.create_task(worker.exec(Payload(b"5000"), timeout=0.3))
        assert (await first).body == b"100"
        started = loop.time()
        with pytest.raises(ExecTTLError, match=r"0\.3s"):
            await second
        assert 0.2 <= loop.time() - started < 2.0
        await ended(worker)


@async_test(timeout=10)
async def test_a_long_exec_ttl_behind_a_short_one_is_not_cut_short(relay: str) -> None:
    """Pipelined: the first job's short TTL ends while the second job runs; the
    second, with a longer TTL of its own, is answered."""
    async with relay_factory(relay) as factory, spawned(factory, "slow.php") as worker:
        first = asyncio.create_task(worker.exec(Payload(b"10"), timeout=0.2))
        second = asyncio.create_task(worker.exec(Payload(b"600"), timeout=5.0))
        assert (await first).body == b"10"
        assert (await second).body == b"600"
        assert worker.state is WorkerState.READY


@async_test(timeout=10)
async def test_exec_within_timeout_is_answered(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "slow.php") as worker:
        reply = await worker.exec(Payload(b"10"), timeout=5.0)
        assert reply.body == b"10"
        assert worker.state is WorkerState.READY


# ---------------------------------------------------------------- streaming


@async_test(timeout=10)
async def test_stream_yields_every_chunk_in_order_then_end(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "stream.php") as worker:
        bodies = [chunk.body async for chunk in worker.stream(Payload(b"5"))]
        assert bodies == [b"chunk 0", b"chunk 1", b"chunk 2", b"chunk 3", b"chunk 4", b"end"]
        assert worker.state is WorkerState.READY


@async_test(timeout=15)
async def test_long_stream_arrives_whole_and_in_order(relay: str) -> None:
    # 2000 small chunks arrive many per read: more than the reader queues before pausing.
    async with relay_factory(relay) as factory, spawned(factory, "stream.php") as worker:
        bodies = [chunk.body async for chunk in worker.stream(Payload(b"2000"))]
        assert bodies == [f"chunk {i}".encode() for i in range(2000)] + [b"end"]
        assert (await worker.exec(Payload(b"1"))).body == b"chunk 0end"


@async_test(timeout=10)
async def test_breaking_out_of_a_stream_sends_stop_and_worker_ends_with_stopped(relay: str) -> None:
    env = {"SHARDPOOL_CHUNK_DELAY_MS": "50"}
    async with relay_factory(relay) as factory, spawned(factory, "stream.php", env=env) as worker:
        tap = Tap(worker)
        seen = []
        async for chunk in worker.stream(Payload(b"1000")):
            seen.append(chunk.body)
            if len(seen) == 2:
                break
        assert seen == [b"chunk 0", b"chunk 1"]
        last = await tap.receives(last_frame_of_stream(b"stopped"))
        assert last.payload == b"stopped"
        assert any(frame.stream & STOP for frame in tap.written)
        assert worker.state is WorkerState.READY


@async_test(timeout=10)
async def test_closing_a_stream_early_leaves_the_worker_ready(relay: str) -> None:
    env = {"SHARDPOOL_CHUNK_DELAY_MS": "50"}
    async with relay_factory(relay) as factory, spawned(factory, "stream.php", env=env) as worker:
        async with contextlib.aclosing(worker.stream(Payload(b"1000"))) as chunks:
            async for _ in chunks:
                break
        assert worker.state is WorkerState.READY
        assert worker.in_flight == 0
        reply = await worker.exec(Payload(b"2"))
        assert reply.body == b"chunk 0chunk 1end"


@async_test(timeout=10)
async def test_stream_ping_is_answered_with_pong(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "stream.php") as worker:
        tap = Tap(worker)
        bodies = [c.body async for c in worker.stream(Payload(b"3", b"ping"))]
        assert bodies == [b"chunk 0", b"chunk 1", b"chunk 2", b"end"]
        pings = [f for f in tap.received if f.stream & PING]
        pongs = [f for f in tap.written if f.stream & PONG]
        assert len(pings) == 3
        assert len(pongs) == 3
        assert (await worker.exec(Payload(b"1"))).body == b"chunk 0end"


@async_test(timeout=10)
async def test_exec_on_a_streamed_reply_returns_the_joined_body(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "stream.php") as worker:
        reply = await worker.exec(Payload(b"3"))
        assert reply.body == b"chunk 0chunk 1chunk 2end"
        assert worker.state is WorkerState.READY


# ---------------------------------------------------------------- stop, kill


@async_test(timeout=10)
async def test_graceful_stop_exits_zero_and_marks_stopped(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        await worker.stop(timeout=WAIT)
        assert worker.process.returncode == 0
        assert worker.state is WorkerState.STOPPED
        assert await ended(worker) is None


@async_test(timeout=10)
async def test_jobs_written_before_stop_get_their_replies(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        # gather starts the tasks in order: both jobs are written before the stop command.
        first, second, _ = await asyncio.gather(
            worker.exec(Payload(b"one")), worker.exec(Payload(b"two")), worker.stop(timeout=WAIT)
        )
        assert (first.body, second.body) == (b"one", b"two")
        assert worker.process.returncode == 0
        assert worker.state is WorkerState.STOPPED


@async_test(timeout=10)
async def test_exec_after_graceful_stop_raises(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        await worker.stop(timeout=WAIT)
        with pytest.raises(WorkerCrashedError, match="stopped"):
            await worker.exec(Payload(b"too late"))


@async_test(timeout=10)
async def test_kill_fails_the_job_in_flight_with_sigkill(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "slow.php") as worker:

        async def kill() -> None:
            worker.kill()

        job, _ = await asyncio.gather(worker.exec(Payload(b"5000")), kill(), return_exceptions=True)
        assert isinstance(job, WorkerCrashedError)
        assert "SIGKILL" in str(job)
        await ended(worker)
        assert worker.process.returncode == -signal.SIGKILL


# ---------------------------------------------------------------- pipelining


@async_test(timeout=10)
async def test_pipelined_jobs_are_answered_in_order_exactly_once(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        bodies = [f"job {i}".encode() for i in range(50)]
        replies = await asyncio.gather(
            *(worker.exec(Payload(b, b"c%d" % i)) for i, b in enumerate(bodies))
        )
        assert [r.body for r in replies] == bodies
        assert [r.context for r in replies] == [b"c%d" % i for i in range(50)]
        assert worker.jobs_done == 50
        assert worker.in_flight == 0
        assert worker.state is WorkerState.READY


@async_test(timeout=10)
async def test_replies_arriving_in_one_read_each_reach_their_own_caller(relay: str) -> None:
    """A pipelined worker's replies often arrive several to a read, mixed in kind
    and the last one cut: each caller still gets exactly its own answer.

    The bytes are handed to the worker as its channel would (``feed``) while
    its PHP process sleeps: only that way is the split between reads exact."""
    async with relay_factory(relay) as factory, spawned(factory, "slow.php") as worker:
        tasks = [asyncio.create_task(worker.exec(Payload(b"30000"))) for _ in range(5)]
        await asyncio.sleep(0)  # each exec writes its job on its first step
        assert worker.in_flight == 5
        last = encode_job(b"e" * 100)
        worker.feed(
            encode_job(b"a")
            + encode_job(b"b", b"ctx")
            + encode_frame(b"oops", CODEC_RAW | ERROR)
            + encode_job(b"d")
            + last[:20]
        )
        worker.feed(last[20:])
        a, b, oops, d, e = await asyncio.gather(*tasks, return_exceptions=True)
        assert (a.body, a.context) == (b"a", b"")
        assert (b.body, b.context) == (b"b", b"ctx")
        assert isinstance(oops, SoftJobError) and str(oops) == "oops"
        assert (d.body, e.body) == (b"d", b"e" * 100)
        assert (worker.in_flight, worker.jobs_done) == (0, 5)
        worker.kill()


@async_test(timeout=10)
async def test_a_stream_ending_while_its_reader_is_paused_leaves_the_worker_reading(
    relay: str,
) -> None:
    """A consumer that does not keep up pauses reading from the worker. When the
    stream's last frame came in the same read, the job ends with reading paused:
    the worker must read again, or the next job's reply is never seen (it then
    looked like a job hanging until its exec TTL)."""
    async with relay_factory(relay) as factory, spawned(factory, "slow.php") as worker:
        stream = worker.stream(Payload(b"30000"))  # PHP sleeps; we play its part below
        consumer = asyncio.create_task(anext(stream))
        await asyncio.sleep(0)  # the stream's first step writes the job
        assert worker.in_flight == 1
        chunk = encode_frame(b"chunk", CODEC_RAW, (0,), STREAM)
        worker.feed(chunk * 100 + encode_job(b"end"))  # far past the high-water mark
        assert (worker.in_flight, worker.state) == (0, WorkerState.READY)
        assert worker._reader is not None and worker._reader.is_reading()
        assert (await consumer).body == b"chunk"
        await stream.aclose()
        worker.kill()


@async_test(timeout=10)
async def test_crash_fails_the_running_job_started_and_queued_jobs_not_started(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "commands.php") as worker:
        results = await asyncio.gather(
            worker.exec(Payload(b"crash:3")),
            *(worker.exec(Payload(b"echo:%d" % i)) for i in range(4)),
            return_exceptions=True,
        )
        assert all(isinstance(r, WorkerCrashedError) for r in results), results
        crashed, *queued = results
        assert crashed.job_started is True
        assert "exited with status 3" in str(crashed)
        assert [q.job_started for q in queued] == [False] * 4


# ---------------------------------------------------------------- boot failures


@async_test(timeout=10)
async def test_missing_command_fails_allocate_naming_it(relay: str) -> None:
    async with relay_factory(relay) as factory:
        with pytest.raises(AllocateError, match="no-such-php-binary"):
            await factory.spawn(["/nonexistent/no-such-php-binary", "x.php"], timeout=SPAWN_TIMEOUT)


@async_test(timeout=10)
async def test_missing_php_file_fails_allocate_with_phps_message(relay: str) -> None:
    async with relay_factory(relay) as factory:
        with pytest.raises(AllocateError) as caught:
            await factory.spawn(php("no_such_worker.php"), timeout=SPAWN_TIMEOUT)
        assert "Could not open input file" in str(caught.value)
        assert "no_such_worker.php" in str(caught.value)


@async_test(timeout=10)
async def test_fatal_error_at_boot_fails_allocate_with_phps_message(relay: str) -> None:
    async with relay_factory(relay) as factory:
        with pytest.raises(AllocateError, match="Call to undefined function"):
            await factory.spawn(php("failboot.php"), timeout=SPAWN_TIMEOUT)


@async_test(timeout=10)
async def test_stdout_at_boot_over_pipes_is_a_protocol_error_showing_the_text() -> None:
    async with relay_factory("pipes") as factory:
        with pytest.raises(ProtocolError) as caught:
            await factory.spawn(php("stdout_boot.php"), timeout=SPAWN_TIMEOUT)
        assert "hello from boot" in str(caught.value)
        assert "STDERR" in str(caught.value)


@SOCKET_RELAYS
@async_test(timeout=10)
async def test_stdout_at_boot_over_a_socket_is_logged_and_harmless(
    relay: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shardpool.worker")
    async with relay_factory(relay) as factory, spawned(factory, "stdout_boot.php") as worker:
        assert (await worker.exec(Payload(b"fine"))).body == b"fine"
        pid = worker.pid
    lines = [r.getMessage() for r in caplog.records if r.name == "shardpool.worker"]
    assert any(str(pid) in line and "hello from boot" in line for line in lines), lines


@async_test(timeout=10)
async def test_stdout_mid_run_over_pipes_is_a_protocol_error_showing_the_text() -> None:
    async with relay_factory("pipes") as factory, spawned(factory, "commands.php") as worker:
        with pytest.raises(ProtocolError) as caught:
            await worker.exec(Payload(b"print:oops"))
        assert "oops" in str(caught.value)
        assert "STDERR" in str(caught.value)
        await ended(worker)
        assert not worker.alive


# ---------------------------------------------------------------- socket relays


def _connect(relay: str) -> Any:
    scheme, _, rest = relay.partition("://")
    if scheme == "unix":
        return asyncio.open_unix_connection(rest)
    host, _, port = rest.rpartition(":")
    return asyncio.open_connection(host.strip("[]"), int(port))


@SOCKET_RELAYS
@async_test(timeout=10)
async def test_connection_from_an_unspawned_process_is_dropped(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        reader, writer = await _connect(factory.relay)
        try:
            hello = FrameDecoder()
            frames: list[Frame] = []
            while not frames:
                frames = hello.feed(await asyncio.wait_for(reader.read(4096), WAIT))
            # A valid handshake reply, but not from a pid this factory spawned.
            writer.write(encode_control(b'{"pid": 999999}'))
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed by the server
        finally:
            writer.close()
        reply = await worker.exec(Payload(b"undisturbed"))
        assert reply.body == b"undisturbed"
        assert worker.state is WorkerState.READY


@SOCKET_RELAYS
@async_test(timeout=10)
async def test_a_worker_that_answers_before_its_spawn_knows_its_pid_is_paired(
    relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a loaded machine the worker can dial in and answer the handshake
    # before the spawn has got its pid back: force that order.
    answered = asyncio.Event()
    parse_pid = socket_relay.parse_pid_reply

    def parse_and_tell(frame: Frame) -> int:
        answered.set()
        return parse_pid(frame)

    spawn = PhpProcess.spawn

    async def spawn_late(*args: Any, **kwargs: Any) -> PhpProcess:
        process = await spawn(*args, **kwargs)
        await asyncio.wait_for(answered.wait(), WAIT)  # its handshake reply was read first
        return process

    monkeypatch.setattr(socket_relay, "parse_pid_reply", parse_and_tell)
    monkeypatch.setattr(PhpProcess, "spawn", spawn_late)
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        assert (await worker.exec(Payload(b"paired"))).body == b"paired"
        assert worker.state is WorkerState.READY


@async_test(timeout=10)
async def test_worker_env_has_rr_relay_set_to_the_real_address(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php") as worker:
        # The PHP library has no worker that reports its env: read it from the process.
        env = psutil.Process(worker.pid).environ()
        assert env["RR_RELAY"] == factory.relay
        if relay.startswith("tcp://"):
            port = int(factory.relay.rpartition(":")[2])
            assert port != 0
            assert env["RR_RELAY"] == f"tcp://127.0.0.1:{port}"
        elif relay == "pipes":
            assert env["RR_RELAY"] == "pipes"
        else:
            assert env["RR_RELAY"].startswith("unix:///")


# ---------------------------------------------------------------- RoadRunner compatibility


@async_test(timeout=10)
async def test_rr_compat_worker_echoes(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "rr_compat.php") as worker:
        reply = await worker.exec(Payload(b"body", b"context"))
        assert (reply.body, reply.context) == (b"body", b"context")
        assert worker.state is WorkerState.READY


@async_test(timeout=10)
async def test_rr_compat_worker_soft_error_text(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "rr_compat.php") as worker:
        with pytest.raises(SoftJobError, match=r"^rr error$"):
            await worker.exec(Payload(b"error"))
        assert worker.state is WorkerState.READY
        assert (await worker.exec(Payload(b"after"))).body == b"after"


@async_test(timeout=10)
async def test_rr_compat_worker_stop_request(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "rr_compat.php") as worker:
        with pytest.raises(WorkerStoppedError):
            await worker.exec(Payload(b"stop"))
        assert worker.state is WorkerState.INVALID


# ---------------------------------------------------------------- max_jobs


@async_test(timeout=10)
async def test_max_jobs_of_3_has_no_room_for_jitter(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php", max_jobs=3) as worker:
        assert worker.max_jobs == 3


@async_test(timeout=10)
async def test_max_jobs_is_jittered_up_to_15_percent(relay: str) -> None:
    async with (
        relay_factory(relay) as factory,
        spawned(factory, "echo.php", max_jobs=100) as worker,
    ):
        assert 100 <= worker.max_jobs <= 115


def test_jitter_stays_within_0_to_15_percent() -> None:
    draws = {jittered(100) for _ in range(2000)}
    assert min(draws) >= 100
    assert max(draws) <= 115
    assert len(draws) > 1  # it does spread
    assert jittered(0) == 0


@async_test(timeout=10)
async def test_worker_is_marked_max_jobs_reached_after_max_jobs(relay: str) -> None:
    async with relay_factory(relay) as factory, spawned(factory, "echo.php", max_jobs=3) as worker:
        for i in range(2):
            await worker.exec(Payload(b"%d" % i))
            assert worker.state is WorkerState.READY
        await worker.exec(Payload(b"2"))
        assert worker.state is WorkerState.MAX_JOBS_REACHED


# ---------------------------------------------------------------- logging


@async_test(timeout=10)
async def test_worker_stderr_lines_are_logged_with_the_pid(
    relay: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shardpool.worker")
    async with relay_factory(relay) as factory, spawned(factory, "crash.php") as worker:
        with pytest.raises(WorkerCrashedError):
            await worker.exec(Payload(b"job"))
        await ended(worker)
    lines = [r.getMessage() for r in caplog.records if r.name == "shardpool.worker"]
    assert any(
        str(worker.pid) in line and "crash.php dying on purpose" in line for line in lines
    ), lines
