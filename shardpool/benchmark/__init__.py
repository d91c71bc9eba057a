"""``shardpool bench``: the service measured against baselines run at the same moment.

- :mod:`~shardpool.benchmark.drive`: the client load loop (also used by ``bench/``);
- :mod:`~shardpool.benchmark.limit`: the raw limit of the PHP workers;
- :mod:`~shardpool.benchmark.baselines`: the in-process pool and one php per job;
- :mod:`~shardpool.benchmark.service`: the service, embedded or ``--connect``;
- :mod:`~shardpool.benchmark.cpu`: CPU use of process groups;
- :mod:`~shardpool.benchmark.runner`: the sweep; :mod:`~shardpool.benchmark.report`:
  table, JSON and plot; :mod:`~shardpool.benchmark.command`: the subcommand.
"""

from shardpool.benchmark.command import register, run

__all__ = ["register", "run"]
