<?php

// Replies with the worker's process id.

declare(strict_types=1);

use Shardpool\Worker\Payload;
use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

$worker = Worker::create();
while ($job = $worker->waitPayload()) {
    $worker->respond(new Payload((string) \getmypid()));
}
