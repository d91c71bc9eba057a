<?php

declare(strict_types=1);

namespace Shardpool\Worker;

/** The connection to the server could not be opened, read or written. */
class RelayException extends \RuntimeException
{
}

/** A two-way byte channel to the server that carries goridge frames. */
interface Relay
{
    /** The next frame, or null when the server closed the channel between frames. */
    public function waitFrame(): ?Frame;

    /** True when reading would not block (a frame, or EOF, is waiting). */
    public function hasFrame(): bool;

    /** Writes all of $bytes. */
    public function write(string $bytes): void;
}

/** Shared code for relays built on PHP streams (pipes and sockets). */
abstract class StreamRelay implements Relay
{
    /**
     * Frames with a payload at least this big read their options separately,
     * so the payload is not copied once more to strip them.
     */
    private const BIG = 1 << 20;

    /**
     * Builds the relay named by an RR_RELAY-style address, as RoadRunner's
     * PHP library does: "pipes", "tcp://host:port" or "unix:///path".
     */
    public static function create(string $address): Relay
    {
        if ($address === 'pipes') {
            return new PipeRelay();
        }
        if (!\preg_match('#^(?P<protocol>[^:/]+)://(?P<arg1>[^:]+)(:(?P<arg2>[^:]+))?#', $address, $m)) {
            throw new RelayException("unsupported relay address '$address' (expected pipes, tcp://host:port or unix:///path)");
        }

        return match (\strtolower($m['protocol'])) {
            'tcp', 'unix' => new SocketRelay($address),
            default => throw new RelayException("unknown relay protocol in '$address'"),
        };
    }

    /**
     * @param resource $in
     * @param resource $out
     */
    public function __construct(protected $in, protected $out)
    {
        // Frames are read and written whole: blocking mode keeps the loops simple.
        \stream_set_blocking($in, true);
        \stream_set_blocking($out, true);
    }

    public function waitFrame(): ?Frame
    {
        $header = $this->read(Frame::HEADER_SIZE, true);
        if ($header === null) {
            return null;
        }
        [$flags, $length, $byte10, $count] = Frame::parseHeader($header);

        if ($count === 0) {
            return new Frame($this->read($length), [], $flags, $byte10);
        }
        if ($length >= self::BIG) {
            $options = \unpack("V$count", $this->read(4 * $count));
            return new Frame($this->read($length), \array_values($options), $flags, $byte10);
        }
        // Small frame: one read for options and payload together.
        $data = $this->read(4 * $count + $length);
        // One option (a job's context length) is the usual case: no format string to build.
        $options = $count === 1 ? [\unpack('V', $data)[1]] : \array_values(\unpack("V$count", $data));
        return new Frame(\substr($data, 4 * $count), $options, $flags, $byte10);
    }

    public function hasFrame(): bool
    {
        // stream_select also sees bytes already in PHP's read buffer.
        $read = [$this->in];
        $write = $except = null;

        return @\stream_select($read, $write, $except, 0) > 0;
    }

    public function write(string $bytes): void
    {
        $total = \strlen($bytes);
        $done = \fwrite($this->out, $bytes);
        if ($done === $total) {
            return;
        }
        // fwrite may write less than asked (sockets): keep going with the rest.
        while ($done !== false && $done > 0 && $done < $total) {
            $more = \fwrite($this->out, \substr($bytes, $done));
            $done = $more === false ? false : $done + $more;
        }
        if ($done !== $total) {
            throw new RelayException("goridge: could not write frame ($total bytes), server gone?");
        }
    }

    /**
     * Reads exactly $n bytes. Returns null when the stream ends before the
     * first byte and $eofOk is set (the server closed between frames).
     */
    private function read(int $n, bool $eofOk = false): ?string
    {
        // Usually all of it is buffered already: one call, no concatenation.
        $data = \stream_get_contents($this->in, $n);
        if ($data === false) {
            throw new RelayException('goridge: read failed');
        }
        if (\strlen($data) === $n) {
            return $data;
        }
        while (($missing = $n - \strlen($data)) > 0) {
            // Allocates once and loops over short reads itself (much faster than fread for big payloads).
            $chunk = \stream_get_contents($this->in, $missing);
            if ($chunk === false) {
                throw new RelayException('goridge: read failed');
            }
            if ($chunk !== '') {
                $data .= $chunk;
                continue;
            }
            if (\feof($this->in)) {
                if ($data === '' && $eofOk) {
                    return null;
                }
                throw new RelayException(\sprintf('goridge: connection closed mid-frame after %d of %d bytes', \strlen($data), $n));
            }
            // Sockets time out (default_socket_timeout) while idle: just wait again.
            if (!\stream_get_meta_data($this->in)['timed_out']) {
                throw new RelayException('goridge: read returned no data');
            }
        }

        return $data;
    }
}

/** Frames over the process's STDIN (from the server) and STDOUT (to it). */
final class PipeRelay extends StreamRelay
{
    public function __construct()
    {
        parent::__construct(\STDIN, \STDOUT);
    }
}

/** Frames over a socket the worker dials: tcp://host:port or unix:///path. */
final class SocketRelay extends StreamRelay
{
    public function __construct(string $address)
    {
        $socket = @\stream_socket_client($address, $errno, $error, 30);
        if ($socket === false) {
            throw new RelayException("cannot connect to $address: $error ($errno)");
        }
        // A worker may wait for jobs a long time: avoid idle read timeouts.
        \stream_set_timeout($socket, 86400);
        parent::__construct($socket, $socket);
    }
}
