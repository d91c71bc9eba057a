<?php

declare(strict_types=1);

namespace Shardpool\Worker;

/** A frame or header that does not follow the goridge v1 protocol. */
class FrameException extends \RuntimeException
{
}

/**
 * One goridge v1 frame (see /work/shared/goridge.md).
 *
 * Header, 12 bytes, integers little-endian:
 *   0     version << 4 | header length in 32-bit words (3 + option count)
 *   1     flags (CONTROL, codec, ERROR)
 *   2-5   payload length, uint32
 *   6-9   CRC32 (IEEE) of bytes 0-5, uint32
 *   10    stream flags (STREAM, STOP, PING, PONG)
 *   11    reserved, 0
 * then the option words (uint32 each), then the payload.
 */
final class Frame
{
    public const VERSION = 1;
    public const HEADER_SIZE = 12;
    public const MAX_OPTIONS = 10;

    // byte 1: flags
    public const CONTROL = 0x01;
    public const CODEC_RAW = 0x04;
    public const CODEC_JSON = 0x08;
    public const CODEC_MSGPACK = 0x10;
    public const CODEC_GOB = 0x20;
    public const ERROR = 0x40;
    public const CODEC_PROTO = 0x80;

    // byte 10: stream flags
    public const STREAM = 0x01;
    public const STOP = 0x02;
    public const PING = 0x04;
    public const PONG = 0x08;

    /** Distinct headers kept (made or checked), each way; the cache starts over when full. */
    private const CACHE_SIZE = 1024;
    /** Payloads and contexts shorter than this have their headers cached. */
    private const CACHED_LENGTH = 1 << 20;

    /** @var array<int, string> */
    private static array $headers = [];
    /** @var array<string, array{int, int, int, int}> */
    private static array $parsed = [];

    /** @param int[] $options */
    public function __construct(
        public string $payload = '',
        public array $options = [],
        public int $flags = 0,
        public int $byte10 = 0,
    ) {
    }

    /**
     * The header plus option words for a payload of $length bytes. The
     * payload is not included so callers can append it without an extra
     * copy of a large string.
     *
     * @param int[] $options
     */
    public static function header(int $flags, int $byte10, array $options, int $length): string
    {
        // Replies mostly repeat a few sizes: their headers are made once.
        if (\count($options) === 1 && $length < self::CACHED_LENGTH && $options[0] < self::CACHED_LENGTH) {
            $key = (((($length << 20) | $options[0]) << 8) | $flags) << 8 | $byte10;
            $header = self::$headers[$key] ?? null;
            if ($header === null) {
                if (\count(self::$headers) >= self::CACHE_SIZE) {
                    self::$headers = [];
                }
                $header = self::$headers[$key] = self::makeHeader($flags, $byte10, $options, $length);
            }
            return $header;
        }

        return self::makeHeader($flags, $byte10, $options, $length);
    }

    /** @param int[] $options */
    private static function makeHeader(int $flags, int $byte10, array $options, int $length): string
    {
        $count = \count($options);
        if ($count > self::MAX_OPTIONS) {
            throw new FrameException("goridge: at most 10 options per frame, got $count");
        }
        $head = \pack('CCV', (self::VERSION << 4) | (3 + $count), $flags, $length);

        return $head . \pack('V', \crc32($head)) . \chr($byte10) . "\0"
            . ($count > 0 ? \pack('V*', ...$options) : '');
    }

    /**
     * Checks and splits a 12-byte header.
     *
     * @return array{int, int, int, int} [flags, payload length, byte10, option count]
     */
    public static function parseHeader(string $header): array
    {
        // Jobs mostly repeat a few sizes: each distinct header is checked once.
        $parsed = self::$parsed[$header] ?? null;
        if ($parsed !== null) {
            return $parsed;
        }
        if (\count(self::$parsed) >= self::CACHE_SIZE) {
            self::$parsed = [];
        }

        return self::$parsed[$header] = self::checkHeader($header);
    }

    /** @return array{int, int, int, int} */
    private static function checkHeader(string $header): array
    {
        $version = \ord($header[0]) >> 4;
        if ($version !== self::VERSION) {
            throw new FrameException(\sprintf(
                'goridge: unsupported protocol version %d (expected %d); header bytes: %s',
                $version,
                self::VERSION,
                \bin2hex($header),
            ));
        }

        $crc = \unpack('V', $header, 6)[1];
        if (\crc32(\substr($header, 0, 6)) !== $crc) {
            throw new FrameException('goridge: header CRC mismatch; header bytes: ' . \bin2hex($header));
        }

        $words = \ord($header[0]) & 0x0F;
        if ($words < 3) {
            throw new FrameException("goridge: header length $words words is below the minimum of 3");
        }

        return [\ord($header[1]), \unpack('V', $header, 2)[1], \ord($header[10]), $words - 3];
    }
}
