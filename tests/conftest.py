"""Shared test helpers: real PHP workers from workers/, run under uvloop."""

from __future__ import annotations

import asyncio
import functools
import inspect
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import uvloop

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "workers"
RELAYS = ["pipes", "tcp://127.0.0.1:0", "unix://"]

T = TypeVar("T")


def php(script: str, *args: str) -> list[str]:
    """The command that runs one of the bundled workers."""
    return ["php", str(WORKERS / script), *args]


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    """Run a coroutine on a fresh uvloop loop, bounded in time."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return uvloop.run(bounded())


def async_test(
    timeout: float = 30.0,
) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Any]]:
    """Turn an ``async def`` test into a plain one that runs it under uvloop."""

    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def sync(*args: Any, **kwargs: Any) -> Any:
            return run(fn(*args, **kwargs), timeout)

        sync.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
        return sync

    return wrap


@pytest.fixture(params=RELAYS, ids=["pipes", "tcp", "unix"])
def relay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def php_children() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith("php") and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(autouse=True)
def no_leaked_php() -> Iterator[None]:
    """Every test must leave no PHP process behind."""
    yield
    _, alive = psutil.wait_procs(php_children(), timeout=3)
    for proc in alive:
        proc.kill()
    assert not alive, f"PHP processes outlived the test: {[p.pid for p in alive]}"


def pytest_configure(config: pytest.Config) -> None:
    if shutil.which("php") is None:
        raise pytest.UsageError("php is not installed: run `make setup` (Debian's php-cli)")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """A real ``shardpool serve`` process on a free loopback port."""

    def __init__(self, tmp_path: Path, *args: str, ready: bool = True) -> None:
        import subprocess
        import sys

        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"ipc://{tmp_path}/backend"
        argv = [sys.executable, "-m", "shardpool", "serve", "--frontend", self.address]
        if "--backend" not in args:
            argv += ["--backend", self.backend]
        self.log = tmp_path / "serve.log"
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [*argv, *args], stdout=self._log_file, stderr=subprocess.STDOUT, cwd=ROOT
        )
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every shard joined (stats lists them), bounded."""
        import time

        from shardpool.client import Client

        deadline = time.monotonic() + timeout
        with Client(self.address, timeout=2) as client:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"serve exited early:\n{self.output()}"
                try:
                    stats = client.stats()
                except Exception:
                    continue
                if stats["shards"] and len(stats["shards"]) >= self.expected_shards():
                    return
                time.sleep(0.05)  # polling a remote process: no event to await here
        raise AssertionError(f"serve did not become ready:\n{self.output()}")

    def expected_shards(self) -> int:
        argv = self.proc.args
        assert isinstance(argv, list)
        return int(argv[argv.index("--shards") + 1]) if "--shards" in argv else 1

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop_leaving_no_php(self) -> None:
        """Stop (exit 0 expected), then check no PHP process is left: for a service
        shared by a module, where the per-test ``no_leaked_php`` check cannot apply."""
        assert self.stop() == 0, self.output()
        _, alive = psutil.wait_procs(php_children(), timeout=15)  # bounded, not tight
        assert not alive, f"PHP processes outlived the service: {alive}"

    def stop(self, timeout: float = 30.0) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            code = self.proc.wait()
        self._log_file.close()
        return code


def shard_processes() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "shardpool" in " ".join(child.cmdline()) and "shard" in child.cmdline():
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


POOL_WAIT = 5.0  # bound for a pool to settle after an event


def pids(pool: Any) -> set[int]:
    """The pids of a pool's workers."""
    return {info.pid for info in pool.workers()}


async def until(pool: Any, condition: Callable[[], bool], timeout: float = POOL_WAIT) -> None:
    """Wait on the pool's change event (a worker spawned or gone) until ``condition``."""
    async with asyncio.timeout(timeout):
        while not condition():
            assert pool._changed is not None
            await pool._changed.wait()


async def poll(condition: Callable[[], bool], timeout: float = POOL_WAIT) -> None:
    """Bounded poll, only for what a pool signals nothing about (a process being
    spawned, a supervisor mark)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
