"""The worker state machine: RoadRunner's states, as an Enum with a transition table."""

from __future__ import annotations

from enum import StrEnum

from shardpool.errors import ShardpoolError


class WorkerState(StrEnum):
    INACTIVE = "inactive"  # spawned, handshake not done
    READY = "ready"  # idle, can take a job
    WORKING = "working"  # running a job
    INVALID = "invalid"  # takes no more jobs: broke the protocol or asked to be replaced
    STOPPING = "stopping"  # asked to stop, not exited yet
    STOPPED = "stopped"  # process exited after stop or kill
    DESTROYED = "destroyed"  # removed from its pool for good
    MAX_JOBS_REACHED = "max_jobs_reached"  # marks: retire once idle
    ERRORED = "errored"  # process died on its own
    IDLE_TTL_REACHED = "idle_ttl_reached"
    TTL_REACHED = "ttl_reached"
    MAX_MEMORY_REACHED = "max_memory_reached"
    EXEC_TTL_REACHED = "exec_ttl_reached"  # killed under a job that ran too long


S = WorkerState

# Soft-limit marks: a worker in one of these finishes the jobs it has, then retires.
MARKS = frozenset({S.MAX_JOBS_REACHED, S.IDLE_TTL_REACHED, S.TTL_REACHED, S.MAX_MEMORY_REACHED})
_ENDINGS = frozenset({S.INVALID, S.STOPPING, S.STOPPED, S.ERRORED, S.DESTROYED, S.EXEC_TTL_REACHED})

TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    S.INACTIVE: frozenset({S.READY}) | _ENDINGS - {S.EXEC_TTL_REACHED},
    S.READY: frozenset({S.WORKING}) | MARKS | _ENDINGS - {S.EXEC_TTL_REACHED},
    S.WORKING: frozenset({S.READY}) | MARKS - {S.IDLE_TTL_REACHED} | _ENDINGS,
    # The first mark wins; a marked worker only moves on to retirement.
    S.MAX_JOBS_REACHED: _ENDINGS,
    S.IDLE_TTL_REACHED: _ENDINGS - {S.EXEC_TTL_REACHED},
    S.TTL_REACHED: _ENDINGS,
    S.MAX_MEMORY_REACHED: _ENDINGS,
    S.INVALID: frozenset({S.STOPPING, S.STOPPED, S.ERRORED, S.DESTROYED}),
    S.EXEC_TTL_REACHED: frozenset({S.STOPPED, S.ERRORED, S.DESTROYED}),
    S.STOPPING: frozenset({S.STOPPED, S.ERRORED, S.DESTROYED}),
    S.ERRORED: frozenset({S.STOPPED, S.DESTROYED}),
    S.STOPPED: frozenset({S.DESTROYED}),
    S.DESTROYED: frozenset(),
}

# States in which the process is gone or going: no new job may be sent.
TERMINAL = frozenset({S.STOPPED, S.DESTROYED, S.ERRORED})


class IllegalTransitionError(ShardpoolError, RuntimeError):
    """A bug: code asked for a state change the table forbids."""


def check_transition(current: WorkerState, new: WorkerState) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransitionError(f"illegal worker state change: {current.value} -> {new.value}")
