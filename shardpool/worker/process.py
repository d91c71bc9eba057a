"""A spawned PHP process: its pipes, its STDERR lines and its exit.

The process runs in its own session (so a Ctrl-C at the terminal reaches
shardpool, which then stops the workers in order). Its exit is seen through
a pidfd on the event loop: no thread, no SIGCHLD handler (where the system
has no pidfd, a thread per process waits for it instead: :func:`exit_fd`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from shardpool.errors import AllocateError
from shardpool.worker.fdlimit import FDS_PER_WORKER, open_files_limit

log = logging.getLogger("shardpool.worker")

STDERR_TAIL_LINES = 20
_MAX_LINE = 8192
# A runaway worker must not flood the log: per worker, lines beyond a burst
# of LOG_BURST are let through at LOG_RATE per second, the rest counted.
LOG_RATE = 100.0
LOG_BURST = 500.0


def exit_how(code: int) -> str:
    """A return code in words: 'exited with status 3', 'was killed by SIGKILL'."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


class LineLogger(asyncio.Protocol):
    """Logs a pipe line by line with the worker's pid, and keeps the last lines."""

    def __init__(self, pid: int, stream: str, tail: collections.deque[str]) -> None:
        self.pid = pid
        self.stream = stream
        self.tail = tail
        self._partial = b""
        self.closed = asyncio.get_running_loop().create_future()
        self._tokens = LOG_BURST
        self._refilled = time.monotonic()
        self._dropped = 0

    def data_received(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._emit(line)

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if not line:
            return
        self.tail.append(line if self.stream == "stderr" else f"[{self.stream}] {line}")
        if self._allow():
            log.info("[php %d %s] %s", self.pid, self.stream, line, extra={"worker_pid": self.pid})

    def _allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(LOG_BURST, self._tokens + (now - self._refilled) * LOG_RATE)
        self._refilled = now
        if self._tokens < 1.0:
            self._dropped += 1
            return False
        self._tokens -= 1.0
        self._report_dropped()
        return True

    def _report_dropped(self) -> None:
        if self._dropped:
            log.warning(
                "worker pid %d: %d %s lines not logged (more than %g lines/s)",
                self.pid,
                self._dropped,
                self.stream.upper(),
                LOG_RATE,
                extra={"worker_pid": self.pid},
            )
            self._dropped = 0

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        self._report_dropped()
        if not self.closed.done():
            self.closed.set_result(None)


_NO_ROOM = (errno.EMFILE, errno.ENFILE)


def _too_many_files(command: Sequence[str]) -> AllocateError:
    return AllocateError(
        f"cannot start worker {list(command)!r}: too many open files (the limit is "
        f"{open_files_limit()}, about {FDS_PER_WORKER} a worker): raise 'ulimit -n', "
        "or run fewer workers"
    )


def exit_fd(popen: subprocess.Popen[bytes]) -> int:
    """A descriptor that becomes readable once ``popen``'s process has exited.

    Its pidfd where the system has them (Linux 5.3 and later); elsewhere
    (older kernels, macOS, some sandboxes) the read end of a pipe whose other
    end a thread closes once ``popen.wait()`` returns. Either way the caller
    closes it, and finds the exit status with ``popen.poll()``.
    """
    try:
        return os.pidfd_open(popen.pid)
    except AttributeError:
        pass  # not Linux
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            raise  # no descriptor to spare: a pipe would fail the same way
    read_end, write_end = os.pipe()

    def wait() -> None:
        try:
            popen.wait()
        except Exception:  # never leave the pipe open: the caller would wait forever
            log.exception("cannot wait for pid %d", popen.pid)
        finally:
            os.close(write_end)

    threading.Thread(target=wait, name=f"shardpool-wait-{popen.pid}", daemon=True).start()
    return read_end


class PhpProcess:
    """One child process. ``exited`` resolves to its return code.

    ``stdin`` and ``stdout`` are the raw pipe file objects when spawned with
    ``pipes=True`` (the frame channel); otherwise STDOUT is logged like STDERR.
    """

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.loop = loop
        self.returncode: int | None = None
        self.pipes = True  # STDOUT is the frame channel (else it is logged like STDERR)
        self.exited: asyncio.Future[int] = loop.create_future()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stderr: LineLogger | None = None
        self._on_exit: list[Callable[[int], None]] = []
        self._exit_fd = exit_fd(popen)
        loop.add_reader(self._exit_fd, self._reap)

    @classmethod
    async def spawn(
        cls,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        pipes: bool,
        cwd: str | None = None,
    ) -> PhpProcess:
        loop = asyncio.get_running_loop()
        try:
            popen = subprocess.Popen(
                list(command),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                bufsize=0,
            )
        except FileNotFoundError as exc:
            raise AllocateError(
                f"cannot start worker: command not found: {command[0]!r} ({exc.strerror})"
            ) from None
        except PermissionError as exc:
            raise AllocateError(
                f"cannot start worker: {command[0]!r} is not executable ({exc.strerror})"
            ) from None
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise _too_many_files(command) from None
            raise AllocateError(f"cannot start worker {list(command)!r}: {exc}") from None
        try:
            proc = cls(popen, loop)
        except OSError as exc:  # no descriptor left to watch its exit
            popen.kill()
            popen.wait()
            for pipe in (popen.stdin, popen.stdout, popen.stderr):
                if pipe is not None:
                    pipe.close()
            if exc.errno in _NO_ROOM:
                raise _too_many_files(command) from None
            raise AllocateError(f"cannot watch worker {list(command)!r}: {exc}") from None
        proc.pipes = pipes
        assert popen.stderr is not None and popen.stdout is not None
        try:
            _, proto = await loop.connect_read_pipe(
                lambda: LineLogger(proc.pid, "stderr", proc.stderr_tail), popen.stderr
            )
            proc._stderr = proto
            if not pipes:
                await loop.connect_read_pipe(
                    lambda: LineLogger(proc.pid, "stdout", proc.stderr_tail), popen.stdout
                )
        except BaseException:
            proc.kill()  # cancelled (a pool being destroyed): leave no process behind
            raise
        return proc

    def add_exit_callback(self, callback: Callable[[int], None]) -> None:
        if self.returncode is not None:
            self.loop.call_soon(callback, self.returncode)
        else:
            self._on_exit.append(callback)

    def _reap(self) -> None:
        code = self.popen.poll()
        if code is None:  # spurious wake-up
            return
        self.loop.remove_reader(self._exit_fd)
        os.close(self._exit_fd)
        self.returncode = code
        self.exited.set_result(code)
        for callback in self._on_exit:
            callback(code)
        self._on_exit.clear()

    async def stderr_drained(self, timeout: float = 0.5) -> None:
        """Wait (briefly) until STDERR hit EOF, so its last lines are in the tail."""
        if self._stderr is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr.closed), timeout)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group."""
        self.signal(signal.SIGKILL)

    def signal(self, signum: int) -> None:
        if self.returncode is not None:
            return
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:  # the group is gone and the pid reused: signal the child only
            self.popen.send_signal(signum)

    def describe_exit(self) -> str:
        """'exited with status 3' / 'killed by SIGKILL', plus the last STDERR lines."""
        code = self.returncode
        what = "is still running" if code is None else exit_how(code)
        tail = "\n".join(self.stderr_tail)
        return f"worker pid {self.pid} {what}" + (
            f"; last {'STDERR' if self.pipes else 'output'} lines:\n{tail}" if tail else ""
        )
