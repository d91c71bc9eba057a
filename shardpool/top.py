"""``shardpool workers``: the workers of a running server, once or live (``--watch``).

Both views come from the control protocol (``workers`` and ``stats``), so
they work against a local or a remote ``serve``. The live view redraws every
``interval`` seconds with totals and throughput on top, then one row per
worker: shard, pid, state, jobs done, jobs in its pipe, memory, age and how
long its current job has run.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shardpool.errors import ShardpoolError

if TYPE_CHECKING:
    from shardpool.client import Client

_STATE_STYLE = {"ready": "green", "working": "cyan", "inactive": "yellow"}


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MB"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _busy(seconds: float) -> str:
    if not seconds:
        return ""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def workers_table(data: dict[str, Any], now: float | None = None) -> Table:
    """One row per worker of every shard; a shard that did not answer says why."""
    now = time.time() if now is None else now
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in (
        ("shard", "left"),
        ("pid", "right"),
        ("state", "left"),
        ("jobs", "right"),
        ("in pipe", "right"),
        ("memory", "right"),
        ("age", "right"),
        ("current job", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for shard, workers in sorted(data.items()):
        if isinstance(workers, dict):  # the shard did not answer
            table.add_row(shard, "", Text(str(workers.get("error", "?")), style="red"))
            continue
        for w in workers:
            state = w["state"]
            table.add_row(
                shard,
                str(w["pid"]),
                Text(state, style=_STATE_STYLE.get(state, "magenta")),
                str(w["jobs"]),
                str(w["in_flight"]),
                _mb(w["memory"]),
                _age(now - w["created_at"]),
                _busy(w.get("busy_for", 0.0)),
            )
    return table


def summary(stats: dict[str, Any], rate: float | None, workers: int) -> Text:
    """Totals line: shards, workers, throughput, jobs done and failed, queue."""
    shards = stats.get("shards", {})
    in_flight = sum(s.get("in_flight", 0) for s in shards.values())
    text = Text()
    text.append(f"{len(shards)} shards, {workers} workers", style="bold")
    text.append(f"   {rate:,.0f} jobs/s" if rate is not None else "   - jobs/s", style="bold cyan")
    text.append(f"   done {stats.get('jobs_done', 0):,}")
    failed = stats.get("jobs_failed", 0)
    text.append(f"   failed {failed:,}", style="red" if failed else "")
    text.append(f"   in flight {in_flight:,}   queued {stats.get('queue', 0):,}")
    return text


def print_workers(data: dict[str, Any]) -> None:
    Console().print(workers_table(data))


def _answered(stats: dict[str, Any]) -> int:
    return int(stats.get("jobs_done", 0)) + int(stats.get("jobs_failed", 0))


def watch(client: Client, interval: float = 1.0) -> int:
    """Redraw until Ctrl-C; a server that stops answering is shown, not fatal."""
    console = Console()
    last: tuple[float, int] | None = None
    with Live(console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                started = time.monotonic()
                try:
                    stats = client.stats()
                    data = client.workers()
                except ShardpoolError as exc:
                    live.update(Text(f"{client.address}: {exc}", style="red"), refresh=True)
                else:
                    answered = _answered(stats)
                    rate = None
                    if last is not None and started > last[0]:
                        rate = (answered - last[1]) / (started - last[0])
                    last = (started, answered)
                    head = Text(f"shardpool at {client.address}   {time.strftime('%H:%M:%S')}")
                    workers = sum(len(w) for w in data.values() if isinstance(w, list))
                    view = Group(head, summary(stats, rate, workers), Text(""), workers_table(data))
                    live.update(view, refresh=True)
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            pass
    return 0
