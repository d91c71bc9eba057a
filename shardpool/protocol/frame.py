"""goridge v1 frames: constants, the Frame value and the encoders.

Layout (little-endian), see docs/goridge.md:
byte 0 version<<4 | header words, byte 1 flags, bytes 2-5 payload length,
bytes 6-9 CRC32 of bytes 0-5, byte 10 stream flags, byte 11 reserved,
then option words (uint32 each), then the payload.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import msgspec

VERSION = 1
HEADER_SIZE = 12
MAX_OPTIONS = 10

# byte 1: flags
CONTROL = 0x01
CODEC_RAW = 0x04
CODEC_JSON = 0x08
CODEC_MSGPACK = 0x10
CODEC_GOB = 0x20
ERROR = 0x40
CODEC_PROTO = 0x80

# byte 10: stream flags
STREAM = 0x01
STOP = 0x02
PING = 0x04
PONG = 0x08

_HEAD = struct.Struct("<BBI")  # bytes 0-5, the part the CRC covers
_TAIL = struct.Struct("<IBB")  # bytes 6-11
_OPT = struct.Struct("<I")
_JOB_HEAD_1 = (VERSION << 4) | 4  # header of 3 words + one option word


class Frame(msgspec.Struct, gc=False):
    """One decoded frame. ``options`` are the uint32 option words."""

    flags: int
    payload: bytes = b""
    options: tuple[int, ...] = ()
    stream: int = 0


def encode_frame(
    payload: bytes = b"",
    flags: int = CODEC_RAW,
    options: Sequence[int] = (),
    stream: int = 0,
) -> bytes:
    """Encode one frame as bytes (header, options, payload)."""
    n_options = len(options)
    if n_options > MAX_OPTIONS:
        raise ValueError(f"a goridge frame carries at most {MAX_OPTIONS} options, got {n_options}")
    head = _HEAD.pack((VERSION << 4) | (3 + n_options), flags, len(payload))
    parts = [head, _TAIL.pack(zlib.crc32(head), stream, 0)]
    parts.extend(_OPT.pack(o) for o in options)
    parts.append(payload)
    return b"".join(parts)


def job_header(context_len: int, body_len: int, flags: int = CODEC_RAW, stream: int = 0) -> bytes:
    """The 16 header bytes of a job frame (one option: the context length).

    The caller writes context and body after it, so a large body is never
    copied into a new buffer just to prepend a header.
    """
    head = _HEAD.pack(_JOB_HEAD_1, flags, context_len + body_len)
    return head + _TAIL.pack(zlib.crc32(head), stream, 0) + _OPT.pack(context_len)


def encode_job(body: bytes, context: bytes = b"", flags: int = CODEC_RAW) -> bytes:
    """Encode a job frame whole: header, context length option, context, body."""
    return b"".join((job_header(len(context), len(body), flags), context, body))


def encode_control(payload: bytes) -> bytes:
    """Encode a CONTROL frame with a JSON payload (handshake, stop)."""
    return encode_frame(payload, CONTROL | CODEC_JSON)


STOP_COMMAND = encode_control(b'{"stop":true}')
STREAM_STOP = encode_frame(b"", CODEC_RAW, (), STOP)
STREAM_PONG = encode_frame(b"", CODEC_RAW, (), PONG)
