<?php

// One job per process, the way a script run from cron or xargs works: read the
// job body from STDIN (or the first argument), write the reply to STDOUT, exit.
// bench/batch_bench.py runs it as the "one PHP process per job" baseline.

declare(strict_types=1);

$body = $argc > 1 ? $argv[1] : \stream_get_contents(STDIN);
echo $body;
