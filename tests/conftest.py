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


def async_test(timeout: float = 30.0) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Any]]:
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
