"""Issue 7: every job the service accepts gets exactly one terminal reply, under faults.

Each test runs a real ``shardpool serve`` with steady load from three raw
protocol clients (tests/faultload.py: they keep every reply per request id,
so a duplicate or a reply to the wrong request would show), injects one
fault, and then checks: every request got exactly one terminal reply (a
result or an error with a code of shardpool.errors), echo replies carry the
request's own token, no shard or PHP process leaked, and the service answers
normally afterwards.

Counts per test are printed at the end of the module (``pytest -s``) and
written as JSON to $SHARDPOOL_FAULT_REPORT when it is set; docs/reliability.md
has the numbers of a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import ROOT, WORKERS, Service, free_port
from faultload import Load, LoadClient, Summary, assert_exactly_once, cpu_seconds, tree

from shardpool.client import AsyncClient, Client
from shardpool.errors import ShardpoolError

COMMANDS = str(WORKERS / "commands.php")
HEARTBEAT = "0.5"  # a silent shard is declared lost after 3 beats: 1.5 s
REPORT: list[dict[str, Any]] = []

Start = Callable[..., Service]


# -- fixtures and helpers ---------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def fault_report() -> Iterator[None]:
    yield
    if not REPORT:
        return
    lines = [f"{'test':<64} {'requests':>8} {'faults':>6} {'lost':>4} {'dup':>4} errors"]
    for row in REPORT:
        lines.append(
            f"{row['test']:<64} {row['requests']:>8} {row['faults']:>6} {row['lost']:>4} "
            f"{row['duplicated']:>4} {row['errors']}"
        )
    print("\n" + "\n".join(lines))
    path = os.environ.get("SHARDPOOL_FAULT_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=2))


def record(request: pytest.FixtureRequest, summary: Summary, faults: int) -> None:
    REPORT.append(
        {
            "test": request.node.name.removeprefix("test_"),
            "requests": summary.requests,
            "faults": faults,
            "lost": len(summary.lost),
            "duplicated": len(summary.duplicated),
            "misrouted": len(summary.misrouted),
            "errors": dict(summary.errors),
        }
    )


def _argv(config: dict[str, Any] | None, tmp_path: Path, args: tuple[str, ...]) -> list[str]:
    argv = ["--heartbeat", HEARTBEAT]
    if "--shards" not in args:
        argv += ["--shards", "2", "--workers", "2"]
    if "--worker" not in args:
        argv += ["--worker", COMMANDS]
    if config:
        path = tmp_path / f"serve-{len(list(tmp_path.glob('serve-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(config))
        argv += ["-c", str(path)]
    return [*argv, *args]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start services; at the end stop them and check nothing they started survives."""
    started: list[tuple[Service, list[psutil.Process]]] = []

    def _start(config: dict[str, Any] | None = None, *args: str, ready: bool = True) -> Service:
        svc = Service(tmp_path, *_argv(config, tmp_path, args), ready=ready)
        started.append((svc, []))
        return svc

    yield _start
    for svc, _ in started:
        everything = tree(svc.proc.pid)[1:]
        svc.stop()
        _, alive = psutil.wait_procs(everything, timeout=10)
        assert not alive, f"processes outlived serve: {alive}"


def shard(svc: Service, name: str) -> psutil.Process:
    for proc in tree(svc.proc.pid):
        if f"--name {name} " in " ".join(proc.cmdline()) + " ":
            return proc
    raise AssertionError(f"no shard {name} under serve")


def php_of(proc: psutil.Process) -> list[psutil.Process]:
    return [p for p in tree(proc.pid) if p.name().startswith("php")]


def answers_normally(address: str, shards: int = 2) -> None:
    """The service as a user sees it after a fault: every shard back, jobs answered."""
    with Client(address, timeout=20) as client:
        deadline = time.monotonic() + 20
        while len(client.stats()["shards"]) < shards:
            assert time.monotonic() < deadline, "a shard did not come back"
            time.sleep(0.05)  # polling the broker's view of a remote process
        replies = list(client.map([f"echo:after {i}".encode() for i in range(200)], window=64))
        assert [r.body for r in replies] == [f"after {i}".encode() for i in range(200)]


def busy_worker(address: str, settle: float = 0.3) -> int:
    """The pid of a worker that is running one long job: working, with no job finished
    between two looks ``settle`` seconds apart (the load's echo jobs take microseconds)."""
    with Client(address, timeout=10) as client:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            first = {w["pid"]: w for ws in client.workers().values() for w in ws}
            time.sleep(settle)  # the gap that tells a long job from many short ones
            for ws in client.workers().values():
                for w in ws:
                    before = first.get(w["pid"])
                    if (
                        before
                        and before["state"] == w["state"] == "working"
                        and before["jobs"] == w["jobs"]
                    ):
                        return int(w["pid"])
    raise AssertionError("no worker was seen running the long job")


def finish(
    load: Load, request: pytest.FixtureRequest, allowed: dict[str, set[str]], faults: int
) -> Summary:
    summary = load.finish(allowed)
    record(request, summary, faults)
    assert_exactly_once(summary)
    assert summary.requests > 100, "too little load to say anything"
    return summary


def replies_of(client: LoadClient, kind: str) -> list[dict[str, Any]]:
    return [client.replies[rid][-1] for rid in client.injected[kind]]


# -- worker faults -----------------------------------------------------------------


def test_worker_killed_mid_job_fails_that_job_only(
    start: Start, request: pytest.FixtureRequest
) -> None:
    svc = start()
    with Load(svc.address) as load:
        load.warm_up()
        injector = load.clients[0]
        for _ in range(2):
            injector.inject(b"sleep:3000", "victim")
            os.kill(busy_worker(svc.address), signal.SIGKILL)
            load.more()
        summary = finish(load, request, {"victim": {"worker_crashed"}}, faults=2)
    victims = replies_of(injector, "victim")
    assert [r["code"] for r in victims] == ["worker_crashed"] * 2
    assert all("SIGKILL" in r["error"] for r in victims), victims
    assert summary.errors == {"worker_crashed": 2}, "the load's own jobs all succeed"
    answers_normally(svc.address)


def test_hung_worker_is_cut_off_at_exec_ttl(start: Start, request: pytest.FixtureRequest) -> None:
    svc = start({"pool": {"supervisor": {"exec_ttl": "500ms"}}})
    with Load(svc.address) as load:
        load.warm_up()
        injector = load.clients[1]
        sent = time.monotonic()
        for _ in range(2):
            # no deadline of its own: a job's timeout would be its exec TTL instead
            injector.inject(b"sleep:20000", "hang", timeout=0)
        load.more()
        summary = finish(load, request, {"hang": {"exec_ttl"}}, faults=2)
    hung = replies_of(injector, "hang")
    assert [r["code"] for r in hung] == ["exec_ttl", "exec_ttl"]
    assert "exec TTL of 0.5s" in hung[0]["error"]
    waited = max(injector.answered_at[rid] for rid in injector.injected["hang"]) - sent
    assert waited < 5, f"the hung jobs were answered after {waited:.1f}s, not at the TTL"
    assert summary.errors == {"exec_ttl": 2}
    answers_normally(svc.address)


def test_worker_printing_to_stdout_fails_its_job_with_the_text(
    start: Start, request: pytest.FixtureRequest
) -> None:
    svc = start()
    with Load(svc.address) as load:
        load.warm_up()
        injector = load.clients[2]
        for i in range(3):
            injector.inject(f"print:stray output {i}".encode(), "print")
            load.more(10)
        summary = finish(load, request, {"print": {"protocol"}}, faults=3)
    printed = replies_of(injector, "print")
    assert [r["code"] for r in printed] == ["protocol"] * 3
    for i, reply in enumerate(printed):
        assert f"stray output {i}" in reply["error"] and "STDERR" in reply["error"]
    assert summary.errors == {"protocol": 3}
    answers_normally(svc.address)


def test_worker_over_its_memory_limit_is_replaced_after_its_job(
    start: Start, request: pytest.FixtureRequest
) -> None:
    svc = start({"pool": {"supervisor": {"max_worker_memory": 48, "watch_tick": "100ms"}}})
    with Client(svc.address, timeout=10) as client:
        before = {w["pid"] for ws in client.workers().values() for w in ws}
    with Load(svc.address) as load:
        load.warm_up()
        injector = load.clients[0]
        for _ in range(8):
            injector.inject(b"mem:24576", "mem")  # 24 MiB more each time
            load.more(5)
        summary = finish(load, request, {}, faults=8)
    grown = replies_of(injector, "mem")
    assert all(not r.get("code") and int(r["body"]) > 24 << 20 for r in grown), grown
    with Client(svc.address, timeout=10) as client:
        deadline = time.monotonic() + 5
        while before <= {w["pid"] for ws in client.workers().values() for w in ws}:
            assert time.monotonic() < deadline, "no worker over the limit was replaced"
            time.sleep(0.05)  # the supervisor ticks in another process
    assert not summary.errors
    answers_normally(svc.address)


def test_worker_flapping_after_its_handshake_backs_off_without_spinning(
    start: Start, request: pytest.FixtureRequest
) -> None:
    svc = start(
        {"pool": {"allocate_timeout": "1s"}},
        "--shards", "1", "--workers", "2", "--worker", str(WORKERS / "flap.php"),
    )  # fmt: skip
    outcomes: list[ShardpoolError | None] = []
    with Client(svc.address, timeout=5) as client:
        for i in range(5):
            try:
                client.exec(f"echo:{i}".encode())
                outcomes.append(None)
            except ShardpoolError as exc:
                outcomes.append(exc)
    # Now measure: a respawn loop without back-off keeps a core busy.
    before, started = cpu_seconds(tree(svc.proc.pid)), time.monotonic()
    time.sleep(2.0)  # the measuring window itself
    used, elapsed = cpu_seconds(tree(svc.proc.pid)) - before, time.monotonic() - started
    summary = Summary(requests=len(outcomes))
    for outcome in outcomes:
        assert isinstance(outcome, ShardpoolError), "a flapping worker cannot answer"
        summary.errors[outcome.code.value] += 1
    record(request, summary, faults=1)
    assert set(summary.errors) <= {"worker_crashed", "no_free_workers"}, outcomes
    assert any("exited with status 0" in str(o) for o in outcomes), outcomes
    assert used / elapsed < 0.3, f"serve used {used:.2f}s of CPU in {elapsed:.2f}s: a spin"
    assert "exited with status 0" in svc.output()  # the shard's log says why, too


# -- shard faults ------------------------------------------------------------------


def test_shard_killed_fails_only_its_jobs_and_is_restarted(
    start: Start, request: pytest.FixtureRequest
) -> None:
    svc = start()
    with Load(svc.address) as load:
        load.warm_up()
        victim = shard(svc, "shard-0")
        workers = php_of(victim)
        victim.kill()
        load.more(50)
        summary = finish(load, request, {"*": {"shard_lost"}}, faults=1)
    _, orphans = psutil.wait_procs(workers, timeout=5)
    assert not orphans, f"PHP workers of the killed shard outlived it: {orphans}"
    assert set(summary.errors) <= {"shard_lost"}
    answers_normally(svc.address)


def test_shard_stalled_then_resumed_is_declared_lost_and_rejoins(
    start: Start, request: pytest.FixtureRequest
) -> None:
    svc = start()
    with Load(svc.address) as load:
        load.warm_up()
        victim = shard(svc, "shard-1")
        victim.suspend()  # SIGSTOP: its event loop stalls
        try:
            load.more(100)  # the other shard carries the load meanwhile
            with Client(svc.address, timeout=10) as client:
                deadline = time.monotonic() + 5
                while "shard-1" in client.stats()["shards"]:
                    assert time.monotonic() < deadline, "a stalled shard was never declared lost"
                    time.sleep(0.05)  # the broker's liveness check, in another process
        finally:
            victim.resume()  # SIGCONT
        load.more(100)
        summary = finish(load, request, {"*": {"shard_lost"}}, faults=1)
    with Client(svc.address, timeout=10) as client:
        assert client.stats()["shards_lost"] >= 1
    answers_normally(svc.address)
    assert set(summary.errors) <= {"shard_lost"}


class _FixedService(Service):
    """A serve on given addresses, to restart a broker where shards and clients expect it."""

    def __init__(self, tmp_path: Path, frontend: str, backend: str, *args: str) -> None:
        self.address, self.backend = frontend, backend
        self.log = tmp_path / f"serve-{time.monotonic_ns()}.log"
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardpool", "serve", "--frontend", frontend,
             "--backend", backend, "--heartbeat", HEARTBEAT, *args],
            stdout=self._log_file, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        self.wait_ready()


def test_broker_restarted_under_load_clients_and_shards_carry_on(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    args = ("--shards", "1", "--workers", "2", "--worker", COMMANDS)
    remote = subprocess.Popen(
        [sys.executable, "-m", "shardpool", "shard", "--connect", backend, "--name", "remote",
         "--workers", "2", "--worker", COMMANDS, "--heartbeat", HEARTBEAT],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    first = _FixedService(tmp_path, frontend, backend, *args)
    second: Service | None = None
    try:
        answers_normally(frontend)  # the remote shard joined
        outcomes = asyncio.run(_restart_under_load(first, tmp_path, frontend, backend, args))
        second = outcomes.pop()
        summary = Summary(requests=len(outcomes))
        for token, outcome in outcomes:
            if isinstance(outcome, ShardpoolError):
                summary.errors[outcome.code.value] += 1
            elif outcome != token:
                summary.misrouted.append(len(summary.misrouted))
            else:
                summary.results += 1
        record(request, summary, faults=1)
        assert not summary.misrouted, "a reply reached the wrong request across the restart"
        # unavailable: the connection dropped with the broker. No shard_lost: the
        # remote shard joins the new broker once, not twice.
        assert set(summary.errors) <= {"unavailable"}, summary.errors
        assert summary.errors, "the restart should have failed the jobs in flight"
        answers_normally(frontend)
        with Client(frontend, timeout=10) as client:
            assert "remote" in client.stats()["shards"]
    finally:
        remote.send_signal(signal.SIGTERM)
        remote_code = remote.wait(20)
        for svc in (first, second):
            if svc is not None:
                svc.stop()
    assert remote_code == 0


def test_reply_from_before_a_broker_restart_never_reaches_a_new_request(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A job still running on a shard when its broker dies must not answer a job of the
    next broker: request ids the brokers give shards must differ across restarts."""
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    # The local shard takes one job at most, so the broker sends the first jobs to the remote.
    args = ("--shards", "1", "--workers", "1", "--prefetch", "0", "--worker", COMMANDS)
    remote = subprocess.Popen(
        [sys.executable, "-m", "shardpool", "shard", "--connect", backend, "--name", "remote",
         "--workers", "2", "--worker", COMMANDS, "--heartbeat", HEARTBEAT],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "SHARDPOOL_CHUNK_DELAY_MS": "100"},
    )  # fmt: skip
    first = _FixedService(tmp_path, frontend, backend, *args)
    second: Service | None = None
    try:
        _wait_for_shard(frontend, "remote")
        old = LoadClient(frontend, "old", rate=0)
        old.start()
        old.inject(b"sleep:6000", "old")  # the first job of this broker, on the remote
        time.sleep(0.5)  # let it start on a worker: no event crosses the process boundary
        first.proc.kill()
        first.proc.wait(10)
        old.finish(drain=0)
        second = _FixedService(tmp_path, frontend, backend, *args)
        _wait_for_shard(frontend, "remote", stable=0.5)
        with Client(frontend, timeout=20) as client:
            # the first job of the new broker, on the remote, running past the old job's end
            reply = client.exec(b"stream:40")
        expected = b"".join(b"chunk %d" % i for i in range(40)) + b"end"
        misrouted = int(reply.body != expected)
        REPORT.append(
            {"test": "reply_across_restart", "requests": 2, "faults": 1, "lost": 0,
             "duplicated": 0, "misrouted": misrouted, "errors": {}}
        )  # fmt: skip
        assert reply.body == expected, f"the new job got {reply.body[:40]!r}"
    finally:
        remote.send_signal(signal.SIGTERM)
        remote.wait(20)
        for svc in (first, second):
            if svc is not None:
                svc.stop()


def _wait_for_shard(address: str, name: str, stable: float = 0.0) -> None:
    """Until the broker lists shard ``name`` (and has lost none for ``stable`` seconds)."""
    with Client(address, timeout=10) as client:
        deadline = time.monotonic() + 20
        since, lost = time.monotonic(), -1
        while True:
            stats = client.stats()
            if stats["shards_lost"] != lost or name not in stats["shards"]:
                since, lost = time.monotonic(), stats["shards_lost"]
            elif time.monotonic() - since >= stable:
                return
            assert time.monotonic() < deadline, f"shard {name} did not settle: {stats}"
            time.sleep(0.05)  # a remote process joining: poll the broker's view


async def _restart_under_load(
    first: Service, tmp_path: Path, frontend: str, backend: str, args: tuple[str, ...]
) -> list[Any]:
    """Three AsyncClients keep jobs (some slow) in flight while the broker is
    SIGKILLed and a new one starts on the same addresses."""
    outcomes: list[Any] = []
    stop = asyncio.Event()

    async def one(client: AsyncClient, token: bytes, body: bytes) -> None:
        try:
            reply = await client.exec(body)
            outcomes.append((token, reply.body))
        except ShardpoolError as exc:
            outcomes.append((token, exc))

    async def drive(n: int) -> None:
        window = asyncio.Semaphore(8)
        async with AsyncClient(frontend, timeout=10, heartbeat=1) as client:
            # two slow jobs each, still running on the old broker's shards when it dies
            slow = [asyncio.ensure_future(one(client, b"slept", b"sleep:1500")) for _ in range(2)]
            i = 0
            tasks: set[asyncio.Task[None]] = set(slow)
            while not stop.is_set():
                i += 1
                token = f"c{n}-{i}".encode()
                await window.acquire()
                task = asyncio.ensure_future(one(client, token, b"echo:" + token))
                task.add_done_callback(lambda _t: window.release())
                tasks.add(task)
                await asyncio.sleep(0.005)
            await asyncio.gather(*tasks)

    drivers = [asyncio.ensure_future(drive(n)) for n in range(3)]
    await asyncio.sleep(1.0)  # load flowing, slow jobs running on both shards
    first.proc.kill()
    first.proc.wait(10)
    second = await asyncio.to_thread(_FixedService, tmp_path, frontend, backend, *args)
    await asyncio.sleep(1.0)  # load on the new broker
    stop.set()
    await asyncio.wait_for(asyncio.gather(*drivers), 30)
    return [*outcomes, second]


# -- client faults -----------------------------------------------------------------


def test_client_leaving_with_jobs_and_streams_in_flight_disturbs_no_one(
    start: Start, request: pytest.FixtureRequest
) -> None:
    import msgspec
    import zmq

    svc = start()
    with Load(svc.address) as load:
        load.warm_up()
        for _ in range(3):
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.connect(svc.address)
            jobs = [{"id": i, "body": b"sleep:50"} for i in range(1, 9)]
            jobs += [{"id": 100 + i, "body": b"stream:500", "stream": True} for i in range(3)]
            sock.send(msgspec.msgpack.encode({"t": "jobs", "jobs": jobs}))
            sock.close(linger=1000)  # gone before any reply
            load.more(20)
        summary = finish(load, request, {}, faults=3)
    assert not summary.errors
    with Client(svc.address, timeout=10) as client:
        deadline = time.monotonic() + 10
        while (stats := client.stats())["queue"] or any(
            s["in_flight"] for s in stats["shards"].values()
        ):
            assert time.monotonic() < deadline, f"the orphaned jobs never drained: {stats}"
            time.sleep(0.05)  # jobs finishing in other processes
    answers_normally(svc.address)


def test_slow_client_costs_the_broker_bounded_memory(
    start: Start, request: pytest.FixtureRequest
) -> None:
    import msgspec
    import zmq

    # 8 reply messages per client: the slow one cannot cost much, and the load's
    # clients keep room for a broker whose ZeroMQ I/O thread waits for a core
    # (at 2, such a wait on a busy machine dropped a healthy client's reply).
    svc = start({"client_hwm": 8})
    broker = psutil.Process(svc.proc.pid)
    body = b"echo:" + b"x" * 32 * 1024
    with Load(svc.address) as load, Client(svc.address, timeout=20) as client:
        load.warm_up()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 64 * 1024)
        sock.connect(svc.address)
        rss_before = 0
        try:
            # 3,000 replies of 32 KiB (96 MiB), sent a batch at a time so that
            # only the replies, never the jobs, could pile up in the broker.
            for batch in range(30):
                done = client.stats()["jobs_done"]
                jobs = [{"id": batch * 100 + i + 1, "body": body} for i in range(100)]
                sock.send(msgspec.msgpack.encode({"t": "jobs", "jobs": jobs}))
                deadline = time.monotonic() + 10
                while client.stats()["jobs_done"] < done + 100:
                    assert time.monotonic() < deadline, "the slow client's jobs did not run"
                    time.sleep(0.01)  # jobs running in other processes
                if batch == 2:  # the pipe to the slow client is full by now
                    rss_before = broker.memory_info().rss
            growth = broker.memory_info().rss - rss_before
            load.more(50)  # the others are still served while the slow one sleeps
            late = 0
            while sock.poll(500):  # now it reads: what the broker kept, then nothing
                late += len(msgspec.msgpack.decode(sock.recv())["replies"])
        finally:
            sock.close(linger=0)
        summary = finish(load, request, {}, faults=1)
    assert not summary.errors
    assert growth < 32 << 20, f"the broker grew by {growth >> 20} MiB for one slow client"
    assert 0 < late < 3000, f"{late} replies read late (the broker drops past client_hwm)"
    with Client(svc.address, timeout=10) as client:  # every dropped reply is counted
        assert client.stats()["replies_undelivered"] == 3000 - late
    answers_normally(svc.address)


# -- the whole service ---------------------------------------------------------------


def test_sigterm_under_load_answers_every_accepted_job(
    start: Start, request: pytest.FixtureRequest
) -> None:
    svc = start()
    with Load(svc.address) as load:
        load.warm_up(50)
        for client in load.clients:
            client.inject(b"sleep:1000", "slow")  # the drain has something to wait for
        # Replies to jobs sent after the slow ones: the broker has read those (in order).
        load.more(20)
        svc.proc.send_signal(signal.SIGTERM)
        summary = finish(load, request, {"*": {"unavailable"}}, faults=1)
    assert svc.proc.wait(30) == 0
    for client in load.clients:
        assert [r.get("body") for r in replies_of(client, "slow")] == [b"slept"]
    assert summary.results > 0


FAULTS = ("worker_kill", "hang", "print", "shard_kill", "shard_stall", "slow_client")


def _mixed_faults(
    start: Start, request: pytest.FixtureRequest, seed: int, count: int
) -> tuple[Summary, list[str]]:
    import msgspec
    import zmq

    rng = random.Random(seed)
    svc = start({"pool": {"supervisor": {"exec_ttl": "1s"}}})
    done: list[str] = []
    stalled: list[psutil.Process] = []
    with Load(svc.address) as load:
        load.warm_up()
        for _ in range(count):
            fault = rng.choice(FAULTS)
            client = rng.choice(load.clients)
            if fault in ("worker_kill", "shard_kill", "shard_stall"):
                try:  # the target may have just died of an earlier fault: then skip it
                    _hit_process(svc, fault, rng, stalled)
                except psutil.NoSuchProcess:
                    continue
            elif fault == "hang":
                client.inject(b"sleep:30000", "hang", timeout=0)
            elif fault == "print":
                client.inject(b"print:noise", "print")
            else:
                sock = zmq.Context.instance().socket(zmq.DEALER)
                sock.setsockopt(zmq.RCVHWM, 1)
                sock.connect(svc.address)
                jobs = [{"id": i + 1, "body": b"echo:" + b"y" * 4096} for i in range(300)]
                sock.send(msgspec.msgpack.encode({"t": "jobs", "jobs": jobs}))
                sock.close(linger=1000)
            done.append(fault)
            time.sleep(rng.uniform(0.1, 0.6))  # faults arrive at random moments, by design
            answers = sum(c.answered() for c in load.clients)
            _wait_progress(load, answers)
        for victim in stalled:
            _resume(victim)  # in case its timer has not fired yet
        summary = load.finish(
            {"*": {"worker_crashed", "shard_lost", "exec_ttl", "protocol", "timeout"}}, drain=20
        )
    record(request, summary, faults=count)
    assert_exactly_once(summary)
    answers_normally(svc.address)
    return summary, done


def _hit_process(
    svc: Service, fault: str, rng: random.Random, stalled: list[psutil.Process]
) -> None:
    """SIGKILL a PHP worker or a shard, or stall a shard for a while.

    Raises NoSuchProcess when the target is not there right now (an earlier
    fault killed it and its replacement is still starting).
    """
    shards = [p for p in tree(svc.proc.pid) if "shardpool shard" in " ".join(_cmdline(p))]
    if not shards:
        raise psutil.NoSuchProcess(0)
    if fault == "worker_kill":
        workers = [w for p in shards for w in php_of(p)]
        if not workers:
            raise psutil.NoSuchProcess(0)
        rng.choice(workers).kill()
    elif fault == "shard_kill":
        rng.choice(shards).kill()
    else:
        victim = rng.choice(shards)
        victim.suspend()
        stalled.append(victim)
        threading.Timer(rng.uniform(0.2, 1.5), _resume, (victim,)).start()


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def _resume(victim: psutil.Process) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        victim.resume()


def _wait_progress(load: Load, answered: int, timeout: float = 15.0) -> None:
    """The service keeps answering between faults (bounded)."""
    deadline = time.monotonic() + timeout
    while sum(c.answered() for c in load.clients) < answered + 30:
        assert time.monotonic() < deadline, "the service stopped answering"
        time.sleep(0.02)  # replies arrive on other threads


def test_random_mix_of_faults_loses_no_reply(start: Start, request: pytest.FixtureRequest) -> None:
    summary, done = _mixed_faults(start, request, seed=7, count=6)
    assert summary.requests > 300 and len(done) == 6


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_soak_random_mix_of_faults_loses_no_reply(
    start: Start, request: pytest.FixtureRequest, seed: int
) -> None:
    _, done = _mixed_faults(start, request, seed=seed, count=40)
    assert len(done) == 40
