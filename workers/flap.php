<?php

// Answers the handshake, then exits at once (status 0): a worker that
// "boots" fine and dies before it can serve a job, over and over.

declare(strict_types=1);

use Shardpool\Worker\Frame;
use Shardpool\Worker\StreamRelay;

require __DIR__ . '/lib/bootstrap.php';

$address = \getenv('RR_RELAY');
$relay = StreamRelay::create($address === false || $address === '' ? 'pipes' : $address);
if ($relay->waitFrame() === null) { // the server's {"pid": N}
    exit(0);
}
$pid = \json_encode(['pid' => \getmypid()]);
$relay->write(Frame::header(Frame::CONTROL | Frame::CODEC_JSON, 0, [], \strlen($pid)) . $pid);
exit(0);
