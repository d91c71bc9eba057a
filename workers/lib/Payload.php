<?php

declare(strict_types=1);

namespace Shardpool\Worker;

/** A job received from the server, or a reply sent back to it. */
final class Payload
{
    public function __construct(
        public string $body = '',
        public string $context = '',
    ) {
    }
}
