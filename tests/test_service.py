"""``shardpool serve`` end to end: real broker, shard and PHP processes, real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
import pytest
import zmq
from conftest import ROOT, WORKERS, Service, free_port, shard_processes

from shardpool import wire
from shardpool.client import AsyncClient, Client
from shardpool.errors import (
    JobTimeoutError,
    ShardLostError,
    ShardpoolError,
    SoftJobError,
    UnavailableError,
    WorkerCrashedError,
)
from shardpool.payload import Payload

COMMANDS = str(WORKERS / "commands.php")


@pytest.fixture
def service(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Service]:
    args = getattr(request, "param", ("--shards", "2", "--workers", "2", "--worker", COMMANDS))
    svc = Service(tmp_path, *args)
    try:
        yield svc
    finally:
        svc.stop()
        _, alive = psutil.wait_procs(shard_processes(), timeout=10)
        assert not alive, f"shard processes outlived serve: {alive}"


def test_ten_thousand_jobs_through_two_shards_are_each_answered_once(service: Service) -> None:
    bodies = [f"echo:job {i}".encode() for i in range(10_000)]
    with Client(service.address, timeout=60) as client:
        replies = list(client.map(bodies, window=512))
        stats = client.stats()
    assert [r.body for r in replies] == [b[5:] for b in bodies]
    assert stats["jobs_done"] == 10_000
    assert len(stats["shards"]) == 2
    assert all(s["jobs_done"] > 0 for s in stats["shards"].values())


def test_map_unordered_yields_each_key_once_as_jobs_finish(service: Service) -> None:
    async def run() -> list[tuple[str, bytes | str]]:
        jobs = [("slow", b"sleep:400"), ("bad", b"error:nope")]
        jobs += [(f"k{i}", b"echo:%d" % i) for i in range(500)]
        out: list[tuple[str, bytes | str]] = []
        async with AsyncClient(service.address, timeout=30) as client:
            async for key, reply in client.map_unordered(jobs, window=64):
                out.append((key, reply.body if isinstance(reply, Payload) else reply.code.value))
        return out

    out = asyncio.run(run())
    assert sorted(k for k, _ in out) == sorted(["slow", "bad", *(f"k{i}" for i in range(500))])
    results = dict(out)
    assert results["slow"] == b"slept" and results["bad"] == "soft_job"
    assert all(results[f"k{i}"] == b"%d" % i for i in range(500))
    assert out.index(("slow", b"slept")) > 100  # it finished after jobs sent behind it


def test_workers_lists_every_shard_and_its_workers(service: Service) -> None:
    with Client(service.address, timeout=10) as client:
        data = client.workers()
    assert sorted(data) == ["shard-0", "shard-1"]
    for workers in data.values():
        assert len(workers) == 2
        assert {w["state"] for w in workers} <= {"ready", "working"}
        assert all(w["pid"] > 0 and w["memory"] > 0 for w in workers)


def test_soft_error_reaches_the_client_typed(service: Service) -> None:
    with Client(service.address, timeout=10) as client:
        with pytest.raises(SoftJobError, match="boom"):
            client.exec(b"error:boom")
        assert client.exec(b"echo:after").body == b"after"


def test_worker_killed_inside_a_shard_fails_its_job_and_is_replaced(service: Service) -> None:
    with Client(service.address, timeout=10) as client:
        with pytest.raises(WorkerCrashedError, match="status 7"):
            client.exec(b"crash:7")
        assert [r.body for r in client.map([b"echo:a", b"echo:b", b"echo:c"])] == [
            b"a",
            b"b",
            b"c",
        ]


def test_stream_chunks_come_through_the_broker(service: Service) -> None:
    with Client(service.address, timeout=10) as client:
        chunks = [c.body for c in client.stream(b"stream:4")]
    assert chunks == [b"chunk 0", b"chunk 1", b"chunk 2", b"chunk 3", b"end"]


def test_client_that_leaves_mid_stream_does_not_disturb_the_service(service: Service) -> None:
    with Client(service.address, timeout=10) as client:
        for chunk in client.stream(b"stream:100000"):
            assert chunk.body == b"chunk 0"
            break
    with Client(service.address, timeout=10) as client:
        assert client.exec(b"echo:still here").body == b"still here"


@pytest.mark.parametrize(
    "service", [("--shards", "1", "--workers", "1", "--worker", COMMANDS)], indirect=True
)
def test_jobs_of_a_client_that_is_gone_are_dropped_not_run(service: Service) -> None:
    # 1,000 jobs of 20 ms each (20 s of work for one worker), then the client vanishes.
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(service.address)
    jobs = [{"id": i + 1, "body": b"sleep:20"} for i in range(1000)]
    sock.send(msgspec.msgpack.encode({"t": "jobs", "jobs": jobs}))
    with Client(service.address, timeout=10) as client:
        deadline = time.monotonic() + 10
        # Accepted: all but the shard's (1 running, 128 held) wait in the broker's queue.
        while client.stats()["queue"] < 850:
            assert time.monotonic() < deadline, "the jobs never reached the broker's queue"
            time.sleep(0.01)  # another process's queue: polled
        sock.close(linger=0)
        # The first reply to the gone client finds it missing: its queued jobs are dropped,
        # and so are those the shard holds, so a job from someone else runs after the
        # one job running now, not after 20 s (or the 2.6 s of jobs the shard holds).
        started = time.monotonic()
        assert client.exec(b"echo:next", timeout=10).body == b"next"
        assert time.monotonic() - started < 0.5
        stats = client.stats()
    assert stats["jobs_abandoned"] > 800
    assert stats["queue"] == 0


def _raw(address: str, message: bytes) -> dict[str, object]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(message)
        assert sock.poll(5000), "no reply to a malformed message"
        reply: dict[str, object] = msgspec.msgpack.decode(sock.recv())
        return reply
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"\xc1garbage", "malformed"),
        (msgspec.msgpack.encode([1, 2, 3]), "malformed"),
        (msgspec.msgpack.encode({"v": 2, "t": "jobs", "jobs": []}), "version 2"),
        (msgspec.msgpack.encode({"v": 1, "t": "nope"}), "malformed"),
        (msgspec.msgpack.encode({"v": 1, "t": "jobs", "jobs": [{"id": "x"}]}), "malformed"),
        (
            msgspec.msgpack.encode({"v": 1, "t": "control", "id": 3, "cmd": "dance"}),
            "unknown command",
        ),
    ],
    ids=["garbage", "array", "version", "unknown-type", "wrong-type", "unknown-command"],
)
def test_malformed_client_message_gets_a_bad_request_reply(
    service: Service, message: bytes, why: str
) -> None:
    reply = _raw(service.address, message)
    (answer,) = reply["replies"]  # type: ignore[misc]
    assert answer["code"] == "bad_request"
    assert why in answer["error"]
    with Client(service.address, timeout=10) as client:
        assert client.exec(b"echo:fine").body == b"fine"


def test_oversize_job_is_refused_with_a_reason(tmp_path: Path) -> None:
    svc = Service(tmp_path, "--shards", "1", "--workers", "1")
    try:
        big = {"v": 1, "t": "jobs", "jobs": [{"id": 9, "body": b"x" * (65 * 1024 * 1024)}]}
        reply = _raw(svc.address, msgspec.msgpack.encode(big))
        (answer,) = reply["replies"]  # type: ignore[misc]
        assert answer["id"] == 9 and answer["code"] == "bad_request"
        assert "max_payload_size" in answer["error"]
    finally:
        assert svc.stop() == 0


@pytest.mark.parametrize(
    "service",
    [
        # no prefetch: the shard takes one job; the rest wait in the broker
        ("--shards", "1", "--workers", "1", "--prefetch", "0", "--worker", COMMANDS),
        # the default prefetch: the shard holds the late job for its busy worker
        ("--shards", "1", "--workers", "1", "--worker", COMMANDS),
    ],
    ids=["in-the-broker", "held-by-the-shard"],
    indirect=True,
)
@pytest.mark.parametrize("kind", ["exec", "stream"])
def test_job_queued_past_its_deadline_times_out_and_never_runs(service: Service, kind: str) -> None:
    async def late(client: AsyncClient) -> None:
        if kind == "exec":
            await client.exec(b"echo:late", timeout=0.2)
        else:
            async for _ in client.stream(b"stream:2", timeout=0.2):
                pass

    async def scenario() -> None:
        async with AsyncClient(service.address, timeout=10) as client:
            slow = [asyncio.ensure_future(client.exec(b"sleep:300")) for _ in range(3)]
            # let the slow jobs reach the broker first (a stream also in the same message)
            await asyncio.sleep(0.05 if kind == "exec" else 0)
            started = time.monotonic()
            with pytest.raises(JobTimeoutError, match="never ran"):
                await late(client)
            assert time.monotonic() - started < 0.6  # at its deadline, not after the slow jobs
            for job in slow:
                await job

    asyncio.run(asyncio.wait_for(scenario(), 30))
    with Client(service.address, timeout=10) as client:
        (workers,) = client.workers().values()
        assert sum(w["jobs"] for w in workers) == 3  # the slow ones; the late one never ran


@pytest.mark.parametrize(
    "service",
    [("--shards", "1", "--workers", "1", "--prefetch", "0", "--worker", COMMANDS)],
    indirect=True,
)
def test_a_cancelled_exec_is_dropped_from_the_broker_queue_and_never_runs(
    service: Service,
) -> None:
    async def queued(client: AsyncClient) -> None:
        deadline = time.monotonic() + 10
        while (await client.stats())["queue"] < 1:
            assert time.monotonic() < deadline, "the second job never reached the broker's queue"

    async def scenario() -> None:
        async with AsyncClient(service.address, timeout=10) as client:
            slow = asyncio.ensure_future(client.exec(b"sleep:500"))
            waiting = asyncio.ensure_future(client.exec(b"echo:never"))
            await queued(client)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert (await client.stats())["queue"] == 0  # the cancel came before the stats
            assert (await slow).body == b"slept"

    asyncio.run(asyncio.wait_for(scenario(), 30))
    with Client(service.address, timeout=10) as client:
        (workers,) = client.workers().values()
        assert sum(w["jobs"] for w in workers) == 1  # the slow one; the cancelled one never ran


@pytest.mark.parametrize(
    "service", [("--shards", "2", "--workers", "1", "--worker", COMMANDS)], indirect=True
)
@pytest.mark.parametrize("kind", ["exec", "stream"])
def test_slow_job_on_one_shard_does_not_hold_back_jobs_another_shard_can_run(
    service: Service, kind: str
) -> None:
    async def fast_job(client: AsyncClient, i: int) -> bytes:
        if kind == "exec":
            return (await client.exec(f"echo:{i}".encode())).body
        chunks = [chunk.body async for chunk in client.stream(b"stream:2")]
        assert chunks == [b"chunk 0", b"chunk 1", b"end"]
        return str(i).encode()

    # Default prefetch: each shard may hold jobs beyond what its one worker runs.
    async def scenario() -> tuple[float, bool]:
        async with AsyncClient(service.address, timeout=10) as client:
            slow = asyncio.ensure_future(client.exec(b"sleep:3000"))
            await asyncio.sleep(0.2)  # it runs on one shard now
            started = time.monotonic()
            fast = await asyncio.gather(*(fast_job(client, i) for i in range(40)))
            assert fast == [str(i).encode() for i in range(40)]
            took = time.monotonic() - started
            still_running = not slow.done()
            await slow
            return took, still_running

    took, still_running = asyncio.run(asyncio.wait_for(scenario(), 30))
    # Jobs that went to the slow job's shard came back and ran on the other one.
    assert still_running and took < 1.5, took
    with Client(service.address, timeout=10) as client:
        stats = client.stats()
    assert stats["jobs_returned"] > 0
    assert stats["jobs_done"] == 41


@pytest.mark.parametrize(
    "service",
    [("--shards", "2", "--workers", "1", "--worker", COMMANDS, "-o", "pool.debug=true")],
    indirect=True,
)
def test_in_debug_mode_a_slow_job_holds_back_no_job_another_shard_can_run(
    service: Service,
) -> None:
    # A debug pool starts a fresh worker per job and cannot hand a waiting job
    # back: its shard must hold none, or jobs would wait out the slow one.
    async def scenario() -> bool:
        async with AsyncClient(service.address, timeout=20) as client:
            slow = asyncio.ensure_future(client.exec(b"sleep:4000"))
            deadline = time.monotonic() + 10
            while sum(s["in_flight"] for s in (await client.stats())["shards"].values()) < 1:
                assert time.monotonic() < deadline, "the slow job never reached a shard"
                await asyncio.sleep(0.02)
            fast = [await client.exec(f"echo:{i}".encode()) for i in range(3)]
            fast += await asyncio.gather(*(client.exec(f"echo:{i}".encode()) for i in range(3, 8)))
            assert [r.body for r in fast] == [str(i).encode() for i in range(8)]
            still_running = not slow.done()
            assert (await slow).body == b"slept"
            return still_running

    assert asyncio.run(asyncio.wait_for(scenario(), 30)), "fast jobs waited for the slow one"
    with Client(service.address, timeout=10) as client:
        stats = client.stats()
    assert stats["jobs_returned"] == 0  # none was held, so none had to come back
    assert stats["jobs_done"] == 9


@pytest.mark.parametrize(
    "service", [("--shards", "2", "--workers", "2", "--worker", COMMANDS)], indirect=True
)
def test_shard_killed_under_load_loses_only_its_jobs_and_comes_back(service: Service) -> None:
    async def scenario() -> list[object]:
        async with AsyncClient(service.address, timeout=30) as client:
            jobs = [asyncio.ensure_future(client.exec(b"sleep:300")) for _ in range(16)]
            await asyncio.sleep(0.1)  # the jobs are running on both shards now
            victim = next(p for p in shard_processes() if "shard-0" in p.cmdline())
            victim.send_signal(signal.SIGKILL)
            return await asyncio.gather(*jobs, return_exceptions=True)

    outcomes = asyncio.run(asyncio.wait_for(scenario(), 30))
    lost = [o for o in outcomes if isinstance(o, ShardLostError)]
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    assert lost and done
    assert len(lost) + len(done) == 16, outcomes
    service.wait_ready()  # shard-0 was restarted and joined again
    with Client(service.address, timeout=10) as client:
        assert len(client.stats()["shards"]) == 2
        assert [r.body for r in client.map([b"echo:1"] * 50)] == [b"1"] * 50


def test_sigterm_drains_without_losing_a_reply(tmp_path: Path) -> None:
    svc = Service(tmp_path, "--shards", "2", "--workers", "2", "--worker", COMMANDS)

    async def scenario() -> list[object]:
        async with AsyncClient(svc.address, timeout=30) as client:
            jobs = [asyncio.ensure_future(client.exec(b"sleep:100")) for _ in range(40)]
            await asyncio.sleep(0.05)
            svc.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*jobs, return_exceptions=True)

    outcomes = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert all(not isinstance(o, BaseException) for o in outcomes), outcomes
    assert svc.stop() == 0
    _, alive = psutil.wait_procs(shard_processes(), timeout=10)
    assert not alive


def _remote_shard(svc: Service, backend: str, *args: str) -> subprocess.Popen[bytes]:
    """``shardpool shard --name remote`` started by hand, once the broker lists it."""
    remote = subprocess.Popen(
        [sys.executable, "-m", "shardpool", "shard", "--connect", backend, "--name", "remote",
         *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    with Client(svc.address, timeout=10) as client:
        deadline = time.monotonic() + 20
        while "remote" not in client.stats()["shards"]:
            if time.monotonic() > deadline:
                remote.kill()
                raise AssertionError("the remote shard never joined")
            time.sleep(0.05)  # a remote process joining: poll the broker's view
    return remote


def test_shard_stopped_under_load_hands_its_held_jobs_to_another(tmp_path: Path) -> None:
    backend = f"tcp://127.0.0.1:{free_port()}"
    svc = Service(
        tmp_path, "--shards", "1", "--workers", "1", "--backend", backend, "--worker", COMMANDS
    )
    remote = _remote_shard(svc, backend, "--workers", "1", "--worker", COMMANDS)
    try:

        async def scenario() -> tuple[list[object], float]:
            async with AsyncClient(svc.address, timeout=20) as client:
                # 60 jobs of 50 ms: each shard holds about 30, 1.5 s of work
                jobs = [asyncio.ensure_future(client.exec(b"sleep:50")) for _ in range(60)]
                await asyncio.sleep(0.2)
                remote.send_signal(signal.SIGTERM)
                stopped = time.monotonic()
                await asyncio.to_thread(remote.wait, 10)
                took = time.monotonic() - stopped
                return await asyncio.gather(*jobs, return_exceptions=True), took

        outcomes, took = asyncio.run(asyncio.wait_for(scenario(), 30))
        assert all(not isinstance(o, BaseException) for o in outcomes), outcomes
        assert remote.returncode == 0
        # it finished its running job only; the jobs it held ran on the other shard
        assert took < 0.8, took
    finally:
        if remote.poll() is None:
            remote.kill()
            remote.wait()
        assert svc.stop() == 0


def test_shards_that_handed_back_all_they_held_still_get_jobs(tmp_path: Path) -> None:
    # Both shards hold jobs while their only worker is starting again (0.5 s), so
    # both hand every held job back. A shard with nothing in flight must still
    # get jobs, few at first: nothing else would ever tell the broker it moves.
    slow_boot = tmp_path / "slow-boot"
    svc = Service(
        tmp_path, "--shards", "2", "--workers", "1", "--worker", COMMANDS,
        "-o", f"pool.env.SHARDPOOL_SLOW_BOOT_FILE={slow_boot}",
    )  # fmt: skip
    try:
        with Client(svc.address, timeout=10) as client:
            assert [r.body for r in client.map([b"echo:w"] * 200)] == [b"w"] * 200
        workers = [child for shard in shard_processes() for child in shard.children()]
        assert len(workers) == 2
        slow_boot.touch()
        for php in workers:
            php.kill()  # idle: no job of theirs is lost, and their replacements start slowly
        psutil.wait_procs(workers, timeout=10)
        bodies = [f"echo:{i}".encode() for i in range(400)]
        started = time.monotonic()
        with Client(svc.address, timeout=20) as client:
            replies = [r.body for r in client.map(bodies, window=400)]
            took = time.monotonic() - started
            stats = client.stats()
        assert replies == [b[5:] for b in bodies]
        assert stats["jobs_returned"] > 0  # the shards did hand their held jobs back
        assert took < 5, took  # a worker's start and the jobs, not a deadline
    finally:
        svc.stop()
        psutil.wait_procs(shard_processes(), timeout=10)


def test_a_shard_that_says_hello_hears_back_at_once(tmp_path: Path) -> None:
    # A reconnecting shard that hears nothing soon after its hello reconnects
    # again, and its second hello fails the jobs sent to it in between: the
    # broker must answer a hello at once, not at its next heartbeat.
    port = free_port()
    service = Service(
        tmp_path, "--shards", "0", "--backend", f"tcp://127.0.0.1:{port}", "--heartbeat", "20",
        ready=False,
    )  # fmt: skip
    with Client(service.address, timeout=10) as client:
        assert client.stats()["shards"] == {}  # up, and past its first heartbeat round
    ctx = zmq.Context()
    shard = ctx.socket(zmq.DEALER)
    try:
        shard.setsockopt(zmq.IDENTITY, b"by-hand")
        shard.setsockopt(zmq.LINGER, 0)
        shard.connect(f"tcp://127.0.0.1:{port}")
        shard.send(wire.encode(wire.Hello(name="by-hand", pid=1, host="test", capacity=1)))
        assert shard.poll(5000), f"no answer to the hello within 5 s:\n{service.output()}"
        assert isinstance(wire.broker_decoder.decode(shard.recv()), wire.Heartbeat)
        with Client(service.address, timeout=5) as client:
            assert set(client.stats()["shards"]) == {"by-hand"}
    finally:
        shard.close()
        ctx.term()
        service.stop()


def test_remote_shard_started_by_hand_joins_over_tcp(tmp_path: Path) -> None:
    backend = f"tcp://127.0.0.1:{free_port()}"
    svc = Service(tmp_path, "--shards", "1", "--workers", "1", "--backend", backend)
    remote = _remote_shard(
        svc, backend, "--workers", "1", "--pipeline-depth", "2", "--prefetch", "8",
        "--busy-poll", "20us",
    )  # fmt: skip
    try:
        with Client(svc.address, timeout=10) as client:
            replies = list(client.map([b"x"] * 2000, window=256))
            stats = client.stats()
        assert len(replies) == 2000
        assert stats["shards"]["remote"]["jobs_done"] > 0
        # its flags took effect: 1 worker x depth 2, plus 8 prefetched
        assert stats["shards"]["remote"]["capacity"] == 1 * 2 + 8
    finally:
        remote.send_signal(signal.SIGTERM)
        assert remote.wait(20) == 0
        assert svc.stop() == 0


def test_a_missing_worker_script_is_named_before_anything_starts() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardpool", "serve", "--worker", "/nonexistent/worker.php"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == "shardpool: no such PHP worker script: /nonexistent/worker.php"


def test_shard_that_cannot_boot_makes_serve_exit_with_the_cause(tmp_path: Path) -> None:
    # --command, not --worker: serve checks a --worker path itself before starting shards
    svc = Service(
        tmp_path, "--shards", "1", "--command", "php /nonexistent/worker.php", ready=False
    )
    code = svc.proc.wait(60)
    output = svc.output()
    assert code != 0
    assert "Could not open input file" in output
    assert "failed at boot" in output


def test_any_config_key_can_be_set_with_a_flag(tmp_path: Path) -> None:
    svc = Service(
        tmp_path, "--shards", "1", "-o", "pool.num_workers=3", "-o", "pool.supervisor.ttl=1h",
        "-o", "max_queue_size=5",
    )  # fmt: skip
    try:
        with Client(svc.address, timeout=10) as client:
            assert [len(ws) for ws in client.workers().values()] == [3]
    finally:
        assert svc.stop() == 0


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("pool.max_jobz=3", "max_jobz"),
        ("pool.max_jobs=-1", "pool.max_jobs"),
        ("nokey", "KEY=VALUE"),
    ],
)
def test_a_bad_config_flag_is_refused_naming_the_key(option: str, named: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardpool", "serve", "-o", option],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0
    assert named in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["serve", "--pipeline-depth", "100"], "--pipeline-depth"),
        (["shard", "--connect", "ipc:///nowhere", "--pipeline-depth", "0"], "--pipeline-depth"),
        (["shard", "--connect", "ipc:///nowhere", "--prefetch", "-1"], "--prefetch"),
        (["serve", "--prefetch", "lots"], "--prefetch"),
        (["serve", "--pipeline-depth", "deep"], "--pipeline-depth"),
        (["serve", "--busy-poll", "1s"], "--busy-poll"),
        (["shard", "--connect", "ipc:///nowhere", "--busy-poll", "fast"], "--busy-poll"),
    ],
)
def test_a_bad_pool_flag_is_a_usage_error_naming_it(args: list[str], named: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardpool", *args],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"error: argument {named}" in result.stderr and "Traceback" not in result.stderr
    if named == "--pipeline-depth":  # every bad depth is told what a good one is
        assert "from 1 to 64, or auto" in result.stderr
    if named == "--busy-poll":
        assert "from 0 (none) to 10ms" in result.stderr


def test_exec_command_prints_the_reply(service: Service) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shardpool", "exec", "--connect", service.address, "echo:hi there"],
        capture_output=True, timeout=30, check=True, cwd=ROOT,
    )  # fmt: skip
    assert out.stdout == b"hi there"


def test_workers_command_prints_a_table(service: Service) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shardpool", "workers", "--connect", service.address],
        capture_output=True, timeout=30, check=True, cwd=ROOT, text=True,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["shard", "pid", "state"]
    assert len(lines) == 1 + 4


def test_the_minimal_client_in_the_protocol_page_works(service: Service, tmp_path: Path) -> None:
    page = (ROOT / "docs" / "protocol.md").read_text()
    block = re.search(
        r"<!-- minimal-client:start -->\s*```python\n(.*?)```\s*<!-- minimal-client:end -->",
        page,
        re.S,
    )
    assert block, "docs/protocol.md lost its minimal client"
    script = tmp_path / "minimal_client.py"
    script.write_text(block.group(1))
    out = subprocess.run(
        [sys.executable, str(script), service.address],
        capture_output=True, timeout=30, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_connect_to_nothing_fails_with_a_clear_error() -> None:
    with (
        Client(f"tcp://127.0.0.1:{free_port()}", timeout=1, heartbeat=0.5) as client,
        pytest.raises(ShardpoolError),
    ):
        client.exec(b"hello")


def test_rolling_reset_replaces_every_worker(service: Service) -> None:
    with Client(service.address, timeout=30) as client:
        before = {w["pid"] for ws in client.workers().values() for w in ws}
        result = client.reset()
        after = {w["pid"] for ws in client.workers().values() for w in ws}
        assert result == {"shard-0": "ok", "shard-1": "ok"}
        assert not before & after
        assert client.exec(b"echo:ok").body == b"ok"


def test_jobs_and_replies_travel_in_batches_under_load(service: Service) -> None:
    with Client(service.address, timeout=60) as client:
        before = client.stats()
        replies = list(client.map([b"echo:x"] * 4000, window=1024))
        after = client.stats()
    assert len(replies) == 4000
    hops = {k: after[k] - before[k] for k in before if k.endswith(("_in", "_out"))}
    # Each hop carries several jobs per ZeroMQ message, not one message per job.
    for hop in ("client_messages_in", "shard_messages_out", "shard_messages_in"):
        assert hops[hop] * 2 < 4000, hops


@pytest.mark.parametrize("kind", ["async", "blocking"])
def test_a_broker_killed_under_a_clients_job_fails_it_at_once(tmp_path: Path, kind: str) -> None:
    # The job would run 3 s and may wait 60; the client's heartbeat would give
    # up after 10 s. Only its socket monitor, seeing the connection drop, can
    # fail the job within a second or so of the kill, saying why.
    svc = Service(tmp_path, "--shards", "1", "--workers", "1", "--worker", COMMANDS)
    shards = shard_processes()
    assert shards
    killed: list[float] = []

    def kill_serve() -> None:
        svc.proc.kill()
        killed.append(time.monotonic())

    async def scenario() -> object:
        async with AsyncClient(svc.address, timeout=60) as client:
            job = asyncio.ensure_future(client.exec(b"sleep:3000"))
            await client.ping()  # the job went out before the ping, on the same socket
            kill_serve()
            return (await asyncio.gather(job, return_exceptions=True))[0]

    try:
        if kind == "async":
            outcome = asyncio.run(asyncio.wait_for(scenario(), 30))
        else:
            with Client(svc.address, timeout=60) as client:
                client.ping()  # connected
                timer = threading.Timer(0.3, kill_serve)  # while exec() waits
                timer.start()
                try:
                    outcome = client.exec(b"sleep:3000")
                except ShardpoolError as exc:
                    outcome = exc
                timer.join()
        failed = time.monotonic()
        assert isinstance(outcome, UnavailableError), outcome
        assert "lost the connection" in str(outcome)
        assert failed - killed[0] < 2.0
    finally:
        svc.stop()  # reaps serve (already dead)
        # The shard, orphaned, stops on its own (parent death): bounded wait.
        _, alive = psutil.wait_procs(shards, timeout=15)
        for proc in alive:
            proc.kill()
        assert not alive, f"shards outlived their killed serve: {alive}"
