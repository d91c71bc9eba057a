<?php

// The default worker: replies with the job's own body and context.
// Benchmarks run through it, so the loop stays minimal.

declare(strict_types=1);

use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

$worker = Worker::create();
while ($job = $worker->waitPayload()) {
    $worker->respond($job);
}
