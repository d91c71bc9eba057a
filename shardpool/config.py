"""Configuration: msgspec Structs with RoadRunner's pool keys, loaded from YAML.

A RoadRunner user can paste their ``pool:`` section. Durations accept
RoadRunner's strings (``"60s"``, ``"500ms"``, ``"1m30s"``) and numbers of
seconds. Unknown keys, wrong types and impossible values are rejected with a
message naming the key; nothing is silently coerced.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from shardpool.errors import ConfigError

BUNDLED_WORKERS = Path(__file__).resolve().parent.parent / "workers"
DEFAULT_WORKER = BUNDLED_WORKERS / "echo.php"
MAX_WORKERS = 1024


class Duration(float):
    """Seconds, parsed from ``"1h2m3s"``, ``"500ms"``, ``"2.5s"`` or a number."""


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(value: object) -> Duration:
    """Parse a Go-style duration or a number of seconds; reject negatives."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("expected a duration such as '60s', got an empty string")
        if text == "0":
            seconds = 0.0
        else:
            pos, seconds = 0, 0.0
            for match in _PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text):
                raise ValueError(f"invalid duration {value!r}: use e.g. '60s', '500ms', '1m30s'")
    else:
        raise ValueError(f"expected a duration such as '60s' or a number, got {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be a finite number of seconds, got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return Duration(seconds)


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


class SupervisorConfig(_Base):
    """Soft limits checked every ``watch_tick`` (0 disables a limit)."""

    watch_tick: Duration = Duration(1.0)
    ttl: Duration = Duration(0.0)
    idle_ttl: Duration = Duration(0.0)
    exec_ttl: Duration = Duration(0.0)
    max_worker_memory: NonNegInt = 0  # MB

    def __post_init__(self) -> None:
        if self.watch_tick <= 0:
            raise ValueError("supervisor.watch_tick must be greater than 0")


class DynamicAllocatorConfig(_Base):
    """Extra workers spawned when jobs find none free, removed when idle."""

    max_workers: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORKERS)] = 10
    spawn_rate: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORKERS)] = 1
    idle_timeout: Duration = Duration(60.0)


MAX_PIPELINE_DEPTH = 64  # jobs written into one worker's pipe at most
DEFAULT_BUSY_POLL = 50e-6  # the longest spin after writing a job (see shardpool.worker.busypoll)
MAX_BUSY_POLL = 0.01


class PoolConfig(_Base):
    """The static pool: RoadRunner's ``pool:`` keys plus ``command`` and ``relay``."""

    command: list[str] | str = msgspec.field(default_factory=lambda: ["php", str(DEFAULT_WORKER)])
    relay: str = "pipes"
    env: dict[str, str] = msgspec.field(default_factory=dict)
    num_workers: Annotated[int, msgspec.Meta(ge=0, le=MAX_WORKERS)] = 0  # 0: CPU count
    max_jobs: NonNegInt = 0
    max_queue_size: NonNegInt = 0  # 0: unbounded
    allocate_timeout: Duration = Duration(60.0)
    destroy_timeout: Duration = Duration(60.0)
    reset_timeout: Duration = Duration(60.0)
    stream_timeout: Duration = Duration(60.0)
    debug: bool = False
    pipeline_depth: Annotated[int, msgspec.Meta(ge=1, le=MAX_PIPELINE_DEPTH)] | Literal["auto"] = 1
    busy_poll: Duration = Duration(DEFAULT_BUSY_POLL)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    dynamic_allocator: DynamicAllocatorConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.command, str):
            self.command = shlex.split(self.command)
        if not self.command:
            raise ValueError("command must name the worker to run, e.g. 'php worker.php'")
        if self.num_workers == 0:
            self.num_workers = os.cpu_count() or 1
        if self.relay != "pipes" and not self.relay.startswith(("tcp://", "unix://")):
            raise ValueError(
                f"relay must be 'pipes', 'tcp://HOST:PORT' or 'unix:///PATH', got {self.relay!r}"
            )
        if self.allocate_timeout <= 0:
            raise ValueError("allocate_timeout must be greater than 0")
        if self.busy_poll > MAX_BUSY_POLL:
            raise ValueError(
                f"busy_poll is the longest spin after writing a job, at most "
                f"{MAX_BUSY_POLL * 1e3:g}ms "
                f"(e.g. '50us'; 0 turns it off), got {self.busy_poll:g}s"
            )

    @property
    def argv(self) -> list[str]:
        assert isinstance(self.command, list)
        return self.command


def default_backend() -> str:
    """A private ipc:// endpoint for local shards (owner-only directory)."""
    return f"ipc://{tempfile.gettempdir()}/shardpool-{os.getuid()}/backend-{os.getpid()}"


class CurveConfig(_Base):
    """CURVE on the broker's endpoints (``shardpool keys`` makes the key files).

    ``server_key``: the broker's ``.key_secret`` file. ``clients`` / ``shards``:
    a directory of allowed public keys (``*.key``), or one key file; an endpoint
    whose list is empty runs without CURVE.
    """

    server_key: str
    clients: str = ""
    shards: str = ""

    def __post_init__(self) -> None:
        for key in ("server_key", "clients", "shards"):
            path = getattr(self, key)
            if path and not os.path.exists(path):
                raise ValueError(f"{key} names no file or directory: {path}")
        if not (self.clients or self.shards):
            raise ValueError("give clients or shards (allowed public keys), or drop curve")


class ServeConfig(_Base):
    """``shardpool serve``: the broker, its shards, and the ``pool:`` each shard runs.

    Endpoints default to loopback and ``ipc://``; listening on other
    addresses is an explicit choice.
    """

    # Shards serve starts itself (default: CPU count); 0: only shards from other hosts.
    shards: Annotated[int, msgspec.Meta(ge=0, le=256)] | None = None
    frontend: str = "tcp://127.0.0.1:7400"
    backend: str = ""  # default: a private ipc:// path
    heartbeat: Duration = Duration(1.0)
    liveness: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    # Jobs per worker a shard may hold beyond those it can start at once, so its
    # PHP workers never wait for a round trip to the broker; a shard whose workers
    # are all stuck on slow jobs hands them back (docs/pool.md). 0: strict credit.
    prefetch: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 128
    # Pin each shard serve starts, with its PHP workers, to its own CPU(s), so a
    # shard and its workers hand jobs to each other on one CPU: cheap where waking
    # another CPU is dear (virtual machines). "auto": serve measures a hand-over
    # across CPUs and on one, and pins only where crossing is dear; false leaves
    # the kernel free to move a busy shard's workers to an idle CPU (docs/pool.md).
    pin_shards: bool | Literal["auto"] = "auto"
    max_queue_size: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    max_payload_size: Annotated[int, msgspec.Meta(ge=1)] = 64 * 1024 * 1024
    client_hwm: Annotated[int, msgspec.Meta(ge=1)] = 10_000  # replies queued per slow client
    control_timeout: Duration = Duration(10.0)
    drain_timeout: Duration = Duration(60.0)
    # Prometheus endpoint: "" (off), "PORT" or "HOST:PORT" (host defaults to loopback).
    metrics: str = ""
    curve: CurveConfig | None = None
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)

    def __post_init__(self) -> None:
        if self.shards is None:
            self.shards = os.cpu_count() or 1
        if not self.backend:
            self.backend = default_backend()
        for key in ("frontend", "backend"):
            address = getattr(self, key)
            if not address.startswith(("tcp://", "ipc://")):
                raise ValueError(f"{key} must be a tcp:// or ipc:// address, got {address!r}")
        if self.heartbeat <= 0:
            raise ValueError("heartbeat must be greater than 0")
        if self.metrics:
            metrics_address(self.metrics)  # raises ValueError naming what is wrong

    @property
    def max_message_size(self) -> int:
        # A message may batch many jobs; refuse only the absurd.
        return max(self.max_payload_size * 4, 256 * 1024 * 1024)


Config = ServeConfig


def metrics_address(text: str) -> tuple[str, int]:
    """``"9400"``, ``":9400"`` or ``"HOST:9400"`` -> (host, port); loopback by default."""
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"metrics must be PORT or HOST:PORT, got {text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"metrics port must be 1-65535, got {port}")
    return host, port


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Duration:
        return parse_duration(obj)
    raise NotImplementedError(f"cannot read a {type_.__name__}")


def convert(data: Any, type_: type[msgspec.Struct], where: str = "config") -> Any:
    """Build a config Struct from plain data, turning every mistake into ConfigError."""
    try:
        return msgspec.convert(data, type_, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid {where}: {_readable(str(exc))}") from None


def _readable(message: str) -> str:
    # msgspec says "... - at `$.pool.num_workers`"; name the key plainly.
    text, sep, path = message.rpartition(" - at ")
    if not sep:
        return message
    key = path.strip("`").removeprefix("$").lstrip(".") or "(top level)"
    return f"{key}: {text}"


def pool_config(data: dict[str, Any] | None = None, **overrides: Any) -> PoolConfig:
    """A PoolConfig from a mapping (a YAML ``pool:`` section) and keyword overrides."""
    merged = dict(data or {})
    merged.update(overrides)
    result: PoolConfig = convert(merged, PoolConfig, "pool config")
    return result


def serve_config(data: dict[str, Any] | None = None, **overrides: Any) -> ServeConfig:
    """A ServeConfig from a mapping and keyword overrides (None values are ignored)."""
    merged = dict(data or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    result: ServeConfig = convert(merged, ServeConfig, "config")
    return result


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a YAML file; a RoadRunner-style ``pool:`` section is the core of it."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    result: Config = convert(data, Config, f"config file {str(path)!r}")
    return result


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, float):  # Duration
        return float(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def to_builtins(config: msgspec.Struct) -> Any:
    """A config as plain dicts, lists and numbers (for merging and passing on)."""
    return msgspec.to_builtins(config, enc_hook=_enc_hook)


def to_json(config: msgspec.Struct) -> bytes:
    return msgspec.json.encode(config, enc_hook=_enc_hook)
