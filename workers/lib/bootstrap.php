<?php

// Loads the shardpool worker library (no Composer): require this file from a worker script.

declare(strict_types=1);

require_once __DIR__ . '/Frame.php';
require_once __DIR__ . '/Payload.php';
require_once __DIR__ . '/Relay.php';
require_once __DIR__ . '/Worker.php';
