<?php

// Speaks exactly like the public spiral/roadrunner-worker library, with its
// own raw frame code (deliberately NOT using lib/), to test compatibility:
//   handshake reply: flags CONTROL only (no JSON codec bit), payload {"pid":N}
//   job reply:       flags 0, one option word = context length
//   body "error":    flags ERROR, no option words, payload "rr error"
//   body "stop":     context {"stop":true}, empty body, flags 0
//   otherwise:       echo body and context

declare(strict_types=1);

const RR_CONTROL = 0x01;
const RR_ERROR = 0x40;

function rr_connect(): array
{
    $address = \getenv('RR_RELAY') ?: 'pipes';
    if ($address === 'pipes') {
        return [\STDIN, \STDOUT];
    }
    $socket = \stream_socket_client($address, $errno, $error, 30);
    if ($socket === false) {
        \fwrite(\STDERR, "rr_compat: cannot connect to $address: $error\n");
        exit(1);
    }
    \stream_set_timeout($socket, 86400);
    return [$socket, $socket];
}

/** Exactly $n bytes, or null on EOF before the first one. */
function rr_read($in, int $n): ?string
{
    $data = '';
    while (\strlen($data) < $n) {
        $chunk = \stream_get_contents($in, $n - \strlen($data));
        if ($chunk === '' || $chunk === false) {
            if (\feof($in)) {
                if ($data === '') {
                    return null;
                }
                throw new RuntimeException('rr_compat: EOF in the middle of a frame');
            }
            continue; // socket read timeout: keep waiting
        }
        $data .= $chunk;
    }
    return $data;
}

/** [flags, byte10, options, payload], or null on EOF. */
function rr_receive($in): ?array
{
    $header = rr_read($in, 12);
    if ($header === null) {
        return null;
    }
    $h = \unpack('Cvh/Cflags/Vlen/Vcrc/Cbyte10', $header);
    if ($h['vh'] >> 4 !== 1 || \crc32(\substr($header, 0, 6)) !== $h['crc']) {
        throw new RuntimeException('rr_compat: bad frame header ' . \bin2hex($header));
    }
    $count = ($h['vh'] & 0x0F) - 3;
    $options = $count > 0 ? \array_values(\unpack("V$count", rr_read($in, 4 * $count))) : [];
    $payload = $h['len'] > 0 ? rr_read($in, $h['len']) : '';
    return [$h['flags'], $h['byte10'], $options, $payload];
}

function rr_send($out, int $flags, array $options, string $payload): void
{
    $head = \pack('CCV', 0x10 | (3 + \count($options)), $flags, \strlen($payload));
    $frame = $head . \pack('V', \crc32($head)) . "\0\0" . ($options ? \pack('V*', ...$options) : '') . $payload;
    for ($done = 0; $done < \strlen($frame); $done += $n) {
        $n = \fwrite($out, \substr($frame, $done));
        if ($n === false || $n === 0) {
            throw new RuntimeException('rr_compat: write failed');
        }
    }
}

[$in, $out] = rr_connect();
while (($frame = rr_receive($in)) !== null) {
    [$flags, $byte10, $options, $payload] = $frame;
    if ($byte10 !== 0) {
        continue; // stream STOP/PONG: nothing to do for this worker
    }
    if ($flags & RR_CONTROL) {
        $command = \json_decode($payload, true);
        if (!empty($command['pid'])) {
            rr_send($out, RR_CONTROL, [], \json_encode(['pid' => \getmypid()]));
            continue;
        }
        if (!empty($command['stop'])) {
            exit(0);
        }
        throw new RuntimeException("rr_compat: unknown control frame $payload");
    }

    $split = $options[0] ?? 0;
    $context = \substr($payload, 0, $split);
    $body = \substr($payload, $split);
    if ($body === 'error') {
        rr_send($out, RR_ERROR, [], 'rr error');
    } elseif ($body === 'stop') {
        $stop = \json_encode(['stop' => true]);
        rr_send($out, 0, [\strlen($stop)], $stop);
    } else {
        rr_send($out, 0, [\strlen($context)], $context . $body);
    }
}
