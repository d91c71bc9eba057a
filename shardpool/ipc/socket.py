"""Workers that dial in over TCP or a unix socket (RR_RELAY=tcp://… / unix://…).

The factory listens once; each spawned worker connects, the server sends its
pid in a control frame, and the pid in the worker's reply pairs the
connection with the process that was spawned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from itertools import count
from typing import cast

from shardpool.errors import AllocateError, ConfigError, ShardpoolError
from shardpool.ipc.base import worker_env
from shardpool.protocol.decoder import FrameDecoder
from shardpool.protocol.frame import Frame, encode_control
from shardpool.worker.process import PhpProcess
from shardpool.worker.worker import FrameProtocol, Worker, parse_pid_reply

log = logging.getLogger("shardpool.ipc")
_socket_ids = count()


class _Pending:
    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.connected: asyncio.Future[None] = loop.create_future()


class _Connection(asyncio.Protocol):
    """An accepted connection: handshake first, then frames go to the worker."""

    def __init__(self, factory: SocketFactory) -> None:
        self.factory = factory
        self.decoder = FrameDecoder(max_payload=4096)
        self.transport: asyncio.Transport | None = None
        self.worker: Worker | None = None
        self.pid = 0  # the pid it gave, while it waits for that spawn to be registered
        self.frames: list[Frame] = []  # what it sent after its handshake reply, meanwhile

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.write(encode_control(json.dumps({"pid": os.getpid()}).encode()))

    def data_received(self, data: bytes) -> None:
        if self.worker is not None:
            self.worker.feed(data)
            return
        try:
            frames = self.decoder.feed(data)
            if self.pid:  # waiting to be paired
                self.frames += frames
                return
            if not frames:
                return
            pid = parse_pid_reply(frames[0])
        except ShardpoolError as exc:
            self.drop(f"dropped a {self.factory.relay} connection with a bad handshake: {exc}")
            return
        self.frames = frames[1:]
        pending = self.factory.pending.pop(pid, None)
        if pending is not None:
            self.pair(pending)
        elif self.factory.spawning:
            # A worker can dial in and answer before its spawn has even learnt
            # its pid (the process ran ahead of us): it waits for the spawn.
            self.pid = pid
            self.factory.early[pid] = self
        else:
            self.drop_stranger(pid)

    def pair(self, pending: _Pending) -> None:
        assert self.transport is not None
        self.worker = pending.worker
        self.worker.attach(self.transport, self.transport)
        # From here on the transport feeds the worker directly.
        self.transport.set_protocol(FrameProtocol(self.worker))
        pending.connected.set_result(None)
        self.worker.adopt(self.decoder, self.frames)
        self.frames = []

    def drop(self, why: str) -> None:
        log.warning("%s", why)
        assert self.transport is not None
        self.transport.close()

    def drop_stranger(self, pid: int) -> None:
        self.drop(f"dropped a connection from pid {pid}, which this pool did not spawn")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self.worker.channel_lost(exc)
        elif self.pid and self.factory.early.get(self.pid) is self:
            del self.factory.early[self.pid]


class SocketFactory:
    """Listens on ``address`` (``tcp://host:port`` with port 0 for any free
    port, or ``unix:///path``; ``unix://`` alone picks a temporary path)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.relay = address
        self.pending: dict[int, _Pending] = {}
        # Connections that answered with the pid of a spawn still under way.
        self.early: dict[int, _Connection] = {}
        self.spawning = 0
        self._server: asyncio.AbstractServer | None = None
        self._unix_path: str | None = None
        self._lock = asyncio.Lock()

    async def _listen(self) -> None:
        try:
            await self._bind()
        except OSError as exc:  # in use, no such directory, path too long, no permission
            raise ConfigError(
                f"relay {self.address!r}: cannot listen there: {exc.strerror or exc}"
            ) from None

    async def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        scheme, _, rest = self.address.partition("://")
        if scheme == "tcp":
            host, sep, port = rest.rpartition(":")
            if not sep or not port.isdigit():
                raise ConfigError(f"relay {self.address!r}: expected tcp://HOST:PORT")
            host = host.strip("[]") or "127.0.0.1"
            self._server = await loop.create_server(lambda: _Connection(self), host, int(port))
            bound = self._server.sockets[0].getsockname()
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            self.relay = f"tcp://{shown}:{bound[1]}"
        elif scheme == "unix":
            path = rest or os.path.join(
                tempfile.gettempdir(), f"shardpool-{os.getpid()}-{next(_socket_ids)}.sock"
            )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._server = await loop.create_unix_server(lambda: _Connection(self), path)
            self._unix_path = path
            self.relay = f"unix://{path}"
        else:
            raise ConfigError(
                f"relay {self.address!r}: expected 'pipes', 'tcp://HOST:PORT' or 'unix:///PATH'"
            )

    async def spawn(
        self,
        command: Sequence[str],
        *,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        max_jobs: int = 0,
    ) -> Worker:
        async with self._lock:
            if self._server is None:
                await self._listen()
        self.spawning += 1
        try:
            process = await PhpProcess.spawn(command, worker_env(self.relay, env), pipes=False)
            worker = Worker(process, self.relay, max_jobs)
            pending = _Pending(worker, asyncio.get_running_loop())
            early = self.early.pop(process.pid, None)
            if early is not None:
                early.pair(pending)  # it dialled in before we knew its pid
            else:
                self.pending[process.pid] = pending
        finally:
            self.spawning -= 1
            if not self.spawning:
                self._drop_early()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait(
                    (pending.connected, process.exited), return_when=asyncio.FIRST_COMPLETED
                )
        except asyncio.CancelledError:
            self.pending.pop(process.pid, None)
            worker.kill()  # the caller gave up (a pool being destroyed): leave no process
            raise
        except TimeoutError:
            self.pending.pop(process.pid, None)
            worker.kill()
            await process.exited
            raise AllocateError(
                f"worker pid {process.pid} did not connect to {self.relay} within {timeout:g}s"
            ) from None
        if not pending.connected.done():
            self.pending.pop(process.pid, None)
            await process.stderr_drained()
            raise AllocateError(
                f"worker failed at boot before connecting to {self.relay}: "
                f"{process.describe_exit()}"
            )
        worker.paired()
        return worker

    def _drop_early(self) -> None:
        """No spawn is under way: a connection still waiting is not one of ours."""
        early, self.early = self.early, {}
        for pid, connection in early.items():
            connection.drop_stranger(pid)

    async def close(self) -> None:
        self._drop_early()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
            self._unix_path = None
