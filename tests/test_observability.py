"""Observability: lifecycle reasons, metrics, stats, JSON logs, the live workers view."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, WORKERS, Service, async_test, free_port, php, until
from prometheus_client.parser import text_string_to_metric_families

from shardpool import Payload, Pool, pool_config
from shardpool.client import Client
from shardpool.errors import ShardpoolError, SoftJobError, WorkerStoppedError
from shardpool.pool.static import MAX_RETRIES

COMMANDS = str(WORKERS / "commands.php")

# -- lifecycle: every worker's end is counted once, with its reason -----------


@async_test()
async def test_worker_ends_are_counted_by_reason() -> None:
    config = pool_config(
        command=php("commands.php"),
        num_workers=2,
        max_jobs=0,
        supervisor={"exec_ttl": "300ms"},
    )
    async with Pool(config) as pool:
        with pytest.raises(WorkerStoppedError):  # every worker asks to go on "stop"
            await pool.exec(Payload(b"stop"))
        with pytest.raises(ShardpoolError):
            await pool.exec(Payload(b"crash:3"))
        with pytest.raises(ShardpoolError):
            await pool.exec(Payload(b"sleep:5000"))  # exec TTL
        await until(pool, lambda: [w.state for w in pool.workers()] == ["ready", "ready"])
        await pool.reset()
        restarts = pool.stats()["restarts"]
    assert restarts.get("crashed") == 1
    assert restarts.get("exec_ttl") == 1
    assert restarts.get("reset") == 2
    # each worker that asked to be replaced is counted once (the job was retried on others)
    assert restarts.get("stop_request") == MAX_RETRIES
    assert "destroyed" not in restarts


@async_test()
async def test_max_jobs_retirements_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shardpool.pool")
    async with Pool(pool_config(command=php("echo.php"), num_workers=1, max_jobs=1)) as pool:
        for _ in range(3):
            await pool.exec(Payload(b"x"))
    retired = pool.stats()["restarts"].get("max_jobs", 0)  # every worker is gone by now
    ended = [r for r in caplog.records if getattr(r, "event", "") == "worker_ended"]
    by_pid = [r.worker_pid for r in ended if r.reason == "max_jobs"]  # type: ignore[attr-defined]
    assert retired == 3  # max_jobs jitters up by at most 15 %: 1 stays 1
    assert len(by_pid) == retired == len(set(by_pid))
    assert all("retired (max_jobs)" in r.getMessage() for r in ended if r.reason == "max_jobs")  # type: ignore[attr-defined]


@async_test()
async def test_worker_stderr_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    from shardpool.worker import process

    caplog.set_level(logging.INFO, logger="shardpool.worker")
    async with Pool(pool_config(command=php("commands.php"), num_workers=1)) as pool:
        assert (await pool.exec(Payload(b"log:5000"))).body == b"logged"
        await pool.exec(Payload(b"log:1"))  # a later line reports how many were dropped
        pid = pool.workers()[0].pid
    lines = [r for r in caplog.records if r.getMessage().startswith(f"[php {pid} stderr] log")]
    dropped = [r for r in caplog.records if "lines not logged" in r.getMessage()]
    assert process.LOG_BURST <= len(lines) < 5000
    assert dropped and all(r.worker_pid == pid for r in dropped)  # type: ignore[attr-defined]
    total = len(lines) + sum(int(r.getMessage().split(": ")[1].split()[0]) for r in dropped)
    assert total == 5001  # every line is either logged or counted


# -- the service: metrics endpoint and stats ----------------------------------


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a Prometheus text page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def eventually(condition, timeout: float = 15.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # polling another process: no event to await


def test_metrics_count_the_jobs_sent(tmp_path: Path) -> None:
    port = free_port()
    service = Service(
        tmp_path, "--shards", "2", "--workers", "1", "--worker", COMMANDS, "--metrics", str(port)
    )
    url = f"http://127.0.0.1:{port}/metrics"
    ok_jobs, failing = 3000, 50
    try:
        with Client(service.address, timeout=30) as client:
            bodies = [b"echo:%d" % i for i in range(ok_jobs)] + [b"error:no"] * failing
            results = []
            seen_mid_load = None
            for result in client.map(bodies, return_exceptions=True):
                results.append(result)
                if len(results) == ok_jobs // 2:
                    seen_mid_load = scrape(url)  # scraping under load works
            assert seen_mid_load is not None
            assert sum(isinstance(r, SoftJobError) for r in results) == failing
            pids = {w["pid"] for ws in client.workers().values() for w in ws}
            os.kill(
                next(iter(pids)), signal.SIGKILL
            )  # one worker restart, reason "exited" (it was idle)

            def settled() -> dict | None:  # type: ignore[type-arg]
                samples = scrape(url)
                ok = samples.get(("shardpool_jobs_total", (("outcome", "ok"),)))
                restarts = sum(
                    v
                    for (name, labels), v in samples.items()
                    if name == "shardpool_worker_restarts_total" and ("reason", "exited") in labels
                )
                ready = sum(
                    v
                    for (name, labels), v in samples.items()
                    if name == "shardpool_workers" and ("state", "ready") in labels
                )  # the killed worker's replacement has started
                return samples if ok == ok_jobs and restarts == 1 and ready == 2 else None

            samples = eventually(settled, what="metrics to show every job and the restart")
            stats = client.stats()
    finally:
        assert service.stop() == 0
    assert samples[("shardpool_jobs_total", (("outcome", "soft_job"),))] == failing
    assert samples[("shardpool_job_duration_seconds_count", ())] == ok_jobs + failing
    assert samples[("shardpool_job_duration_seconds_bucket", (("le", "+Inf"),))] == (
        ok_jobs + failing
    )
    assert samples[("shardpool_queue_length", ())] == 0
    assert samples[("shardpool_shards_pinned", ())] == (1 if stats["placement"]["pinned"] else 0)
    workers = sum(v for (name, _), v in samples.items() if name == "shardpool_workers")
    assert workers == 2
    memory = {dict(labels)["pid"] for (name, labels), _ in samples.items() if "memory" in name}
    assert len(memory) == 2 and all(v > 0 for (n, _), v in samples.items() if "memory" in n)
    for (name, labels), _ in samples.items():
        if name.endswith("_total"):
            assert "pid" not in dict(labels), f"{name} has a pid label"
    # the stats command reports the same figures
    assert stats["outcomes"] == {"ok": ok_jobs, "soft_job": failing}
    assert stats["jobs_done"] == ok_jobs and stats["jobs_failed"] == failing
    assert stats["duration"]["count"] == ok_jobs + failing
    restarts = [s["restarts"] for s in stats["shards"].values()]
    assert sum(r.get("exited", 0) for r in restarts) == 1


def test_metrics_listen_on_loopback_by_default(tmp_path: Path) -> None:
    port = free_port()
    service = Service(tmp_path, "--shards", "1", "--workers", "1", "--metrics", str(port))
    try:
        listening = [
            c.laddr
            for c in psutil.Process(service.proc.pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert [a.ip for a in listening] == ["127.0.0.1"]
    finally:
        service.stop()


def test_bad_metrics_address_names_the_setting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardpool", "serve", "--metrics", "localhost:http"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "metrics" in result.stderr and "Traceback" not in result.stderr


def test_a_metrics_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "shardpool", "serve", "--shards", "1",
             "--frontend", f"tcp://127.0.0.1:{free_port()}", "--metrics", str(port)],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


# -- logs ---------------------------------------------------------------------


def test_json_logs_parse_line_by_line_and_tell_lifecycle_events(tmp_path: Path) -> None:
    config = tmp_path / "shardpool.yaml"
    config.write_text(f"pool:\n  command: php {COMMANDS}\n  num_workers: 1\n  max_jobs: 1\n")
    service = Service(tmp_path, "-c", str(config), "--shards", "1", "--log-format", "json")
    with Client(service.address, timeout=30) as client:
        client.exec(b"echo:1")
        client.exec(b"echo:2")  # the first worker retired after 1 job
        with pytest.raises(ShardpoolError):
            client.exec(b"crash:7")
    assert service.stop() == 0
    records = [json.loads(line) for line in service.output().splitlines() if line.strip()]
    assert all({"time", "level", "proc", "pid", "logger", "msg"} <= r.keys() for r in records)
    events = [(r.get("event"), r.get("reason")) for r in records]
    assert ("shard_joined", None) in events
    assert ("worker_spawned", None) in events
    assert ("worker_ended", "max_jobs") in events
    crash = next(r for r in records if r.get("reason") == "crashed")
    assert crash["proc"] == "shard-0" and crash["level"] == "warning"
    assert "status 7" in crash["msg"] and "crashing on purpose" in crash["msg"]
    assert isinstance(crash["worker_pid"], int)
    stderr = [r for r in records if r["msg"].startswith("[php ") and "crashing" in r["msg"]]
    assert stderr and stderr[0]["worker_pid"] == crash["worker_pid"]


def test_text_logs_carry_the_process_label(tmp_path: Path) -> None:
    service = Service(tmp_path, "--shards", "1", "--workers", "1", "--log-level", "info")
    assert service.stop() == 0
    lines = service.output().splitlines()
    assert any(" broker shardpool.broker: shard shard-0 joined" in line for line in lines)
    assert any(" shard-0 shardpool.pool: worker pid " in line for line in lines)
    assert not any(line.startswith("[shard-0] 20") for line in lines)  # no double labels


# -- the live view -------------------------------------------------------------


@pytest.mark.parametrize("command", [["workers", "--watch"], ["top"]], ids=["watch", "top"])
def test_workers_watch_shows_the_workers_in_a_terminal(tmp_path: Path, command: list[str]) -> None:
    service = Service(tmp_path, "--shards", "2", "--workers", "1")
    try:
        with Client(service.address, timeout=10) as client:
            pids = {w["pid"] for ws in client.workers().values() for w in ws}
            client.exec(b"warm")
        pid, fd = pty.fork()
        if pid == 0:  # the child: the command in a real terminal
            os.environ["COLUMNS"], os.environ["LINES"] = "120", "40"
            os.execv(
                sys.executable,
                [sys.executable, "-m", "shardpool", *command, "--connect",
                 service.address, "--interval", "0.3"],
            )  # fmt: skip
        screen = _read_until(
            fd, lambda text: all(str(p) in text for p in pids) and "jobs/s" in text
        )
        assert "shard-0" in screen and "shard-1" in screen and "ready" in screen
        assert re.search(r"2 shards, 2 workers", screen)
        os.kill(pid, signal.SIGINT)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        os.close(fd)
    finally:
        service.stop()


def _read_until(fd: int, done, timeout: float = 20.0) -> str:  # type: ignore[no-untyped-def]
    """What the terminal showed (escape codes removed), once ``done(text)`` holds."""
    raw = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                raw += os.read(fd, 65536)
            except OSError:
                break
            text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode(errors="replace"))
            if done(text):
                return text
    raise AssertionError(f"the live view never showed the workers:\n{raw[-3000:]!r}")
