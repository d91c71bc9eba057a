<?php

// Echoes SHARDPOOL_STOP_AFTER jobs (default 3), then answers every further job
// with a stop request ("replace me") and waits until the server stops it.

declare(strict_types=1);

use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

$limit = \getenv('SHARDPOOL_STOP_AFTER');
$limit = $limit === false || $limit === '' ? 3 : (int) $limit;

$worker = Worker::create();
$served = 0;
while ($job = $worker->waitPayload()) {
    if ($served >= $limit) {
        $worker->stop();
        continue;
    }
    $worker->respond($job);
    $served++;
}
