"""An incremental goridge frame decoder for ``Protocol.data_received``.

Bytes arrive in pieces of any size; frames come out whole. Partial data is
kept in one ``bytearray`` whose appends are amortised O(1), and the decoder
does not re-parse a large frame's header on every chunk: a 64 MiB payload is
copied once into the buffer and once out of it, never once per chunk.
"""

from __future__ import annotations

import struct
import zlib

from shardpool.errors import ProtocolError
from shardpool.protocol.frame import HEADER_SIZE, MAX_OPTIONS, VERSION, Frame

_HEADER = struct.Struct("<BBIIBB")
_U32 = struct.Struct("<I")
_JOB_B0 = (VERSION << 4) | 4
_MAX_HL = 3 + MAX_OPTIONS
DEFAULT_MAX_PAYLOAD = 0xFFFFFFFF


class FrameDecoder:
    """Feed bytes with :meth:`feed`; get the complete frames back.

    After a :class:`ProtocolError` the stream is unusable: the peer must be
    dropped. ``bad_bytes`` then holds the bytes that failed to parse, so the
    caller can show them (a stray ``echo`` in a PHP worker, say).
    """

    __slots__ = ("_buf", "_need", "bad_bytes", "max_payload")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._need = 0  # bytes the buffer must hold before parsing is worth trying
        self.max_payload = max_payload
        self.bad_bytes = b""

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        buf = self._buf
        if not buf:
            # Fast path: exactly one job-shaped frame (one option word), the
            # common case for replies read one at a time.
            if len(data) >= 16 and data[0] == _JOB_B0:
                _, flags, size, crc, stream, _ = _HEADER.unpack_from(data)
                if (
                    size + 16 == len(data)
                    and zlib.crc32(data[:6]) == crc
                    and size <= self.max_payload
                ):
                    return [
                        Frame(flags, bytes(data[16:]), (_U32.unpack_from(data, 12)[0],), stream)
                    ]
            frames, used = self._parse(data)
            if used < len(data):
                buf += memoryview(data)[used:]
            return frames
        buf += data
        if len(buf) < self._need:
            return []
        frames, used = self._parse(buf)
        del buf[:used]
        return frames

    def _parse(self, data: bytes | bytearray | memoryview) -> tuple[list[Frame], int]:
        frames: list[Frame] = []
        pos = 0
        end = len(data)
        view = memoryview(data)
        try:
            pos = self._parse_into(frames, data, view, end)
        finally:
            view.release()
        return frames, pos

    def _parse_into(
        self,
        frames: list[Frame],
        data: bytes | bytearray | memoryview,
        view: memoryview,
        end: int,
    ) -> int:
        pos = 0
        while end - pos >= HEADER_SIZE:
            b0, flags, size, crc, stream, _ = _HEADER.unpack_from(data, pos)
            if zlib.crc32(data[pos : pos + 6]) != crc:
                self._fail(data, pos, "header CRC mismatch")
            hl = b0 & 0x0F
            if b0 >> 4 != VERSION:
                self._fail(data, pos, f"unsupported protocol version {b0 >> 4}")
            if hl < 3 or hl > _MAX_HL:
                self._fail(data, pos, f"invalid header length of {hl} words")
            if size > self.max_payload:
                self._fail(
                    data, pos, f"payload of {size} bytes exceeds the limit of {self.max_payload}"
                )
            head_end = pos + hl * 4
            frame_end = head_end + size
            if frame_end > end:
                self._need = frame_end - pos
                break
            if hl == 3:
                options: tuple[int, ...] = ()
            else:
                options = struct.unpack_from(f"<{hl - 3}I", data, pos + HEADER_SIZE)
            frames.append(Frame(flags, bytes(view[head_end:frame_end]), options, stream))
            pos = frame_end
        else:
            self._need = HEADER_SIZE
        return pos

    def eof(self) -> None:
        """The stream ended: raise if it ended inside a frame."""
        if self._buf:
            left = bytes(self._buf)
            self._buf = bytearray()
            self.bad_bytes = left
            raise ProtocolError(
                f"stream ended inside a frame after {len(left)} bytes; received {left[:256]!r}"
            )

    def _fail(self, data: bytes | bytearray | memoryview, pos: int, why: str) -> None:
        self.bad_bytes = bytes(data[pos:])
        self._buf = bytearray()
        raise ProtocolError(f"invalid goridge frame ({why}); received {self.bad_bytes[:256]!r}")


def frame_start(data: bytes) -> int:
    """Offset of the first valid frame header in ``data``, or ``len(data)``.

    Used to show exactly what a worker printed before its next real frame.
    """
    for pos in range(len(data) - HEADER_SIZE + 1):
        if data[pos] >> 4 == VERSION and 3 <= data[pos] & 0x0F <= _MAX_HL:
            crc = int.from_bytes(data[pos + 6 : pos + 10], "little")
            if zlib.crc32(data[pos : pos + 6]) == crc:
                return pos
    return len(data)
