<?php

declare(strict_types=1);

namespace Shardpool\Worker;

/**
 * A persistent worker: receives jobs from the shardpool server and answers them.
 *
 *     $worker = Worker::create();
 *     while ($job = $worker->waitPayload()) {
 *         $worker->respond(new Payload($job->body, $job->context));
 *     }
 */
final class Worker
{
    /** Replies bigger than this are written in two parts instead of being concatenated (saves a copy). */
    private const CONCAT_LIMIT = 1 << 16;

    private bool $streamStopped = false;
    private int $pongs = 0;

    /** @var Frame[] frames read while polling mid-stream that waitPayload must still handle */
    private array $pending = [];

    public function __construct(private Relay $relay)
    {
    }

    /** A worker on the relay named by RR_RELAY (pipes when unset). */
    public static function create(): self
    {
        $address = \getenv('RR_RELAY');

        return new self(StreamRelay::create($address === false || $address === '' ? 'pipes' : $address));
    }

    /**
     * Blocks until the next job. Returns null when the server asks the worker
     * to exit; the worker exits with code 0 if the server closes the channel.
     */
    public function waitPayload(): ?Payload
    {
        while (true) {
            $frame = $this->pending ? \array_shift($this->pending) : $this->relay->waitFrame();
            if ($frame === null) {
                exit(0); // server closed the channel between frames: nothing left to do
            }

            // A STOP or PONG for a stream that already ended: stale, skip it.
            if ($frame->byte10 & (Frame::STOP | Frame::PONG)) {
                if ($frame->byte10 & Frame::PONG) {
                    $this->pongs++;
                }
                continue;
            }

            if ($frame->flags & Frame::CONTROL) {
                if (!$this->control($frame->payload)) {
                    return null;
                }
                continue;
            }

            $this->streamStopped = false;
            $split = $frame->options[0] ?? 0;
            if ($split === 0) {
                return new Payload($frame->payload); // no context: reuse the string, no copy
            }

            return new Payload(\substr($frame->payload, $split), \substr($frame->payload, 0, $split));
        }
    }

    /**
     * Sends a reply. With $eos = false it is one chunk of a stream and more
     * follow; the last chunk is sent with $eos = true. Returns false (and
     * sends nothing) for a chunk once the server has stopped the stream:
     * the script should then finish with an $eos = true reply.
     * $ping asks the server for a PONG (meant for stream chunks).
     */
    public function respond(Payload $payload, bool $eos = true, bool $ping = false): bool
    {
        if (!$eos) {
            $this->poll();
            if ($this->streamStopped) {
                return false;
            }
        }

        $byte10 = ($eos ? 0 : Frame::STREAM) | ($ping ? Frame::PING : 0);
        $this->send(Frame::CODEC_RAW, $byte10, $payload->context, $payload->body);

        return true;
    }

    /** Fails the current job with a soft error; the worker stays in the pool. */
    public function error(string $message): void
    {
        $this->send(Frame::ERROR | Frame::CODEC_RAW, 0, '', $message, [0]);
    }

    /** Answers the current job by asking to be replaced (the server reruns the job elsewhere). */
    public function stop(): void
    {
        $this->send(Frame::CODEC_RAW, 0, '{"stop":true}', '');
    }

    /** True when the server stopped the stream of the current job. */
    public function streamStopped(): bool
    {
        return $this->streamStopped;
    }

    /** Number of PONG frames received so far. */
    public function pongs(): int
    {
        return $this->pongs;
    }

    /** Writes a log line to STDERR (STDOUT carries the frames when using pipes). */
    public static function log(string $message): void
    {
        \fwrite(\STDERR, $message . "\n");
    }

    /**
     * Handles a control frame. Returns false when the worker must stop.
     */
    private function control(string $json): bool
    {
        $command = \json_decode($json, true);
        if (!\is_array($command)) {
            throw new FrameException("goridge: control frame payload is not a JSON object: $json");
        }
        if (\array_key_exists('pid', $command)) {
            // Handshake: tell the server who we are (it matches socket connections by pid).
            $pid = \json_encode(['pid' => \getmypid()]);
            $this->relay->write(Frame::header(Frame::CONTROL | Frame::CODEC_JSON, 0, [], \strlen($pid)) . $pid);
            return true;
        }
        if (!empty($command['stop'])) {
            return false;
        }
        throw new FrameException("goridge: unknown control frame: $json");
    }

    /** Reads whatever the server sent while we stream, without blocking. */
    private function poll(): void
    {
        while (!$this->streamStopped && $this->relay->hasFrame()) {
            $frame = $this->relay->waitFrame();
            if ($frame === null) {
                exit(0); // server gone: nobody wants the rest of the stream
            }
            if ($frame->byte10 & Frame::PONG) {
                $this->pongs++;
            }
            if ($frame->byte10 & Frame::STOP) {
                $this->streamStopped = true;
            } elseif (!($frame->byte10 & Frame::PONG)) {
                $this->pending[] = $frame; // not ours (e.g. a control frame): keep it for waitPayload
            }
        }
    }

    /**
     * Writes one frame whose payload is $context . $body, with the context
     * length as its option word unless $options is given.
     *
     * @param int[]|null $options
     */
    private function send(int $flags, int $byte10, string $context, string $body, ?array $options = null): void
    {
        $header = Frame::header($flags, $byte10, $options ?? [\strlen($context)], \strlen($context) + \strlen($body));
        if (\strlen($body) > self::CONCAT_LIMIT) {
            $this->relay->write($header . $context);
            $this->relay->write($body);
        } else {
            $this->relay->write($header . $context . $body);
        }
    }
}
