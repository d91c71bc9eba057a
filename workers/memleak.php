<?php

// Leaks SHARDPOOL_LEAK_KB KiB (default 1024) per job and replies with
// memory_get_usage(), to exercise memory limits.

declare(strict_types=1);

use Shardpool\Worker\Payload;
use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

$kb = \getenv('SHARDPOOL_LEAK_KB');
$kb = $kb === false || $kb === '' ? 1024 : (int) $kb;

$leak = [];
$worker = Worker::create();
while ($job = $worker->waitPayload()) {
    $leak[] = \str_repeat('x', $kb * 1024);
    $worker->respond(new Payload((string) \memory_get_usage()));
}
