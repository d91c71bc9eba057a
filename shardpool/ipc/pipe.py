"""Workers over their STDIN/STDOUT pipes (RR_RELAY=pipes), RoadRunner's default."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
from collections.abc import Mapping, Sequence

from shardpool.ipc.base import worker_env
from shardpool.worker.process import PhpProcess
from shardpool.worker.worker import FrameProtocol, Worker

PIPE_SIZE = 1 << 20  # bytes: a 64 KiB job and its reply cross in one write and one read


def _grow_pipe(fd: int) -> None:
    """Enlarge a pipe's kernel buffer (Linux); fewer, larger reads and writes."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class _WriteSide(asyncio.BaseProtocol):
    """The STDIN pipe; a broken pipe shows up on the read side and the exit."""


class PipeFactory:
    relay = "pipes"

    async def spawn(
        self,
        command: Sequence[str],
        *,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        max_jobs: int = 0,
    ) -> Worker:
        """Spawn ``command``, connect its pipes and do the pid handshake.

        Raises :class:`~shardpool.errors.AllocateError` (or ``ProtocolError``
        for output that is not frames) naming the cause when the worker cannot
        start.
        """
        loop = asyncio.get_running_loop()
        process = await PhpProcess.spawn(command, worker_env(self.relay, env), pipes=True)
        worker = Worker(process, self.relay, max_jobs)
        assert process.popen.stdout is not None and process.popen.stdin is not None
        for pipe in (process.popen.stdin, process.popen.stdout):
            _grow_pipe(pipe.fileno())
        try:
            reader, _ = await loop.connect_read_pipe(
                lambda: FrameProtocol(worker), process.popen.stdout
            )
            writer, _ = await loop.connect_write_pipe(_WriteSide, process.popen.stdin)
            worker.attach(writer, reader)
            await worker.handshake(timeout)
        except asyncio.CancelledError:
            worker.kill()  # the caller gave up (a pool being destroyed): leave no process
            raise
        return worker

    async def close(self) -> None:
        return None
