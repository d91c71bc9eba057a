<?php

// Prints to STDOUT before the handshake: over pipes this corrupts the frame
// stream, and the server must report it.

declare(strict_types=1);

use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

echo "hello from boot\n";

$worker = Worker::create();
while ($job = $worker->waitPayload()) {
    $worker->respond($job);
}
