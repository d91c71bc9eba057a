"""serve --pin-shards: each shard, its threads and its PHP workers on CPUs of their own."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, Service, shard_processes

from shardpool.argtypes import cpu_list
from shardpool.broker.local import cpu_groups
from shardpool.client import Client

ALLOWED = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("count", "allowed", "groups"),
    [
        (2, [0, 1], [[0], [1]]),
        (3, [0, 1], [[0], [1], [0]]),  # more shards than CPUs: CPUs are shared, in turn
        (1, [0, 1], [[0, 1]]),  # one shard keeps every CPU
        (2, [0, 1, 2, 3, 4], [[0, 1, 2], [3, 4]]),  # fewer shards: near-equal groups
        (2, [5, 2], [[2], [5]]),  # the CPUs serve may use, not the first ones
    ],
)
def test_cpus_are_shared_out_among_shards(
    count: int, allowed: list[int], groups: list[list[int]]
) -> None:
    assert cpu_groups(count, allowed) == groups


@pytest.mark.parametrize(
    ("text", "cpus"), [("3", [3]), ("0,2", [0, 2]), ("0-3", [0, 1, 2, 3]), ("4,0-1", [0, 1, 4])]
)
def test_cpu_lists_are_read_as_taskset_writes_them(text: str, cpus: list[int]) -> None:
    assert cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["x", "", "3-1", "-1", "1,", "0-x"])
def test_a_bad_cpu_list_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="CPU numbers"):
        cpu_list(text)


def _shard_run(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "shardpool", "shard", "--connect", "ipc:///nowhere", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_a_shard_told_to_use_a_cpu_it_may_not_is_refused_naming_it() -> None:
    outside = max(ALLOWED) + 1
    done = _shard_run("--cpus", str(outside))
    assert done.returncode != 0
    assert f"CPU {outside} is not one this process may run on" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_cpus_flag_is_a_usage_error_naming_it() -> None:
    done = _shard_run("--cpus", "lots")
    assert done.returncode == 2
    assert "--cpus" in done.stderr and "Traceback" not in done.stderr


def _affinity(proc: psutil.Process) -> dict[int, list[int]]:
    """Every thread of ``proc`` and its children: the CPUs each may run on."""
    out = {}
    for pid in [proc.pid, *(c.pid for c in proc.children(recursive=True))]:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out[int(task.name)] = sorted(os.sched_getaffinity(int(task.name)))
    return out


def _shards_by_name() -> dict[str, psutil.Process]:
    found = {}
    for proc in shard_processes():
        cmd = proc.cmdline()
        found[cmd[cmd.index("--name") + 1]] = proc
    return found


@pytest.fixture
def pinned(tmp_path: Path) -> Iterator[Service]:
    args = ("--shards", "2", "--workers", "1", "--pin-shards", "--log-level", "info")
    svc = Service(tmp_path, *args)
    try:
        yield svc
    finally:
        svc.stop()
        psutil.wait_procs(shard_processes(), timeout=10)


def test_pinned_shards_run_with_their_workers_on_cpus_of_their_own(pinned: Service) -> None:
    with Client(pinned.address, timeout=10) as client:
        assert [r.body for r in client.map([b"x"] * 200)] == [b"x"] * 200
    shards = _shards_by_name()
    expected = cpu_groups(2, ALLOWED)
    for i, name in enumerate(("shard-0", "shard-1")):
        threads = _affinity(shards[name])
        assert len(threads) >= 3  # the shard, its ZeroMQ I/O thread, its PHP worker
        assert set(map(tuple, threads.values())) == {tuple(expected[i])}, (name, threads)
    assert sorted(os.sched_getaffinity(pinned.proc.pid)) == ALLOWED  # the broker is free
    if len(expected[0]) == 1:
        assert "with its PHP workers; busy polling off" in pinned.output()


def test_a_pinned_shard_and_replaced_worker_come_back_on_the_same_cpus(pinned: Service) -> None:
    victim = _shards_by_name()["shard-1"]
    cpus = sorted(os.sched_getaffinity(victim.pid))
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    deadline = time.monotonic() + 30
    while (back := _shards_by_name().get("shard-1")) is None or back.pid == victim.pid:
        assert time.monotonic() < deadline, "shard-1 was not restarted"
        time.sleep(0.05)  # polling for a process another process starts: no event to await
    pinned.wait_ready()
    php = back.children()[0]
    php.kill()  # the pool replaces its worker: the new one inherits the shard's CPUs
    php.wait(10)
    while not [c for c in back.children() if c.pid != php.pid]:
        assert time.monotonic() < deadline, "shard-1 did not replace its worker"
        time.sleep(0.05)  # as above
    with Client(pinned.address, timeout=10) as client:
        assert [r.body for r in client.map([b"y"] * 100)] == [b"y"] * 100
    threads = _affinity(back)
    assert len(threads) >= 3 and php.pid not in threads
    assert set(map(tuple, threads.values())) == {tuple(cpus)}
