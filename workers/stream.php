<?php

// Streams N chunks ("chunk 0" .. "chunk N-1", N = the body), then a final
// "end" frame, or "stopped" when the server cancelled the stream.
// Context "ping" sets PING on every chunk. SHARDPOOL_CHUNK_DELAY_MS sleeps
// between chunks so a test can cancel mid-stream.

declare(strict_types=1);

use Shardpool\Worker\Payload;
use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

$delayMs = (int) \getenv('SHARDPOOL_CHUNK_DELAY_MS');

$worker = Worker::create();
while ($job = $worker->waitPayload()) {
    $count = (int) $job->body;
    $ping = $job->context === 'ping';
    for ($i = 0; $i < $count; $i++) {
        if ($i > 0 && $delayMs > 0) {
            \usleep($delayMs * 1000);
        }
        if (!$worker->respond(new Payload("chunk $i"), false, $ping)) {
            break; // the server stopped the stream
        }
    }
    $worker->respond(new Payload($worker->streamStopped() ? 'stopped' : 'end'));
}
