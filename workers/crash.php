<?php

// Dies in the middle of every job without replying (exit code 3).

declare(strict_types=1);

use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

$worker = Worker::create();
while ($job = $worker->waitPayload()) {
    Worker::log('crash.php dying on purpose');
    exit(3);
}
