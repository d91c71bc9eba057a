<?php

// Breaks the goridge protocol on purpose, chosen by the job body:
//   random:N   write N random bytes (seeded by N) to STDOUT, then wait
//   badcrc     write a reply frame whose header CRC is wrong, then wait
//   huge:KB    write a header claiming a 4 GiB payload and KB KiB of it, then exit(0)
//   half       write the first half of a valid reply frame, then exit(0)
//   anything else: echo the job
// "then wait" means: block reading the next frame, as a worker would.

declare(strict_types=1);

use Shardpool\Worker\Frame;
use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

function out(string $bytes): void
{
    \fwrite(\STDOUT, $bytes);
    \fflush(\STDOUT);
}

$worker = Worker::create();
while ($job = $worker->waitPayload()) {
    [$command, $arg] = \explode(':', $job->body, 2) + [1 => ''];
    switch ($command) {
        case 'random':
            \mt_srand((int) $arg);
            $bytes = '';
            for ($i = 0; $i < (int) $arg; $i++) {
                $bytes .= \chr(\mt_rand(0, 255));
            }
            out($bytes);
            break;
        case 'badcrc':
            $head = \pack('CCV', (1 << 4) | 4, 0, 7);
            out($head . \pack('V', \crc32($head) ^ 0xFF) . "\0\0" . \pack('V', 0) . 'bad crc');
            break;
        case 'huge':
            $head = \pack('CCV', (1 << 4) | 4, 0, 0xFFFFFFFF);
            out($head . \pack('V', \crc32($head)) . "\0\0" . \pack('V', 0) . \str_repeat('h', (int) $arg * 1024));
            exit(0);
        case 'half':
            $frame = Frame::header(0, 0, [0], 12) . 'half a reply';
            out(\substr($frame, 0, 11));
            exit(0);
        default:
            $worker->respond($job);
    }
}
