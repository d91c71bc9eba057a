"""Every error shardpool raises, in one hierarchy.

Each class has a stable ``code`` (used on the wire by the client protocol) and a
message that names the cause and, where it helps, the fix.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable error codes, one per error class; never renumber or rename."""

    INTERNAL = "internal"
    CONFIG = "config"
    PROTOCOL = "protocol"
    SOFT_JOB = "soft_job"
    NO_FREE_WORKERS = "no_free_workers"
    QUEUE_FULL = "queue_full"
    EXEC_TTL = "exec_ttl"
    WORKER_CRASHED = "worker_crashed"
    ALLOCATE = "allocate"
    POOL_CLOSED = "pool_closed"
    EMPTY_PAYLOAD = "empty_payload"
    STREAM_TIMEOUT = "stream_timeout"
    WORKER_STOPPED = "worker_stopped"
    TIMEOUT = "timeout"
    SHARD_LOST = "shard_lost"
    BAD_REQUEST = "bad_request"
    UNAVAILABLE = "unavailable"


class ShardpoolError(Exception):
    """Base class of every error shardpool raises."""

    code: ErrorCode = ErrorCode.INTERNAL
    #: False when the job never reached a PHP worker (it was queued behind
    #: one that died): the pool may safely run it elsewhere.
    job_started: bool = True


class ConfigError(ShardpoolError, ValueError):
    """A configuration value is missing, of the wrong type or impossible."""

    code = ErrorCode.CONFIG


class ProtocolError(ShardpoolError):
    """The peer sent bytes that are not a valid goridge frame or message."""

    code = ErrorCode.PROTOCOL


class EmptyPayloadError(ShardpoolError, ValueError):
    """A job had neither body nor context; goridge cannot carry it."""

    code = ErrorCode.EMPTY_PAYLOAD


class SoftJobError(ShardpoolError):
    """The PHP worker answered the job with an error; the worker stays healthy."""

    code = ErrorCode.SOFT_JOB


class NoFreeWorkersError(ShardpoolError):
    """No worker became free within ``allocate_timeout``."""

    code = ErrorCode.NO_FREE_WORKERS


class QueueFullError(ShardpoolError):
    """``max_queue_size`` jobs were already waiting for a worker."""

    code = ErrorCode.QUEUE_FULL


class ExecTTLError(ShardpoolError):
    """The job ran past its exec TTL; the worker was killed."""

    code = ErrorCode.EXEC_TTL


class WorkerCrashedError(ShardpoolError):
    """The worker process died or broke its pipe while running the job."""

    code = ErrorCode.WORKER_CRASHED


class AllocateError(ShardpoolError):
    """A worker could not be started (bad command, fatal error at boot, no handshake)."""

    code = ErrorCode.ALLOCATE


class PoolClosedError(ShardpoolError):
    """The pool is being destroyed or was destroyed."""

    code = ErrorCode.POOL_CLOSED


class StreamTimeoutError(ShardpoolError):
    """A cancelled stream did not end within ``stream_timeout``; the worker was killed."""

    code = ErrorCode.STREAM_TIMEOUT


class WorkerStoppedError(ShardpoolError):
    """The worker asked to be replaced instead of answering (a stop request).

    The pool catches this and runs the job again on another worker; a caller
    using a bare worker sees it.
    """

    code = ErrorCode.WORKER_STOPPED


class JobTimeoutError(ShardpoolError):
    """The job's deadline passed before a worker could start it; it never ran."""

    code = ErrorCode.TIMEOUT
    job_started = False


class ShardLostError(ShardpoolError):
    """The shard running the job died or stopped answering; the job's fate is unknown."""

    code = ErrorCode.SHARD_LOST


class BadRequestError(ShardpoolError):
    """The message was malformed, of an unknown kind or version, or too large."""

    code = ErrorCode.BAD_REQUEST


class UnavailableError(ShardpoolError):
    """The service is shutting down, or no broker answered in time."""

    code = ErrorCode.UNAVAILABLE


ERRORS_BY_CODE: dict[ErrorCode, type[ShardpoolError]] = {
    cls.code: cls
    for cls in (
        ShardpoolError,
        ConfigError,
        ProtocolError,
        EmptyPayloadError,
        SoftJobError,
        NoFreeWorkersError,
        QueueFullError,
        ExecTTLError,
        WorkerCrashedError,
        AllocateError,
        PoolClosedError,
        StreamTimeoutError,
        WorkerStoppedError,
        JobTimeoutError,
        ShardLostError,
        BadRequestError,
        UnavailableError,
    )
}


def error_from_code(code: str, message: str) -> ShardpoolError:
    """Rebuild a typed error from its wire code (unknown codes give the base class)."""
    try:
        cls = ERRORS_BY_CODE[ErrorCode(code)]
    except ValueError:
        cls = ShardpoolError
    return cls(message)
