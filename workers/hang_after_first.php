<?php

// Echoes its first job, then never answers another: a server that stops answering.

declare(strict_types=1);

use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

$worker = Worker::create();
$answered = 0;
while ($job = $worker->waitPayload()) {
    if ($answered++ > 0) {
        \sleep(3600);
    }
    $worker->respond($job);
}
