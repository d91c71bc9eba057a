"""The worker state machine: RoadRunner's states and the transitions allowed between them."""

from __future__ import annotations

import pytest

from shardpool.errors import ShardpoolError
from shardpool.worker.state import (
    MARKS,
    TERMINAL,
    TRANSITIONS,
    IllegalTransitionError,
    WorkerState,
    check_transition,
)

S = WorkerState
ALL_PAIRS = [(a, b) for a in S for b in S]
LEGAL = [(a, b) for a, b in ALL_PAIRS if b in TRANSITIONS[a]]
ILLEGAL = [(a, b) for a, b in ALL_PAIRS if b not in TRANSITIONS[a]]


def pair_id(pair: tuple[WorkerState, WorkerState]) -> str:
    return f"{pair[0].value}->{pair[1].value}"


def test_every_state_has_a_transition_entry() -> None:
    assert set(TRANSITIONS) == set(S)


def test_transitions_only_name_states_of_the_enum() -> None:
    for targets in TRANSITIONS.values():
        assert targets <= set(S)


def test_no_state_transitions_to_itself() -> None:
    assert all(state not in TRANSITIONS[state] for state in S)


@pytest.mark.parametrize("pair", LEGAL, ids=pair_id)
def test_legal_transition_is_accepted(pair: tuple[WorkerState, WorkerState]) -> None:
    check_transition(*pair)


@pytest.mark.parametrize("pair", ILLEGAL, ids=pair_id)
def test_illegal_transition_raises(pair: tuple[WorkerState, WorkerState]) -> None:
    current, new = pair
    with pytest.raises(IllegalTransitionError, match=f"{current.value} -> {new.value}"):
        check_transition(current, new)


def test_illegal_transition_error_is_a_shardpool_error() -> None:
    assert issubclass(IllegalTransitionError, ShardpoolError)


def test_destroyed_is_final() -> None:
    assert TRANSITIONS[S.DESTROYED] == frozenset()


@pytest.mark.parametrize("state", [s for s in S if s is not S.DESTROYED], ids=lambda s: s.value)
def test_every_other_state_can_be_destroyed(state: WorkerState) -> None:
    check_transition(state, S.DESTROYED)


@pytest.mark.parametrize("mark", sorted(MARKS), ids=lambda s: s.value)
def test_marks_cannot_go_back_to_ready(mark: WorkerState) -> None:
    with pytest.raises(IllegalTransitionError):
        check_transition(mark, S.READY)


@pytest.mark.parametrize("mark", sorted(MARKS), ids=lambda s: s.value)
def test_marks_cannot_take_another_mark(mark: WorkerState) -> None:
    assert not TRANSITIONS[mark] & MARKS


@pytest.mark.parametrize("state", sorted(TERMINAL), ids=lambda s: s.value)
def test_terminal_states_never_serve_again(state: WorkerState) -> None:
    assert not TRANSITIONS[state] & {S.READY, S.WORKING, *MARKS}


def test_a_worker_becomes_ready_only_from_inactive_or_working() -> None:
    assert {s for s in S if S.READY in TRANSITIONS[s]} == {S.INACTIVE, S.WORKING}


def test_exec_ttl_is_reached_only_while_running_a_job() -> None:
    reaching = {s for s in S if S.EXEC_TTL_REACHED in TRANSITIONS[s]}
    assert S.WORKING in reaching
    assert not reaching & {S.INACTIVE, S.READY, S.IDLE_TTL_REACHED}


def test_idle_ttl_is_not_reached_while_working() -> None:
    with pytest.raises(IllegalTransitionError):
        check_transition(S.WORKING, S.IDLE_TTL_REACHED)
