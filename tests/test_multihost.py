"""Shards on other hosts: network namespaces joined to the broker by veth links.

The broker runs in the test's own namespace with no local shards; two shards
run in namespaces of their own, each reaching the broker over its own veth
pair with TCP and CURVE. Cutting one link must cost only that shard's jobs
("shard lost" after the heartbeat timeout) while the other keeps serving;
restoring it must bring the shard back.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, WORKERS, Service, free_port

from shardpool.client import AsyncClient, Client
from shardpool.errors import ShardLostError, ShardpoolError

HEARTBEAT = "0.3"  # seconds; lost after 3 silent beats
COMMANDS = str(WORKERS / "commands.php")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Hosts:
    """Two namespaces, host A and host B, each with a veth link to ours."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.names = [f"spa{tag}", f"spb{tag}"]
        self.links = [f"spva{tag}", f"spvb{tag}"]
        self.broker_ips = ["10.77.1.1", "10.77.2.1"]
        self.created: list[str] = []
        for i, (ns, link) in enumerate(zip(self.names, self.links, strict=True)):
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}p")
            _ip("link", "set", f"{link}p", "netns", ns)
            _ip("addr", "add", f"{self.broker_ips[i]}/24", "dev", link)
            _ip("link", "set", link, "up")
            inside = ("netns", "exec", ns, "ip")
            _ip(*inside, "addr", "add", f"10.77.{i + 1}.2/24", "dev", f"{link}p")
            _ip(*inside, "link", "set", f"{link}p", "up")
            _ip(*inside, "link", "set", "lo", "up")

    def link(self, host: int, up: bool) -> None:
        _ip("link", "set", self.links[host], "up" if up else "down")

    def close(self) -> None:
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        for link in self.links:  # gone with the namespace; make sure
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` for network namespaces")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    try:
        made = Hosts()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"the kernel refused network namespaces: {exc.stderr.decode().strip()}")
    try:
        yield made
    finally:
        made.close()


def _keys(directory: Path, name: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "shardpool", "keys", str(directory), name],
        check=True, capture_output=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    return directory / name


def _shards(address: str) -> dict[str, dict[str, int]]:
    with Client(address, timeout=5) as client:
        return client.stats()["shards"]  # type: ignore[no-any-return]


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # polling processes in other namespaces: no event to await


def test_a_cut_link_loses_only_that_hosts_jobs_and_the_shard_rejoins(
    hosts: Hosts, tmp_path: Path
) -> None:
    server = _keys(tmp_path / "server", "server")
    shard_keys = [_keys(tmp_path / "shards", name) for name in ("host-a", "host-b")]
    port = free_port()
    config = tmp_path / "shardpool.yaml"
    config.write_text(
        f"curve:\n  server_key: {server}.key_secret\n  shards: {tmp_path / 'shards'}\n"
    )
    service = Service(
        tmp_path, "-c", str(config), "--shards", "0", "--backend", f"tcp://0.0.0.0:{port}",
        "--heartbeat", HEARTBEAT, ready=False,
    )  # fmt: skip
    shards = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "shardpool",
                "shard",
                "--connect",
                f"tcp://{ip}:{port}",
                "--name",
                name,
                "--workers",
                "1",
                "--prefetch",
                "0",
                "--worker",
                COMMANDS,
                "--heartbeat",
                HEARTBEAT,
                "--curve-server",
                f"{server}.key",
                "--curve-key",
                f"{key}.key_secret",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for ns, ip, name, key in zip(
            hosts.names, hosts.broker_ips, ("host-a", "host-b"), shard_keys, strict=True
        )
    ]
    try:
        _wait_for(
            lambda: set(_shards(service.address)) == {"host-a", "host-b"},
            f"both shards to join:\n{service.output()}",
        )
        outcomes = asyncio.run(_cut_under_load(service.address, hosts))
        lost = [o for o in outcomes if isinstance(o, ShardLostError)]
        other = [o for o in outcomes if isinstance(o, ShardpoolError) and o not in lost]
        assert len(lost) == 1, "host A's one job should have been reported lost"
        assert "host-a" in str(lost[0])
        assert not other, other
        assert outcomes.count(b"slept") == 3  # host B ran its job and the two queued
        # With host A cut off, host B alone keeps serving.
        assert set(_shards(service.address)) == {"host-b"}
        with Client(service.address, timeout=10) as client:
            assert [r.body for r in client.map([b"echo:%d" % i for i in range(50)])] == [
                b"%d" % i for i in range(50)
            ]
        hosts.link(0, up=True)
        _wait_for(lambda: "host-a" in _shards(service.address), "host A to rejoin")
        with Client(service.address, timeout=10) as client:
            for _ in client.map([b"sleep:20"] * 40):
                pass
        assert _shards(service.address)["host-a"]["jobs_done"] > 0
    finally:
        for proc in shards:
            proc.terminate()
        for proc in shards:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        service.stop()
    assert "shard host-a lost" in service.output()


async def _cut_under_load(address: str, hosts: Hosts) -> list[bytes | ShardpoolError]:
    """Four 1.5 s jobs: one runs on each host, two wait at the broker (the shards
    hold no jobs beyond those running: --prefetch 0). Cut host A's link while
    its job runs: the broker may send it no other job before it is lost."""
    async with AsyncClient(address, timeout=30) as client:

        async def one() -> bytes | ShardpoolError:
            try:
                return (await client.exec(b"sleep:1500")).body
            except ShardpoolError as exc:
                return exc

        tasks = [asyncio.ensure_future(one()) for _ in range(4)]
        deadline = time.monotonic() + 10
        while True:  # both shards have jobs in flight
            stats = await client.stats()
            if all(s["in_flight"] > 0 for s in stats["shards"].values()):
                break
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.02)
        hosts.link(0, up=False)
        return list(await asyncio.gather(*tasks))
