"""How the broker splits a batch of queued jobs over shards with free room.

A pure function, so a property test: every job placed, no shard over its
room, and each job where the most room was (the room left is as even as the
split allows). The end-to-end spread of real jobs over real shards is in
test_service.py.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shardpool.broker.broker import _shares


@st.composite
def rooms_and_total(draw: st.DrawFn) -> tuple[list[int], int]:
    frees = draw(st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=8))
    return frees, draw(st.integers(min_value=0, max_value=sum(frees)))


@given(rooms_and_total())
def test_every_job_goes_where_the_most_room_is(case: tuple[list[int], int]) -> None:
    frees, total = case
    shares = _shares(frees, total)
    assert sum(shares) == total
    assert all(0 <= share <= free for share, free in zip(shares, frees, strict=True))
    left = [free - share for share, free in zip(shares, frees, strict=True)]
    for i, share in enumerate(shares):
        if share:
            # Before its last job, shard i had at least as much room as any shard has now.
            assert left[i] + 1 >= max(left), (frees, total, shares)


def test_two_equal_shards_split_a_batch_in_half() -> None:
    assert _shares([33, 33], 20) == [10, 10]
    assert _shares([33, 33], 21) in ([11, 10], [10, 11])


def test_the_emptier_shard_is_filled_first() -> None:
    assert _shares([30, 10], 16) == [16, 0]
    assert _shares([30, 10], 24) == [22, 2]
