"""Hostile and bad input: client messages a broker must survive, worker output a shard must.

Raw ZeroMQ messages go to a live ``shardpool serve``. Each gets an error reply
where one can be sent (with the code a client would act on), is counted in
``stats``, and leaves the broker answering a normal client at once. Cases
already covered by tests/test_service.py (garbage, an array, version 2, an
unknown type or command, a str id, a 65 MiB job) are not repeated here.

Workers that break the goridge protocol (workers/bad_output.php) fail their
job with a ProtocolError showing what they wrote, and are replaced. The
decoder itself is tested byte by byte in tests/test_protocol.py; here the
point is what a client of the service sees.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import psutil
import pytest
import yaml
import zmq
from conftest import WORKERS, Service
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardpool.client import Client
from shardpool.errors import ErrorCode, ProtocolError

MAX_PAYLOAD = 4096
KNOWN_CODES = {code.value for code in ErrorCode}


# -- one service for the module -------------------------------------------------


@pytest.fixture(autouse=True)
def no_leaked_php() -> Iterator[None]:
    """The module shares one service, whose workers live across tests; the
    ``service`` fixture checks for leaked PHP processes when it stops."""
    yield


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("hostile")
    config = tmp / "serve.yaml"
    config.write_text(yaml.safe_dump({"max_payload_size": MAX_PAYLOAD}))
    svc = Service(
        tmp, "-c", str(config), "--shards", "1", "--workers", "2",
        "--worker", str(WORKERS / "bad_output.php"),
    )  # fmt: skip
    try:
        yield svc
    finally:
        svc.stop_leaving_no_php()


class Raw:
    """A bare DEALER socket: sends any frames, reads replies with bounded waits."""

    def __init__(self, address: str) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def replies(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The next ``count`` replies (bounded); each message must be a valid ``replies`` map."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(int(left * 1000)), f"only {len(out)} of {count}"
            frames = self.sock.recv_multipart()
            assert len(frames) == 1, frames
            message = msgspec.msgpack.decode(frames[0])
            assert message["t"] == "replies"
            for reply in message["replies"]:
                assert reply.get("code", "") in KNOWN_CODES | {""}, reply
                out.append(reply)
        return out

    def silent(self, wait: float = 0.3) -> bool:
        return not self.sock.poll(int(wait * 1000))

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw(service: Service) -> Iterator[Raw]:
    sock = Raw(service.address)
    yield sock
    sock.close()


def stats(service: Service) -> dict[str, Any]:
    with Client(service.address, timeout=10) as client:
        return client.stats()


def still_answers(service: Service) -> None:
    with Client(service.address, timeout=10) as client:
        assert client.exec(b"still here").body == b"still here"


def pack(message: Any) -> bytes:
    return msgspec.msgpack.encode(message)


# -- client messages ------------------------------------------------------------

JOB = {"id": 5, "body": b"x"}

UNREADABLE = {
    "truncated": pack({"t": "jobs", "jobs": [JOB, JOB]})[:-3],
    "empty-frame": b"",
    "not-a-map": pack("jobs"),
    "int-keys": pack({1: "jobs"}),
    "no-type": pack({"jobs": [JOB]}),
    "job-without-id": pack({"t": "jobs", "jobs": [{"body": b"x"}]}),
    "str-body": pack({"t": "jobs", "jobs": [{"id": 5, "body": "x"}]}),
    "timeout-as-text": pack({"t": "jobs", "jobs": [{"id": 5, "body": b"x", "timeout": "1s"}]}),
    "stream-as-int": pack({"t": "jobs", "jobs": [{"id": 5, "body": b"x", "stream": 1}]}),
    "jobs-not-a-list": pack({"t": "jobs", "jobs": {"id": 5}}),
    "id-over-64-bits": b"\x82\xa1t\xa4jobs\xa4jobs\x91\x81\xa2id\xcf" + b"\xff" * 8 + b"\x00",
    "cancel-ids-as-text": pack({"t": "cancel", "ids": "1,2"}),
    "version-as-text": pack({"v": "1", "t": "jobs", "jobs": [JOB]}),
    "str-not-utf8": b"\x81\xa1t\xa2\xff\xfe",  # {"t": <2 bytes that are not UTF-8>}
    "cmd-not-utf8": b"\x82\xa1t\xa7control\xa3cmd\xa2\xc3\x28",
}


@pytest.mark.parametrize("data", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_unreadable_message_gets_bad_request_under_id_0_and_is_counted(
    service: Service, raw: Raw, data: bytes
) -> None:
    before = stats(service)["bad_messages"]
    raw.send(data)
    (reply,) = raw.replies(1)
    assert reply["id"] == 0 and reply["code"] == "bad_request", reply
    assert reply["error"].startswith(("malformed message", "unsupported protocol version"))
    assert raw.silent()  # one reply, not one per job in it
    assert stats(service)["bad_messages"] == before + 1
    still_answers(service)


REFUSED_JOBS = {
    "over-max-payload": ({"id": 7, "body": b"x" * MAX_PAYLOAD, "ctx": b"c"}, "bad_request"),
    "empty": ({"id": 7}, "empty_payload"),
    "negative-timeout": ({"id": 7, "body": b"x", "timeout": -1.0}, "bad_request"),
}


@pytest.mark.parametrize(("job", "code"), REFUSED_JOBS.values(), ids=REFUSED_JOBS.keys())
def test_refused_job_gets_its_own_error_and_the_rest_of_its_batch_runs(
    service: Service, raw: Raw, job: dict[str, Any], code: str
) -> None:
    raw.send(
        pack({"t": "jobs", "jobs": [{"id": 6, "body": b"before"}, job, {"id": 8, "ctx": b"c"}]})
    )
    replies = {r["id"]: r for r in raw.replies(3)}
    assert replies[7]["code"] == code
    assert replies[6].get("body") == b"before" and not replies[6].get("code")
    assert replies[8].get("ctx") == b"c" and not replies[8].get("code")


def test_oversize_job_error_names_the_limit(service: Service, raw: Raw) -> None:
    raw.send(pack({"t": "jobs", "jobs": [{"id": 3, "body": b"y" * (MAX_PAYLOAD + 1)}]}))
    (reply,) = raw.replies(1)
    assert reply["code"] == "bad_request"
    assert f"{MAX_PAYLOAD + 1} bytes exceeds max_payload_size ({MAX_PAYLOAD})" in reply["error"]


def test_control_without_a_command_is_an_unknown_command_under_its_id(
    service: Service, raw: Raw
) -> None:
    before = stats(service)["bad_messages"]
    raw.send(pack({"t": "control", "id": 9}))
    (reply,) = raw.replies(1)
    assert reply["id"] == 9 and reply["code"] == "bad_request"
    assert "unknown command ''" in reply["error"]
    assert stats(service)["bad_messages"] == before + 1


@pytest.mark.parametrize("frames", [2, 3, 50])
def test_message_of_several_frames_is_dropped_counted_and_harmless(
    service: Service, raw: Raw, frames: int
) -> None:
    before = stats(service)["bad_messages"]
    raw.send(*[pack({"t": "jobs", "jobs": [JOB]})] * frames)
    assert raw.silent(), "the protocol has no reply for a message of several frames"
    assert stats(service)["bad_messages"] == before + 1
    still_answers(service)


def test_req_socket_job_is_dropped_not_run(service: Service) -> None:
    """A REQ socket adds an empty delimiter frame: two frames, so no reply."""
    before = stats(service)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(service.address)
    try:
        sock.send(pack({"t": "jobs", "jobs": [JOB]}))
        assert not sock.poll(300)
    finally:
        sock.close()
    after = stats(service)
    assert after["bad_messages"] == before["bad_messages"] + 1
    assert after["jobs_done"] == before["jobs_done"]


def test_thousands_of_empty_frames_are_each_answered_and_never_stall_the_broker(
    service: Service, raw: Raw
) -> None:
    before = stats(service)["bad_messages"]
    for _ in range(5000):
        raw.send(b"")
    with Client(service.address, timeout=10) as client:  # answered in the middle of it
        assert client.exec(b"meanwhile").body == b"meanwhile"
    replies = raw.replies(5000, timeout=20)
    assert {(r["id"], r["code"]) for r in replies} == {(0, "bad_request")}
    assert stats(service)["bad_messages"] == before + 5000


def test_bytes_that_are_not_zeromq_at_all_do_not_disturb_the_broker(service: Service) -> None:
    host, port = service.address.removeprefix("tcp://").rsplit(":", 1)
    rng = random.Random(4)
    for _ in range(20):
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(rng.randbytes(rng.randint(1, 4096)))
    conn = socket.create_connection((host, int(port)), timeout=5)  # and one that stays open
    try:
        conn.sendall(b"\xff" + b"\x00" * 8 + b"\x7f")  # a ZMTP greeting, then nothing
        still_answers(service)
    finally:
        conn.close()


# -- generated messages -----------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=16),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_jobs = st.lists(
    st.fixed_dictionaries(
        {"id": st.integers(min_value=1, max_value=2**63 - 1)},
        optional={
            "body": st.binary(max_size=64) | _scalars,
            "ctx": st.binary(max_size=16),
            "timeout": st.floats(min_value=-1, max_value=5) | _scalars,
            "stream": st.booleans(),
        },
    ),
    max_size=4,
)
_messages = st.one_of(
    st.fixed_dictionaries({"t": st.just("jobs"), "jobs": _jobs}, optional={"v": st.integers(0, 3)}),
    st.fixed_dictionaries(
        {
            "t": st.just("control"),
            "id": st.integers(1, 100),
            "cmd": st.sampled_from(["ping", "stats", "", "x"]) | _scalars,
        }
    ),
    st.fixed_dictionaries(
        {"t": st.sampled_from(["cancel", "jobs", "hb", "hello", "replies", ""])},
        optional={"ids": _values, "jobs": _values},
    ),
    st.dictionaries(st.text(max_size=4), _values, max_size=4),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(message=_messages)
def test_generated_messages_get_well_formed_replies_and_the_broker_lives(
    service: Service, raw: Raw, message: dict[str, Any]
) -> None:
    raw.send(pack(message))
    # A ping after it: replies come in order per client, so once the pong is
    # here every reply the message caused has come too (jobs may still run).
    raw.send(pack({"t": "control", "id": 2**62, "cmd": "ping"}))
    replies: list[dict[str, Any]] = []
    while not any(r["id"] == 2**62 for r in replies):
        replies += raw.replies(1)
    for reply in replies:
        if reply.get("code"):
            assert reply.get("error"), reply
    _drain(raw)


def _drain(raw: Raw) -> None:
    """Read what is left (job results arrive after the pong), bounded."""
    while raw.sock.poll(20):
        raw.replies(1)


def test_seeded_fuzz_of_2000_mutated_messages_leaves_the_broker_serving(
    service: Service, raw: Raw
) -> None:
    rng = random.Random(2024)
    seeds = [
        pack({"t": "jobs", "jobs": [{"id": 1, "body": b"hello"}, {"id": 2, "ctx": b"c"}]}),
        pack({"v": 1, "t": "control", "id": 3, "cmd": "stats"}),
        pack({"t": "cancel", "ids": [1, 2, 3]}),
        pack({"t": "jobs", "jobs": [{"id": 4, "body": b"s", "stream": True, "timeout": 1.5}]}),
    ]
    before = stats(service)
    sent = 0
    for _ in range(2000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif op == 1:
                data[pos:pos] = rng.randbytes(rng.randint(1, 8))
            elif op == 2:
                del data[pos : pos + rng.randint(1, 8)]
            else:
                data = data[:pos]
        raw.send(bytes(data))
        sent += 1
    with Client(service.address, timeout=10) as client:
        assert client.exec(b"through the storm").body == b"through the storm"
    _drain_for(raw, 2.0)
    after = stats(service)
    assert sent == 2000
    assert 0 < after["bad_messages"] - before["bad_messages"] <= 2000
    still_answers(service)


def _drain_for(raw: Raw, quiet: float) -> None:
    """Read replies until none came for ``quiet`` seconds (bounded by the replies' count)."""
    while raw.sock.poll(int(quiet * 1000)):
        raw.replies(1)


# -- worker output -----------------------------------------------------------------

BAD_OUTPUT = {
    "random-bytes": (b"random:64", "not a goridge frame"),
    "wrong-crc": (b"badcrc", "bad crc"),
    "claims-4-gib": (b"huge:1024", "hhhh"),
    "half-a-frame-then-eof": (b"half", "inside a frame"),
}


@pytest.mark.parametrize(("body", "shows"), BAD_OUTPUT.values(), ids=BAD_OUTPUT.keys())
def test_worker_breaking_the_protocol_fails_its_job_with_what_it_wrote(
    service: Service, body: bytes, shows: str
) -> None:
    with Client(service.address, timeout=10) as client:
        shard_pid = next(iter(client.stats()["shards"].values()))["pid"]
        rss_before = psutil.Process(shard_pid).memory_info().rss
        before = {w["pid"] for ws in client.workers().values() for w in ws}
        with pytest.raises(ProtocolError) as caught:
            client.exec(body)
        assert shows in str(caught.value)
        # the next jobs are served, by a replacement worker
        assert [r.body for r in client.map([b"a", b"b", b"c"])] == [b"a", b"b", b"c"]
        deadline = time.monotonic() + 5
        while True:
            now = {w["pid"] for ws in client.workers().values() for w in ws}
            if len(now) == 2 and now != before:
                break
            assert time.monotonic() < deadline, "the broken worker was not replaced"
            time.sleep(0.05)  # the shard replaces it in another process
    growth = psutil.Process(shard_pid).memory_info().rss - rss_before
    assert growth < 32 << 20, f"the shard grew by {growth >> 20} MiB"
