"""A private ``shardpool serve`` for commands that need a service for a while.

``shardpool bench`` and ``shardpool batch`` run jobs through the real service
(broker + shards + PHP workers) when no ``--connect`` address is given. The
broker's loop blocks, so the service runs as a child process: its frontend and
backend are ``ipc://`` files in a private temporary directory (owner-only),
and leaving the context stops it with SIGTERM (drain), then SIGKILL. If this
process dies without stopping it, serve gets SIGTERM from the kernel.

>>> with EmbeddedService(shards=2, workers=1) as service:  # doctest: +SKIP
...     with Client(service.address) as client:
...         client.exec(b"hi").body
b'hi'
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shardpool.errors import ShardpoolError

READY_TIMEOUT = 60.0  # seconds for every shard to join (PHP boot included)
STOP_TIMEOUT = 30.0  # seconds for serve to drain and exit after SIGTERM


class ServiceStartError(ShardpoolError):
    """The embedded service exited or did not become ready; carries its output."""


class EmbeddedService:
    """Run ``shardpool serve`` as a child process on private ``ipc://`` endpoints.

    ``shards`` and ``workers`` (per shard) default to serve's own defaults;
    ``worker`` is a PHP script, ``command`` a whole worker command; ``extra``
    are more ``serve`` flags (for example ``["--pipeline-depth", "auto"]``).
    """

    def __init__(
        self,
        *,
        shards: int | None = None,
        workers: int | None = None,
        worker: str | None = None,
        command: str | None = None,
        config: str | None = None,
        extra: Sequence[str] = (),
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="shardpool-")
        os.chmod(self._dir.name, 0o700)
        self.address = f"ipc://{self._dir.name}/frontend"
        self.shards = shards
        argv = [sys.executable, "-m", "shardpool", "serve", "--frontend", self.address]
        argv += ["--backend", f"ipc://{self._dir.name}/backend"]
        argv += ["--parent-pid", str(os.getpid())]  # serve stops if we die
        for flag, value in (
            ("--shards", shards),
            ("--workers", workers),
            ("--worker", worker),
            ("--command", command),
            ("-c", config),
        ):
            if value is not None:
                argv += [flag, str(value)]
        self.argv = [*argv, *extra]
        self._log_path = Path(self._dir.name) / "serve.log"
        self._ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EmbeddedService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Start serve and wait until every shard has joined (bounded)."""
        with self._log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        from shardpool.client import Client

        assert self.proc is not None
        deadline = time.monotonic() + self._ready_timeout
        with Client(self.address, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServiceStartError(
                        f"the embedded service exited with status {self.proc.returncode}:\n"
                        + self.output()
                    )
                stats: dict[str, Any] | None
                try:
                    stats = client.stats()
                except ShardpoolError:
                    stats = None
                wanted = self.shards or os.cpu_count() or 1
                if stats and len(stats.get("shards", ())) >= wanted:
                    return
                time.sleep(0.05)  # polling another process: there is no event to await
        raise ServiceStartError(
            f"the embedded service was not ready after {self._ready_timeout:g} s:\n" + self.output()
        )

    def output(self) -> str:
        """What serve wrote so far (stdout and stderr), for error messages."""
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (serve drains and stops its shards), SIGKILL after ``timeout``."""
        code: int | None = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        self._dir.cleanup()
        return code
