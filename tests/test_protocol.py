"""The goridge v1 frame codec, as specified in goridge.md (the PHP worker protocol).

Header expectations are built here by hand with ``struct`` and ``zlib`` so a
mistake shared by the encoder and the decoder cannot hide behind a round trip.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import struct
import time
import zlib
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardpool.errors import ProtocolError
from shardpool.protocol import (
    CODEC_JSON,
    CODEC_RAW,
    CONTROL,
    Frame,
    FrameDecoder,
    encode_frame,
    encode_job,
    job_header,
)
from shardpool.protocol import frame as frame_module

# ---------------------------------------------------------------- strategies

uint8 = st.integers(0, 0xFF)
uint32 = st.integers(0, 0xFFFFFFFF)
option_words = st.lists(uint32, max_size=10).map(tuple)
payloads = st.binary(max_size=100)
frames = st.builds(Frame, flags=uint8, payload=payloads, options=option_words, stream=uint8)

few = settings(max_examples=30)  # for properties with a small input space


def encode(f: Frame) -> bytes:
    return encode_frame(f.payload, f.flags, f.options, f.stream)


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def chunkings(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """Cuts of ``data`` into non-empty chunks at arbitrary points, 1-byte chunks included."""
    if len(data) < 2:
        return st.just([data])
    return st.sets(st.integers(1, len(data) - 1), max_size=min(len(data) - 1, 40)).map(
        lambda cuts: split_at(data, cuts)
    )


@st.composite
def chunked_frame_streams(draw: st.DrawFn) -> tuple[list[Frame], list[bytes]]:
    fs = draw(st.lists(frames, min_size=1, max_size=6))
    return fs, draw(chunkings(b"".join(map(encode, fs))))


@st.composite
def chunked_noise(draw: st.DrawFn) -> list[bytes]:
    """Arbitrary bytes: pure noise, or valid frames with noise among them."""
    segments = draw(
        st.lists(
            st.one_of(frames.map(encode), st.binary(min_size=1, max_size=40)),
            min_size=1,
            max_size=5,
        )
    )
    return draw(chunkings(b"".join(segments)))


def header(b0: int, flags: int = CODEC_RAW, size: int = 0, stream: int = 0) -> bytes:
    """12 header bytes with a correct CRC, whatever nonsense the fields hold."""
    head = struct.pack("<BBI", b0, flags, size)
    return head + struct.pack("<IBB", zlib.crc32(head), stream, 0)


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out


def wire_size(f: Frame) -> int:
    return 12 + 4 * len(f.options) + len(f.payload)


# ---------------------------------------------------------------- round trip


@settings(max_examples=150)
@given(frames)
def test_decoding_an_encoded_frame_gives_the_same_frame(f: Frame) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode(f)) == [f]
    assert decoder.buffered == 0


@few
@given(body=payloads, context=payloads)
def test_encode_job_decodes_to_the_context_length_option_and_context_then_body(
    body: bytes, context: bytes
) -> None:
    [decoded] = FrameDecoder().feed(encode_job(body, context))
    assert decoded.options == (len(context),)
    assert decoded.payload == context + body


@few
@given(body=payloads, context=payloads)
def test_encode_job_uses_the_raw_codec_by_default(body: bytes, context: bytes) -> None:
    [decoded] = FrameDecoder().feed(encode_job(body, context))
    assert decoded.flags == CODEC_RAW
    assert decoded.stream == 0


@few
@given(body=payloads, context=payloads, flags=uint8)
def test_job_header_then_context_then_body_equals_encode_job(
    body: bytes, context: bytes, flags: int
) -> None:
    assert job_header(len(context), len(body), flags) + context + body == encode_job(
        body, context, flags
    )


@few
@given(context_len=st.integers(0, 2**31), body_len=st.integers(0, 2**31 - 1), flags=uint8)
def test_job_header_is_a_one_option_header_built_by_hand(
    context_len: int, body_len: int, flags: int
) -> None:
    head = struct.pack("<BBI", 0x14, flags, context_len + body_len)
    expected = head + struct.pack("<IBBI", zlib.crc32(head), 0, 0, context_len)
    assert job_header(context_len, body_len, flags) == expected


def test_encode_frame_rejects_eleven_options() -> None:
    with pytest.raises(ValueError):
        encode_frame(b"x", CODEC_RAW, tuple(range(11)))


# ---------------------------------------------------------------- header bytes

frame_args = st.fixed_dictionaries(
    {"payload": payloads, "flags": uint8, "options": option_words, "stream": uint8}
)


@few
@given(frame_args)
def test_byte_0_high_nibble_is_protocol_version_1(args: dict) -> None:
    assert encode_frame(**args)[0] >> 4 == 1


@few
@given(frame_args)
def test_byte_0_low_nibble_is_3_plus_the_number_of_option_words(args: dict) -> None:
    assert encode_frame(**args)[0] & 0x0F == 3 + len(args["options"])


@few
@given(frame_args)
def test_byte_1_is_the_flags(args: dict) -> None:
    assert encode_frame(**args)[1] == args["flags"]


@few
@given(frame_args)
def test_bytes_2_to_5_are_the_payload_length_little_endian(args: dict) -> None:
    assert encode_frame(**args)[2:6] == len(args["payload"]).to_bytes(4, "little")


@few
@given(frame_args)
def test_bytes_6_to_9_are_the_crc32_of_bytes_0_to_5_little_endian(args: dict) -> None:
    raw = encode_frame(**args)
    assert raw[6:10] == zlib.crc32(raw[0:6]).to_bytes(4, "little")


@few
@given(frame_args)
def test_byte_10_is_the_stream_flags(args: dict) -> None:
    assert encode_frame(**args)[10] == args["stream"]


@few
@given(frame_args)
def test_byte_11_is_zero(args: dict) -> None:
    assert encode_frame(**args)[11] == 0


@few
@given(frame_args)
def test_option_words_follow_the_header_as_little_endian_uint32(args: dict) -> None:
    k = len(args["options"])
    expected = b"".join(o.to_bytes(4, "little") for o in args["options"])
    assert encode_frame(**args)[12 : 12 + 4 * k] == expected


@few
@given(frame_args)
def test_payload_follows_the_option_words_and_ends_the_frame(args: dict) -> None:
    k = len(args["options"])
    assert encode_frame(**args)[12 + 4 * k :] == args["payload"]


def test_handshake_frame_matches_the_golden_vector() -> None:
    golden = (
        b"\x13"  # version 1, 3 header words
        b"\x09"  # CONTROL | CODEC_JSON
        b"\x09\x00\x00\x00"  # payload length 9
        b"\x6d\xfc\x98\x44"  # CRC32 of the six bytes above
        b"\x00"  # stream flags
        b"\x00"  # reserved
        b'{"pid":1}'
    )
    assert encode_frame(b'{"pid":1}', CONTROL | CODEC_JSON) == golden


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CONTROL", 0x01),
        ("CODEC_RAW", 0x04),
        ("CODEC_JSON", 0x08),
        ("CODEC_MSGPACK", 0x10),
        ("CODEC_GOB", 0x20),
        ("ERROR", 0x40),
        ("CODEC_PROTO", 0x80),
        ("STREAM", 0x01),
        ("STOP", 0x02),
        ("PING", 0x04),
        ("PONG", 0x08),
    ],
)
def test_flag_constants_have_the_values_of_the_spec(name: str, value: int) -> None:
    assert getattr(frame_module, name) == value


# ---------------------------------------------------------------- chunking


@settings(max_examples=80)
@given(chunked_frame_streams())
def test_any_split_of_a_stream_yields_the_same_frames_in_order(
    stream: tuple[list[Frame], list[bytes]],
) -> None:
    sent, chunks = stream
    decoder = FrameDecoder()
    assert feed_all(decoder, chunks) == sent
    assert decoder.buffered == 0


@settings(max_examples=50)
@given(st.lists(frames, min_size=1, max_size=4))
def test_feeding_one_byte_at_a_time_yields_the_same_frames_in_order(sent: list[Frame]) -> None:
    data = b"".join(map(encode, sent))
    decoder = FrameDecoder()
    assert feed_all(decoder, [data[i : i + 1] for i in range(len(data))]) == sent
    assert decoder.buffered == 0


@settings(max_examples=50)
@given(chunked_frame_streams(), st.sampled_from([bytes, bytearray, memoryview]))
def test_chunks_may_be_bytes_bytearray_or_memoryview(
    stream: tuple[list[Frame], list[bytes]], kind: Callable[[bytes], object]
) -> None:
    sent, chunks = stream
    assert feed_all(FrameDecoder(), [kind(c) for c in chunks]) == sent  # type: ignore[misc]


@settings(max_examples=50)
@given(chunked_frame_streams())
def test_decoder_keeps_no_reference_to_a_fed_buffer(
    stream: tuple[list[Frame], list[bytes]],
) -> None:
    # A BufferedProtocol reuses one buffer for every read.
    sent, chunks = stream
    decoder = FrameDecoder()
    out: list[Frame] = []
    for chunk in chunks:
        reused = bytearray(chunk)
        out += decoder.feed(reused)
        reused[:] = b"\xff" * len(reused)
    assert out == sent


# ---------------------------------------------------------------- bad input


@few
@given(frames, st.integers(0, 9), st.integers(1, 0xFF))
def test_flipping_any_crc_covered_header_byte_raises_protocol_error(
    f: Frame, index: int, mask: int
) -> None:
    raw = bytearray(encode(f))
    raw[index] ^= mask
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(bytes(raw))


@pytest.mark.parametrize("version", [v for v in range(16) if v != 1])
def test_a_version_other_than_1_raises_protocol_error(version: int) -> None:
    with pytest.raises(ProtocolError, match="version"):
        FrameDecoder().feed(header(version << 4 | 3))


@pytest.mark.parametrize("words", [0, 1, 2])
def test_a_header_length_below_3_words_raises_protocol_error(words: int) -> None:
    with pytest.raises(ProtocolError, match="header length"):
        FrameDecoder().feed(header(0x10 | words))


@pytest.mark.parametrize("words", [14, 15])
def test_a_header_length_above_13_words_raises_protocol_error(words: int) -> None:
    with pytest.raises(ProtocolError, match="header length"):
        FrameDecoder().feed(header(0x10 | words))


@few
@given(st.integers(1025, 0xFFFFFFFF))
def test_a_payload_length_above_max_payload_raises_on_the_header_alone(size: int) -> None:
    with pytest.raises(ProtocolError, match="limit"):
        FrameDecoder(max_payload=1024).feed(header(0x13, size=size))


def test_a_payload_length_equal_to_max_payload_is_accepted() -> None:
    f = Frame(CODEC_RAW, b"x" * 1024)
    assert FrameDecoder(max_payload=1024).feed(encode(f)) == [f]


@settings(max_examples=60)
@given(chunked_noise())
def test_arbitrary_bytes_raise_nothing_but_protocol_error(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    try:
        feed_all(decoder, chunks)
        decoder.eof()
    except ProtocolError:
        pass


@settings(max_examples=60)
@given(chunked_noise())
def test_arbitrary_bytes_either_come_out_as_frames_or_stay_buffered(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    try:
        out = feed_all(decoder, chunks)
    except ProtocolError:
        return
    assert sum(map(wire_size, out)) + decoder.buffered == sum(map(len, chunks))


@settings(max_examples=60)
@given(chunked_noise())
def test_eof_raises_protocol_error_if_and_only_if_bytes_are_buffered(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    try:
        feed_all(decoder, chunks)
    except ProtocolError:
        return
    if decoder.buffered:
        with pytest.raises(ProtocolError):
            decoder.eof()
    else:
        decoder.eof()


@few
@given(st.data())
def test_a_truncated_frame_then_eof_raises_protocol_error(data: st.DataObject) -> None:
    raw = encode(data.draw(frames))
    prefix = raw[: data.draw(st.integers(1, len(raw) - 1))]
    decoder = FrameDecoder()
    assert decoder.feed(prefix) == []
    with pytest.raises(ProtocolError):
        decoder.eof()


@few
@given(st.lists(frames, max_size=3))
def test_eof_after_whole_frames_does_not_raise(sent: list[Frame]) -> None:
    decoder = FrameDecoder()
    decoder.feed(b"".join(map(encode, sent)))
    decoder.eof()


@few
@given(st.binary(min_size=20, max_size=20))
def test_protocol_error_message_shows_the_offending_bytes(more: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        FrameDecoder().feed(b"hello from boot\n" + more)
    assert "hello from boot" in str(caught.value)


@few
@given(st.binary(min_size=20, max_size=20))
def test_bad_bytes_holds_the_bytes_that_failed_to_parse(more: bytes) -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(b"hello from boot\n" + more)
    assert decoder.bad_bytes == b"hello from boot\n" + more


def test_eof_error_message_shows_the_buffered_bytes() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"bye now")  # shorter than a header: it just waits
    with pytest.raises(ProtocolError, match="bye now"):
        decoder.eof()


# ---------------------------------------------------------------- large payloads

BIG = 64 * 1024 * 1024
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def big_frame() -> tuple[bytes, str]:
    payload = random.Random(0).randbytes(BIG)
    return encode_frame(payload), hashlib.sha256(payload).hexdigest()


def test_a_64_mib_frame_fed_in_64_kib_chunks_is_parsed_a_constant_number_of_times(
    big_frame: tuple[bytes, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, _ = big_frame
    calls = 0
    parse = FrameDecoder._parse

    def counting_parse(self: FrameDecoder, data: bytes) -> tuple[list[Frame], int]:
        nonlocal calls
        calls += 1
        return parse(self, data)

    monkeypatch.setattr(FrameDecoder, "_parse", counting_parse)
    decoder = FrameDecoder()
    for i in range(0, len(raw), CHUNK):
        decoder.feed(raw[i : i + CHUNK])
    assert len(raw) // CHUNK > 1000  # so "once per chunk" would be unmistakable
    assert calls <= 3


def test_a_64_mib_frame_fed_in_64_kib_chunks_comes_out_whole_and_intact(
    big_frame: tuple[bytes, str],
) -> None:
    raw, digest = big_frame
    decoder = FrameDecoder()
    out = feed_all(decoder, [raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)])
    assert len(out) == 1
    assert hashlib.sha256(out[0].payload).hexdigest() == digest
    assert decoder.buffered == 0


def test_a_64_mib_frame_fed_in_64_kib_chunks_decodes_in_well_under_two_seconds(
    big_frame: tuple[bytes, str],
) -> None:
    # A backstop only; the call count above is the deterministic check.
    raw, _ = big_frame
    chunks = [raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)]
    decoder = FrameDecoder()
    start = time.perf_counter()
    feed_all(decoder, chunks)
    assert time.perf_counter() - start < 2.0
