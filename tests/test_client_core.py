"""ClientCore, the sans-IO half of the client: ids, batching, routing, errors, time.

No sockets: messages are fed in and taken out as bytes, and time is a fake
clock the tests move by hand, so every rule is checked exactly and fast.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from shardpool import wire
from shardpool.client import MAX_BATCH_BYTES, MAX_BATCH_JOBS, ClientCore, MapWindow, to_payload
from shardpool.errors import (
    ERRORS_BY_CODE,
    BadRequestError,
    ConfigError,
    ErrorCode,
    JobTimeoutError,
    ShardpoolError,
    SoftJobError,
    UnavailableError,
)
from shardpool.payload import Payload


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(clock: Clock) -> ClientCore:
    return ClientCore(clock=clock, grace=1.0, heartbeat=5.0)


def sent(core: ClientCore) -> list[wire.Submit | wire.Control | wire.Cancel]:
    """Everything the core wants on the wire, decoded as the broker would."""
    frames = core.outbox()
    out = [wire.client_decoder.decode(frame) for frame in frames]
    frames.clear()
    return out


def sent_jobs(core: ClientCore) -> list[list[int]]:
    """The ids of the jobs in each ``jobs`` message sent."""
    return [[j.id for j in m.jobs] for m in sent(core) if isinstance(m, wire.Submit)]


def replies(*items: wire.Reply) -> bytes:
    return wire.encode(wire.Replies(replies=list(items)))


def job(core: ClientCore, body: bytes = b"x", **kwargs: Any) -> Any:
    return core.submit(Payload(body), **kwargs)


# -- ids and batching ------------------------------------------------------------


def test_ids_start_at_one_and_are_shared_by_jobs_and_commands(core: ClientCore) -> None:
    ids = [job(core).id, core.control("stats").id, job(core, stream=True).id]
    assert ids == [1, 2, 3]  # 0 is the broker's "cannot tell which request"


def test_jobs_queued_together_leave_in_one_message(core: ClientCore) -> None:
    requests = [job(core) for _ in range(5)]
    assert sent_jobs(core) == [[r.id for r in requests]]


def test_a_lone_job_leaves_in_a_message_of_its_own(core: ClientCore) -> None:
    first = job(core)
    assert sent_jobs(core) == [[first.id]]
    second = job(core)
    assert sent_jobs(core) == [[second.id]]
    assert not core.wants_send


def test_defaults_are_left_off_the_wire(core: ClientCore) -> None:
    job(core, b"hello")
    (frame,) = core.outbox()
    assert msgspec.msgpack.decode(frame) == {"t": "jobs", "jobs": [{"id": 1, "body": b"hello"}]}


def test_job_fields_reach_the_wire(core: ClientCore) -> None:
    core.submit(Payload(b"b", context=b"c"), timeout=2.5, stream=True)
    (message,) = sent(core)
    assert isinstance(message, wire.Submit)
    assert message.v == wire.VERSION
    assert message.jobs == [wire.Job(1, b"b", b"c", 2.5, True)]


def test_the_clients_default_timeout_is_sent_with_each_job(clock: Clock) -> None:
    core = ClientCore(clock=clock, timeout=7.0)
    job(core)
    job(core, timeout=1.0)
    (message,) = sent(core)
    assert isinstance(message, wire.Submit)
    assert [j.timeout for j in message.jobs] == [7.0, 1.0]


def test_a_batch_is_split_at_max_batch_jobs(core: ClientCore) -> None:
    for _ in range(MAX_BATCH_JOBS + 1):
        job(core)
    assert [len(ids) for ids in sent_jobs(core)] == [MAX_BATCH_JOBS, 1]


def test_a_batch_is_split_at_max_batch_bytes(core: ClientCore) -> None:
    chunk = b"x" * (MAX_BATCH_BYTES // 3 + 1)
    for _ in range(4):
        job(core, chunk)
    assert [len(ids) for ids in sent_jobs(core)] == [2, 2]


def test_a_job_bigger_than_a_batch_goes_alone(core: ClientCore) -> None:
    job(core)
    job(core, b"x" * (MAX_BATCH_BYTES + 1))
    job(core)
    assert sent_jobs(core) == [[1], [2], [3]]


def test_a_control_command_is_a_message_of_its_own(core: ClientCore) -> None:
    request = core.control("workers")
    job(core)
    messages = sent(core)
    assert wire.Control(id=request.id, cmd="workers") in messages
    assert len(messages) == 2


# -- routing -----------------------------------------------------------------------


def test_replies_reach_their_requests_in_any_order(core: ClientCore) -> None:
    a, b, c = job(core, b"a"), job(core, b"b"), job(core, b"c")
    core.outbox().clear()
    core.receive(replies(wire.Reply(c.id, b"C"), wire.Reply(a.id, b"A", b"ctx")))
    assert a.result() == Payload(b"A", b"ctx")
    assert c.result().body == b"C"
    assert not b.ready
    core.receive(replies(wire.Reply(b.id, b"B")))
    assert b.result().body == b"B"
    assert core.in_flight == 0


def test_a_reply_for_an_unknown_id_is_ignored(core: ClientCore) -> None:
    request = job(core)
    core.receive(replies(wire.Reply(999, b"stray"), wire.Reply(request.id, b"mine")))
    assert request.result().body == b"mine"


def test_a_control_reply_carries_its_data(core: ClientCore) -> None:
    request = core.control("stats")
    data = {"jobs_done": 3, "shards": {"shard-0": {"in_flight": 1}}}
    core.receive(replies(wire.Reply(request.id, data=data)))
    assert request.control_data() == data


def test_the_waker_is_called_once_when_news_arrives(core: ClientCore) -> None:
    request = job(core, stream=True)
    calls: list[int] = []
    request.waker = lambda: calls.append(1)
    core.receive(replies(wire.Reply(request.id, b"1", more=True), wire.Reply(request.id, b"2")))
    assert calls == [1]
    assert request.waker is None


def test_a_malformed_message_is_ignored(core: ClientCore) -> None:
    request = job(core)
    core.receive(b"\xc1 not msgpack")
    core.receive(wire.encode(wire.Submit()))  # a message type the broker never sends
    assert not request.ready


def test_a_message_of_another_protocol_version_is_ignored(core: ClientCore) -> None:
    request = job(core)
    core.receive(wire.encode(wire.Replies(v=2, replies=[wire.Reply(request.id, b"x")])))
    assert not request.ready


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_an_error_reply_raises_the_error_class_of_its_code(
    core: ClientCore, code: ErrorCode
) -> None:
    request = job(core)
    core.receive(replies(wire.Reply(request.id, code=code.value, error="the cause")))
    with pytest.raises(ERRORS_BY_CODE[code], match="the cause") as info:
        request.result()
    assert info.value.code is code


def test_the_brokers_timeout_code_is_a_job_timeout_error(core: ClientCore) -> None:
    request = job(core, timeout=1.0)
    core.receive(replies(wire.Reply(request.id, code="timeout", error="it never ran")))
    with pytest.raises(JobTimeoutError):
        request.result()


def test_an_unknown_error_code_raises_the_base_error(core: ClientCore) -> None:
    request = job(core)
    core.receive(replies(wire.Reply(request.id, code="from_the_future", error="new")))
    with pytest.raises(ShardpoolError, match="new") as info:
        request.result()
    assert type(info.value) is ShardpoolError


def test_an_error_without_a_message_names_its_code(core: ClientCore) -> None:
    request = job(core)
    core.receive(replies(wire.Reply(request.id, code="queue_full")))
    with pytest.raises(ShardpoolError, match="queue_full"):
        request.result()


def test_a_failed_control_command_raises(core: ClientCore) -> None:
    request = core.control("frobnicate")
    core.receive(replies(wire.Reply(request.id, code="bad_request", error="unknown command")))
    with pytest.raises(BadRequestError, match="unknown command"):
        request.control_data()


def test_an_unattributed_error_fails_every_sent_request(core: ClientCore) -> None:
    # id 0: the broker could not read one of our messages, nor say which.
    first, second = job(core), core.control("stats")
    core.outbox().clear()
    queued = job(core)
    core.receive(replies(wire.Reply(0, code="bad_request", error="malformed message")))
    for request in (first, second):
        with pytest.raises(BadRequestError, match=r"could not read a message.*malformed"):
            request.control_data()
    assert not queued.ready
    assert wire.Cancel(ids=[first.id]) in sent(core)


# -- streams -----------------------------------------------------------------------


def test_stream_chunks_come_in_order_then_the_final_one(core: ClientCore) -> None:
    request = job(core, stream=True)
    core.receive(replies(wire.Reply(request.id, b"0", more=True)))
    core.receive(replies(wire.Reply(request.id, b"1", more=True), wire.Reply(request.id, b"end")))
    assert request.done
    assert [request.take(), request.take(), request.take()] == [
        Payload(b"0"),
        Payload(b"1"),
        Payload(b"end"),
    ]
    assert request.take() is None


def test_a_stream_error_is_raised_after_the_chunks_before_it(core: ClientCore) -> None:
    request = job(core, stream=True)
    core.receive(
        replies(
            wire.Reply(request.id, b"0", more=True),
            wire.Reply(request.id, code="worker_crashed", error="died"),
        )
    )
    assert request.take() == Payload(b"0")
    with pytest.raises(ShardpoolError, match="died"):
        request.take()


def test_a_partial_stream_is_ready_but_not_done(core: ClientCore) -> None:
    request = job(core, stream=True)
    core.receive(replies(wire.Reply(request.id, b"0", more=True)))
    assert request.ready and not request.done
    assert request.take() == Payload(b"0")
    assert not request.ready


def test_a_chunk_for_a_job_that_is_not_a_stream_is_ignored(core: ClientCore) -> None:
    request = job(core)
    core.receive(replies(wire.Reply(request.id, b"chunk", more=True)))
    assert not request.ready
    core.receive(replies(wire.Reply(request.id, b"result")))
    assert request.result().body == b"result"


# -- cancel ------------------------------------------------------------------------


def test_cancelling_a_queued_job_sends_nothing(core: ClientCore) -> None:
    keep, drop = job(core), job(core)
    core.cancel(drop)
    assert sent_jobs(core) == [[keep.id]]
    assert drop.done


def test_cancelling_a_sent_job_sends_a_cancel(core: ClientCore) -> None:
    request = job(core, stream=True)
    core.outbox().clear()
    core.cancel(request)
    assert sent(core) == [wire.Cancel(ids=[request.id])]


def test_cancels_made_together_leave_in_one_message(core: ClientCore) -> None:
    a, b = job(core), job(core)
    core.outbox().clear()
    core.cancel(a)
    core.cancel(b)
    assert sent(core) == [wire.Cancel(ids=[a.id, b.id])]


def test_a_reply_after_a_cancel_is_ignored(core: ClientCore) -> None:
    request = job(core, stream=True)
    core.outbox().clear()
    core.cancel(request)
    core.receive(replies(wire.Reply(request.id, b"late", more=True), wire.Reply(request.id)))
    with pytest.raises(UnavailableError, match="cancelled"):
        request.take()
    assert core.in_flight == 0


def test_cancelling_a_finished_request_does_nothing(core: ClientCore) -> None:
    request = job(core)
    core.outbox().clear()
    core.receive(replies(wire.Reply(request.id, b"done")))
    core.cancel(request)
    assert not core.wants_send
    assert request.result().body == b"done"


def test_a_sent_control_command_is_not_cancelled_on_the_wire(core: ClientCore) -> None:
    request = core.control("reset")
    core.outbox().clear()
    core.cancel(request)
    assert not core.wants_send


# -- time --------------------------------------------------------------------------


def test_a_request_fails_when_its_timeout_and_grace_pass(core: ClientCore, clock: Clock) -> None:
    request = job(core, timeout=2.0)
    core.outbox().clear()
    clock.advance(2.9)
    core.tick()
    assert not request.ready
    clock.advance(0.1)
    core.tick()
    with pytest.raises(UnavailableError, match=r"within 3s \(the job's timeout of 2s"):
        request.result()
    assert sent(core) == [wire.Cancel(ids=[request.id])]


def test_a_reply_in_time_beats_the_deadline(core: ClientCore, clock: Clock) -> None:
    request = job(core, timeout=2.0)
    core.receive(replies(wire.Reply(request.id, b"ok")))
    clock.advance(10)
    core.tick()
    assert request.result().body == b"ok"


def test_next_deadline_is_the_earliest_of_requests_and_heartbeat(
    core: ClientCore, clock: Clock
) -> None:
    assert core.next_deadline() is None  # idle: nothing to wait for
    job(core, timeout=10.0)
    assert core.next_deadline() == clock.now + 5.0  # the heartbeat comes first
    job(core, timeout=1.0)
    assert core.next_deadline() == clock.now + 2.0  # 1s + 1s grace


def test_requests_with_different_timeouts_each_expire_at_their_own_deadline(
    core: ClientCore, clock: Clock
) -> None:
    long_first = job(core, timeout=5.0)
    short = job(core, timeout=1.0)  # made later, due earlier
    long_second = job(core, timeout=5.0)
    assert core.next_deadline() == clock.now + 2.0  # 1s + 1s grace
    clock.advance(2.0)
    core.tick()
    assert (short.done, long_first.done, long_second.done) == (True, False, False)
    clock.advance(4.0)
    core.tick()
    assert long_first.done and long_second.done
    with pytest.raises(UnavailableError, match="within 6s"):
        long_second.result()


def test_finished_requests_do_not_pile_up_among_the_deadlines(core: ClientCore) -> None:
    for _ in range(1000):
        request = job(core, timeout=60.0)
        core.receive(replies(wire.Reply(request.id)))
    assert len(core._deadlines) < 100


def test_a_silent_broker_is_pinged_after_the_heartbeat(core: ClientCore, clock: Clock) -> None:
    job(core)
    core.outbox().clear()
    clock.advance(4.9)
    core.tick()
    assert not core.wants_send
    clock.advance(0.1)
    core.tick()
    (ping,) = sent(core)
    assert isinstance(ping, wire.Control) and ping.cmd == "ping"


def test_a_broker_that_ignores_the_ping_fails_every_request(core: ClientCore, clock: Clock) -> None:
    requests = [job(core), core.control("workers")]
    clock.advance(5.0)
    core.tick()  # ping
    clock.advance(5.0)
    core.tick()
    for request in requests:
        with pytest.raises(UnavailableError, match="not even to a ping"):
            request.control_data()
    assert core.in_flight == 0


def test_any_message_from_the_broker_answers_the_ping(core: ClientCore, clock: Clock) -> None:
    request = job(core)
    clock.advance(5.0)
    core.tick()
    ping = next(m for m in sent(core) if isinstance(m, wire.Control))
    clock.advance(4.0)
    core.receive(replies(wire.Reply(ping.id, data="pong")))  # no Request: ignored, but heard
    clock.advance(4.0)
    core.tick()
    assert not request.ready


def test_an_idle_client_never_pings(core: ClientCore, clock: Clock) -> None:
    clock.advance(60.0)
    core.tick()
    assert not core.wants_send


def test_a_lost_connection_fails_sent_requests_and_keeps_queued_ones(core: ClientCore) -> None:
    gone = job(core)
    core.outbox()  # encoded: may have reached the broker
    queued = job(core)
    core.connection_lost("disconnected")
    with pytest.raises(UnavailableError, match=r"lost the connection.*fate is unknown"):
        gone.result()
    assert sent_jobs(core) == [[queued.id]]  # the old frame was discarded


# -- local refusals and closing ----------------------------------------------------


def test_an_oversize_job_is_refused_before_it_is_sent(clock: Clock) -> None:
    core = ClientCore(clock=clock, max_payload=10)
    with pytest.raises(BadRequestError, match="max_payload"):
        core.submit(Payload(b"x" * 6, b"y" * 5))
    assert not core.wants_send and core.in_flight == 0


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_a_timeout_must_be_positive(core: ClientCore, timeout: float) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        job(core, timeout=timeout)


def test_close_fails_every_request_and_refuses_new_ones(core: ClientCore) -> None:
    sent_job = job(core)
    core.outbox().clear()
    queued = job(core)
    core.close()
    for request in (sent_job, queued):
        with pytest.raises(UnavailableError, match="closed"):
            request.result()
    assert sent(core) == [wire.Cancel(ids=[sent_job.id])]
    with pytest.raises(UnavailableError, match="closed"):
        job(core)


def test_to_payload_takes_bytes_or_a_payload() -> None:
    assert to_payload(b"b", b"c") == Payload(b"b", b"c")
    assert to_payload(Payload(b"b", b"c")) == Payload(b"b", b"c")
    with pytest.raises(TypeError, match="encode text"):
        to_payload("text")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not both"):
        to_payload(Payload(b"b"), b"c")


def test_submit_bytes_sends_what_exec_is_given_and_refuses_the_rest(core: ClientCore) -> None:
    a = core.submit_bytes(b"body", b"ctx")
    b = core.submit_bytes(Payload(b"pb", b"pc"))
    assert sent(core) == [
        wire.Submit(jobs=[wire.Job(a.id, b"body", b"ctx"), wire.Job(b.id, b"pb", b"pc")])
    ]
    with pytest.raises(TypeError, match="encode text"):
        core.submit_bytes("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="encode text"):
        core.submit_bytes(b"body", "text")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not both"):
        core.submit_bytes(Payload(b"b"), b"c")
    assert core.in_flight == 2  # nothing refused was registered


# -- map ---------------------------------------------------------------------------


def answer(core: ClientCore, *ids: int) -> None:
    core.receive(replies(*(wire.Reply(i, b"r%d" % i) for i in ids)))


def test_map_keeps_at_most_window_jobs_in_flight(core: ClientCore) -> None:
    window = MapWindow(core, [b"%d" % i for i in range(10)], 4, None, False)
    head = window.head()
    assert head is not None and head.id == 1
    assert sent_jobs(core) == [[1, 2, 3, 4]]


def test_map_tops_up_the_window_in_one_message(core: ClientCore) -> None:
    window = MapWindow(core, [b"%d" % i for i in range(10)], 4, None, False)
    window.head()
    core.outbox().clear()
    answer(core, 1, 2, 3)
    taken = []
    while (head := window.head()) is not None and head.ready:
        taken.append(window.pop())
    assert [p.body for p in taken if isinstance(p, Payload)] == [b"r1", b"r2", b"r3"]
    assert sent_jobs(core) == [[5, 6, 7]]  # the three freed slots, together


def test_map_yields_in_input_order(core: ClientCore) -> None:
    window = MapWindow(core, [b"a", b"b", b"c"], 8, None, False)
    window.head()
    answer(core, 3, 2)
    head = window.head()
    assert head is not None and not head.ready  # job 1 holds the line
    answer(core, 1)
    assert [window.pop(), window.pop(), window.pop()] == [
        Payload(b"r1"),
        Payload(b"r2"),
        Payload(b"r3"),
    ]
    assert window.head() is None


def test_map_raises_the_first_error(core: ClientCore) -> None:
    window = MapWindow(core, [b"a", b"b"], 8, None, False)
    window.head()
    core.receive(replies(wire.Reply(1, code="soft_job", error="no"), wire.Reply(2, b"ok")))
    with pytest.raises(SoftJobError):
        window.pop()


def test_map_returns_errors_in_place_when_asked(core: ClientCore) -> None:
    window = MapWindow(core, [b"a", b"b"], 8, None, True)
    window.head()
    core.receive(replies(wire.Reply(1, code="soft_job", error="no"), wire.Reply(2, b"ok")))
    first, second = window.pop(), window.pop()
    assert isinstance(first, SoftJobError)
    assert second == Payload(b"ok")


def test_map_refuses_an_oversize_job_in_its_place(clock: Clock) -> None:
    core = ClientCore(clock=clock, max_payload=4)
    window = MapWindow(core, [b"ok", b"too big", b"ok"], 8, None, True)
    window.head()
    answer(core, 1, 2)
    results = [window.pop() for _ in range(3)]
    assert isinstance(results[1], BadRequestError)
    assert [r for i, r in enumerate(results) if i != 1] == [Payload(b"r1"), Payload(b"r2")]


def test_map_close_cancels_the_jobs_not_taken(core: ClientCore) -> None:
    window = MapWindow(core, iter([b"a", b"b", b"c"]), 2, None, False)
    window.head()
    core.outbox().clear()
    window.close()
    assert sent(core) == [wire.Cancel(ids=[1, 2])]
    assert core.in_flight == 0


def test_map_sends_each_jobs_timeout(core: ClientCore) -> None:
    MapWindow(core, [b"a", Payload(b"b", b"c")], 8, 3.0, False).head()
    (message,) = sent(core)
    assert isinstance(message, wire.Submit)
    assert [(j.body, j.ctx, j.timeout) for j in message.jobs] == [
        (b"a", b"", 3.0),
        (b"b", b"c", 3.0),
    ]
