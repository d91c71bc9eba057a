"""The goridge v1 frame codec: pure functions and a decoder, no I/O."""

from shardpool.protocol.decoder import FrameDecoder
from shardpool.protocol.frame import (
    CODEC_JSON,
    CODEC_RAW,
    CONTROL,
    ERROR,
    PING,
    PONG,
    STOP,
    STREAM,
    Frame,
    encode_control,
    encode_frame,
    encode_job,
    job_header,
)

__all__ = [
    "CODEC_JSON",
    "CODEC_RAW",
    "CONTROL",
    "ERROR",
    "PING",
    "PONG",
    "STOP",
    "STREAM",
    "Frame",
    "FrameDecoder",
    "encode_control",
    "encode_frame",
    "encode_job",
    "job_header",
]
