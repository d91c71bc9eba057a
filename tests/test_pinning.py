"""serve --pin-shards: each shard, its threads and its PHP workers on CPUs of their own;
and pin_shards: auto, which pins only where a hand-over across CPUs is dear."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, Service, shard_processes

from shardpool.argtypes import cpu_list
from shardpool.broker.local import cpu_groups
from shardpool.broker.placement import Handover, decide, measure_handover, placement_for
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


# -- pin_shards: auto (the default) -------------------------------------------


@pytest.mark.parametrize(
    ("same_us", "cross_us", "dear"),
    [
        (2.6, 62.0, True),  # a VM whose idle CPUs halt: the project's test machine
        (3.0, 8.0, False),  # bare metal: crossing costs little more
        (1.0, 5.0, False),  # five times, but 4 µs more: too little to pay
        (3.0, 14.0, True),  # over four times and 11 µs more: both bars
    ],
)
def test_auto_pins_only_where_crossing_cpus_is_dear(
    same_us: float, cross_us: float, dear: bool
) -> None:
    assert Handover(same_us * 1e-6, cross_us * 1e-6).dear is dear


@pytest.mark.parametrize("setting", [True, False, "auto"])
@pytest.mark.parametrize(("count", "allowed"), [(1, [0, 1]), (2, [0]), (0, [0, 1])])
def test_one_shard_or_one_cpu_is_never_pinned_nor_probed(
    setting: bool | str, count: int, allowed: list[int]
) -> None:
    placement = placement_for(setting, count, allowed)  # type: ignore[arg-type]
    assert placement.pinned is False and placement.handover is None
    assert "nothing to pin" in placement.describe()


@pytest.mark.parametrize("setting", [True, False])
def test_a_configured_placement_is_taken_as_given_without_probing(setting: bool) -> None:
    placement = placement_for(setting, 2, [0, 1])
    assert placement.pinned is setting and placement.handover is None
    assert placement.figures() == {"pin_shards": setting, "pinned": setting}


@pytest.mark.parametrize("setting", [True, "auto"])
def test_where_the_system_cannot_pin_nothing_is_pinned(
    monkeypatch: pytest.MonkeyPatch, setting: bool | str
) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")
    placement, allowed = decide(setting, 2)  # type: ignore[arg-type]
    assert placement.pinned is False and allowed == []
    assert "cannot pin processes to CPUs" in placement.describe()


needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs to cross")


@needs_two_cpus
def test_the_probe_measures_both_hand_overs_and_gives_the_thread_its_cpus_back() -> None:
    os.sched_setaffinity(0, ALLOWED[:2])
    try:
        handover = measure_handover(ALLOWED)
        assert sorted(os.sched_getaffinity(0)) == ALLOWED[:2]
    finally:
        os.sched_setaffinity(0, ALLOWED)
    assert 0 < handover.same_cpu < 0.01 and 0 < handover.cross_cpu < 0.01
    assert handover.describe().startswith("a hand-over between two processes took ")


def _placement_of(svc: Service) -> dict[str, Any]:
    with Client(svc.address, timeout=10) as client:
        assert [r.body for r in client.map([b"z"] * 50)] == [b"z"] * 50
        placement: dict[str, Any] = client.stats()["placement"]
    return placement


@needs_two_cpus
def test_by_default_serve_measures_and_places_its_shards_as_it_says(tmp_path: Path) -> None:
    svc = Service(tmp_path, "--shards", "2", "--workers", "1", "--log-level", "info")
    try:
        placement = _placement_of(svc)
        assert placement["pin_shards"] == "auto"
        assert placement["same_cpu_us"] > 0 and placement["cross_cpu_us"] > 0
        shards = _shards_by_name()
        if placement["pinned"]:
            assert "shards pinned (pin_shards: auto); a hand-over" in svc.output()
            expected = [tuple(g) for g in cpu_groups(2, ALLOWED)]
        else:
            assert "shards not pinned (pin_shards: auto); a hand-over" in svc.output()
            expected = [tuple(ALLOWED)] * 2
        for i, name in enumerate(("shard-0", "shard-1")):
            threads = _affinity(shards[name])
            assert len(threads) >= 3  # the shard, its ZeroMQ I/O thread, its PHP worker
            assert set(map(tuple, threads.values())) == {expected[i]}, (name, threads)
        assert sorted(os.sched_getaffinity(svc.proc.pid)) == ALLOWED  # the probe gave it back
    finally:
        svc.stop()
        psutil.wait_procs(shard_processes(), timeout=10)


def test_no_pin_shards_leaves_placement_to_the_kernel_without_probing(tmp_path: Path) -> None:
    svc = Service(tmp_path, "--shards", "2", "--workers", "1", "--no-pin-shards")
    try:
        assert _placement_of(svc) == {"pin_shards": False, "pinned": False}
        for proc in _shards_by_name().values():
            assert set(map(tuple, _affinity(proc).values())) == {tuple(ALLOWED)}
    finally:
        svc.stop()
        psutil.wait_procs(shard_processes(), timeout=10)


def test_a_bad_pin_shards_setting_is_refused_naming_it(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "shardpool", "serve", "-o", "pin_shards=maybe"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode != 0
    assert "pin_shards" in done.stderr and "maybe" in done.stderr
    assert "Traceback" not in done.stderr
