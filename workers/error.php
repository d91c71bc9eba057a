<?php

// Fails every job with a soft error; the worker itself stays healthy.

declare(strict_types=1);

use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

$worker = Worker::create();
while ($job = $worker->waitPayload()) {
    $worker->error('soft error: ' . $job->body);
}
