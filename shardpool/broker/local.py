"""Shard processes started by ``shardpool serve``: spawn, watch, restart with back-off."""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import time

import msgspec

from shardpool.config import PoolConfig, convert, to_json
from shardpool.curve import CURVE_ENV
from shardpool.worker.process import exit_fd, exit_how

log = logging.getLogger("shardpool.broker")

BOOT_FAILURES_LIMIT = 3  # consecutive shards dying before their hello: give up
RESTART_BACKOFF_START = 0.2
RESTART_BACKOFF_MAX = 10.0
CONFIG_ENV = "SHARDPOOL_POOL_CONFIG"


def cpu_groups(count: int, allowed: list[int]) -> list[list[int]]:
    """The CPUs each of ``count`` pinned shards runs on (``pin_shards``).

    The CPUs serve may use are shared out in contiguous, near-equal groups:
    one shard per CPU on a machine with as many shards as CPUs, a CPU shared
    by several shards when there are more shards, and several CPUs each when
    there are fewer (one shard keeps them all).
    """
    cpus = sorted(allowed)
    if count <= 0:
        return []
    if count >= len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(count)]
    size, extra = divmod(len(cpus), count)
    groups, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        groups.append(cpus[start:end])
        start = end
    return groups


def pool_from_env() -> PoolConfig | None:
    """In a shard started by serve: the pool config serve handed down, if any."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        return None
    result: PoolConfig = convert(msgspec.json.decode(text), PoolConfig, "pool config from serve")
    return result


class LocalShard:
    """One shard child process. Its exit is watched through a pidfd (:func:`exit_fd`), its
    STDERR forwarded line by line (and the last lines kept for errors)."""

    def __init__(
        self,
        name: str,
        backend: str,
        pool: PoolConfig,
        heartbeat: float,
        liveness: int,
        prefetch: int = 0,
        curve: str | None = None,
        cpus: list[int] | None = None,
    ) -> None:
        self.prefetch = prefetch
        self.cpus = cpus  # pinned to these CPUs, workers included (None: not pinned)
        self.curve = curve  # CURVE keys for the backend, as SHARDPOOL_CURVE carries them
        self.name = name
        self.backend = backend
        self.pool = pool
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd = -1
        self.stderr_fd = -1
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self._partial = b""
        self.said_hello = False
        self.boot_failures = 0
        self.restarts = 0
        self.restart_at: float | None = None
        self.backoff = RESTART_BACKOFF_START

    def spawn(self) -> None:
        env = dict(os.environ)
        env[CONFIG_ENV] = to_json(self.pool).decode()
        if self.curve:
            env[CURVE_ENV] = self.curve
        argv = [
            sys.executable, "-m", "shardpool", "shard",
            "--connect", self.backend,
            "--name", self.name,
            "--parent-pid", str(os.getpid()),
            "--heartbeat", str(self.heartbeat),
            "--liveness", str(self.liveness),
            "--prefetch", str(self.prefetch),
        ]  # fmt: skip
        if self.cpus is not None:
            argv += ["--cpus", ",".join(map(str, self.cpus))]
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        assert self.proc.stderr is not None
        self.stderr_fd = self.proc.stderr.fileno()
        os.set_blocking(self.stderr_fd, False)
        self.pidfd = exit_fd(self.proc)  # readable once it has exited
        self.said_hello = False
        self.restart_at = None
        log.info("started shard %s (pid %d)", self.name, self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def read_stderr(self) -> None:
        """Forward what the shard wrote to STDERR, a line at a time."""
        if self.stderr_fd < 0:
            return
        try:
            data = os.read(self.stderr_fd, 65536)
        except BlockingIOError:
            if self.proc is not None and self.proc.returncode is None:
                return
            data = b""  # exited, and nothing more is coming (a child may hold the pipe)
        except OSError:
            data = b""
        if not data:  # EOF: stop watching the pipe
            self._emit(self._partial)
            self._partial = b""
            if self.proc is not None and self.proc.stderr is not None:
                self.proc.stderr.close()
            self.stderr_fd = -1
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._emit(line)

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if not line:
            return
        self.tail.append(line)
        if not _is_log_line(line):
            # Not a log record (say, a traceback): label it, in the serve's format.
            log.warning("shard %s: %s", self.name, line, extra={"shard": self.name})
            return
        sys.stderr.write(line + "\n")  # the shard logged it in our format and labelled it
        sys.stderr.flush()

    def reap(self) -> int:
        """The pidfd fired: collect the exit status and close our descriptors."""
        assert self.proc is not None
        code = self.proc.wait()
        while self.stderr_fd >= 0:
            self.read_stderr()
        self._close_fds()
        if self.said_hello:
            self.boot_failures = 0
            self.backoff = RESTART_BACKOFF_START
        else:
            self.boot_failures += 1
        return code

    def _close_fds(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.stderr_fd = -1

    def schedule_restart(self) -> float:
        delay = self.backoff
        self.backoff = min(self.backoff * 2, RESTART_BACKOFF_MAX)
        self.restart_at = time.monotonic() + delay
        self.restarts += 1
        return delay

    def terminate(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()

    def describe_exit(self, code: int) -> str:
        how = exit_how(code)
        tail = "\n".join(self.tail)
        return f"shard {self.name} (pid {self.pid}) {how}" + (f":\n{tail}" if tail else "")


def _is_log_line(line: str) -> bool:
    """A line a shard's logging wrote: a JSON object, or text starting with a timestamp."""
    if line.startswith("{") and line.endswith("}"):
        return True
    return len(line) > 10 and line[:4].isdigit() and line[4] == "-" and line[7] == "-"
