"""The unit of work exchanged with a PHP worker: context + body + codec flags."""

from __future__ import annotations

import msgspec

from shardpool.protocol.frame import CODEC_RAW


class Payload(msgspec.Struct, gc=False):
    """A job or a reply: ``body`` and ``context`` bytes, as RoadRunner's Payload.

    ``codec`` is the goridge codec flag the frame carries (raw by default).

    >>> Payload(b"hello", context=b'{"k": 1}')
    Payload(body=b'hello', context=b'{"k": 1}', codec=4)
    """

    body: bytes = b""
    context: bytes = b""
    codec: int = CODEC_RAW

    def is_empty(self) -> bool:
        return not self.body and not self.context
