"""Room for open files: each worker holds a few descriptors (its pipes, its
exit descriptor), and the usual soft limit of 1,024 runs out near 250
workers. Go programs, RoadRunner among them, raise the soft limit to the
hard one when they start; a pool does the same, as far as it needs.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("shardpool.pool")

FDS_PER_WORKER = 8  # its pipes or socket, STDERR, exit descriptor, and those of a spawn under way
FDS_SPARE = 64  # the process's own: loop, sockets, logs


def open_files_limit() -> int:
    """The soft limit on open files (0: none or unknown)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 0
    return 0 if soft == resource.RLIM_INFINITY else soft


def make_room_for(workers: int) -> None:
    """Raise the soft limit on open files, up to the hard one, if ``workers``
    workers need more than it allows. Where the hard limit is lower, spawns
    that run out fail with a message that says so."""
    needed = workers * FDS_PER_WORKER + FDS_SPARE
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if target <= soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
        return
    log.info("raised the open files limit from %d to %d for %d workers", soft, target, workers)
