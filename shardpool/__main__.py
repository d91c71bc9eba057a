"""``python -m shardpool``: the same as the ``shardpool`` command."""

import sys

from shardpool.cli import main

sys.exit(main())
