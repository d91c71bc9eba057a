<?php

// Sleeps for the number of milliseconds given as the body, then echoes the job.

declare(strict_types=1);

use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

$worker = Worker::create();
while ($job = $worker->waitPayload()) {
    \usleep(\max(0, (int) $job->body) * 1000);
    $worker->respond($job);
}
