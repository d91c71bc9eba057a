<?php

// Dies at boot with a PHP fatal error (undefined function), before any frame.

declare(strict_types=1);

use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

undefined_function_at_boot();

$worker = Worker::create();
while ($job = $worker->waitPayload()) {
    $worker->respond($job);
}
