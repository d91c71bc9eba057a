<?php

// A multipurpose test worker driven by the job body:
//   echo:TEXT   reply TEXT                 error:TEXT  soft error TEXT
//   sleep:MS    sleep, reply "slept"       crash:CODE  STDERR line, exit(CODE)
//   stop        ask to be replaced         pid         reply the process id
//   stream:N    N chunks, then "end"       mem:KB      leak KB KiB, reply memory_get_usage()
//   print:TEXT  echo TEXT to STDOUT (corrupts the stream over pipes), then reply TEXT
//   log:N       write N lines to STDERR, then reply "logged"
//   anything else: echo the job (body and context)
// stream:N honours context "ping" and SHARDPOOL_CHUNK_DELAY_MS like stream.php.
// While the file SHARDPOOL_SLOW_BOOT_FILE names exists, a worker takes 0.5 s to start.

declare(strict_types=1);

use Shardpool\Worker\Payload;
use Shardpool\Worker\Worker;

require __DIR__ . '/lib/bootstrap.php';

$leak = [];
$delayMs = (int) \getenv('SHARDPOOL_CHUNK_DELAY_MS');

$slowBoot = (string) \getenv('SHARDPOOL_SLOW_BOOT_FILE');
if ($slowBoot !== '' && \file_exists($slowBoot)) {
    \usleep(500_000);
}

$worker = Worker::create();
while ($job = $worker->waitPayload()) {
    [$command, $arg] = \explode(':', $job->body, 2) + [1 => null];

    switch ($arg === null ? $command : "$command:") {
        case 'echo:':
            $worker->respond(new Payload($arg));
            break;
        case 'error:':
            $worker->error($arg);
            break;
        case 'sleep:':
            \usleep(\max(0, (int) $arg) * 1000);
            $worker->respond(new Payload('slept'));
            break;
        case 'crash:':
            Worker::log("commands.php crashing on purpose with exit code $arg");
            exit((int) $arg);
        case 'stop':
            $worker->stop();
            break;
        case 'pid':
            $worker->respond(new Payload((string) \getmypid()));
            break;
        case 'stream:':
            $ping = $job->context === 'ping';
            for ($i = 0; $i < (int) $arg; $i++) {
                if ($i > 0 && $delayMs > 0) {
                    \usleep($delayMs * 1000);
                }
                if (!$worker->respond(new Payload("chunk $i"), false, $ping)) {
                    break;
                }
            }
            $worker->respond(new Payload($worker->streamStopped() ? 'stopped' : 'end'));
            break;
        case 'mem:':
            $leak[] = \str_repeat('x', \max(0, (int) $arg) * 1024);
            $worker->respond(new Payload((string) \memory_get_usage()));
            break;
        case 'log:':
            for ($i = 0; $i < (int) $arg; $i++) {
                \fwrite(\STDERR, "log line $i\n");
            }
            $worker->respond(new Payload('logged'));
            break;
        case 'print:':
            echo $arg;
            $worker->respond(new Payload($arg));
            break;
        default:
            $worker->respond($job);
    }
}
