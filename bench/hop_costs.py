"""What a job costs in each process of the service other than the shard.

Two shards beat one in-process pool only when the client, the broker and
PHP together cost less per job than the work the pool's one process does
(bench/RESULTS.md, "What limits it"). Timed end to end, those costs drown
in this machine's noise; measured apart, each is steady:

- **php**: instructions the bundled echo worker executes per 16 B job,
  counted by callgrind with the jobs fed through a pipe and the replies
  written to /dev/null; the difference between two job counts, so start-up
  cancels out. Needs valgrind (``apt-get install valgrind``).
- **broker**: CPU per job of the broker's own Python, with no sockets: a
  ``Broker`` takes messages of ``--batch`` jobs, dispatches them to two
  shards, encodes them, files the shards' replies and encodes those for the
  client. ZeroMQ, the kernel and the other processes are left out.
- **client**: CPU per job of an ``AsyncClient`` driven as ``shardpool bench``
  drives it (``--concurrency`` coroutines, each awaiting ``exec`` in turn),
  against a broker that answers each message at once (plain pyzmq, on the
  other CPU); the client runs on one CPU and counts its own CPU time, its
  ZeroMQ thread included.

Each figure is the median of ``--repeat`` runs. To compare with another
version, run it with ``PYTHONPATH`` pointing at a checkout of that version
(the PHP worker measured is then the one that checkout bundles).

    .venv/bin/python bench/hop_costs.py [--parts php,broker,client]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uvloop
import zmq
from common import machine, names_of, table

from shardpool import wire
from shardpool.argtypes import positive_int
from shardpool.config import DEFAULT_WORKER, serve_config
from shardpool.protocol import encode_job

PARTS = ("php", "broker", "client")
_REFS = re.compile(r"Collected\s*:\s*(\d+)")


# -- php ---------------------------------------------------------------------------


def php_instructions(few: int = 20_000, many: int = 40_000) -> float:
    """Instructions per 16 B job of the bundled echo worker."""
    job = encode_job(b"x" * 16)

    def count(jobs: int) -> int:
        with tempfile.TemporaryFile() as feed:
            feed.write(job * jobs)
            feed.seek(0)
            # Through a pipe, as from a pool: PHP reads a plain file differently.
            cat = subprocess.Popen(["cat"], stdin=feed, stdout=subprocess.PIPE)
            argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
            done = subprocess.run(
                [*argv, "php", str(DEFAULT_WORKER)],
                stdin=cat.stdout,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                timeout=600,
            )
            cat.wait()
        found = _REFS.search(done.stderr.replace(",", ""))
        if done.returncode != 0 or found is None:
            raise SystemExit(f"the counted PHP run failed:\n{done.stderr[-2000:]}")
        return int(found.group(1))

    return (count(many) - count(few)) / (many - few)


# -- broker ------------------------------------------------------------------------


def broker_cpu(batch: int, rounds: int = 3000) -> float:
    """Microseconds of the broker's Python per job (its private steps, driven
    as its loop drives them; the sockets are stubbed out)."""
    from shardpool.broker.broker import Broker, ShardState

    broker = Broker(serve_config())
    sent: list[tuple[bytes, bytes]] = []
    broker._to_shard = lambda ident, data: sent.append((ident, data))  # type: ignore[method-assign]

    class Frontend:  # what _flush sends to the client goes nowhere
        def send(self, data: bytes, flags: int = 0) -> None:
            pass

    broker.frontend = Frontend()
    for name in (b"shard-0", b"shard-1"):
        hello = wire.Hello(name=name.decode(), capacity=1 << 30)
        broker.shards[name] = ShardState(name, hello, time.monotonic())
    client = b"\x00client"
    messages = [
        wire.encode(
            wire.Submit(jobs=[wire.Job(id=r * batch + k, body=b"x" * 16) for k in range(batch)])
        )
        for r in range(rounds)
    ]
    spent = 0.0
    for data in messages:
        started = time.perf_counter()
        broker._on_client(client, data)
        broker._dispatch()
        broker._flush()
        spent += time.perf_counter() - started
        # The shards' part, not counted: answer every job it was sent.
        answers = []
        for ident, submitted in sent:
            message = wire.broker_decoder.decode(submitted)
            assert isinstance(message, wire.Submit)
            jobs = message.jobs
            answers.append(
                (ident, wire.encode(wire.Replies(replies=[wire.Reply(j.id, j.body) for j in jobs])))
            )
        sent.clear()
        started = time.perf_counter()
        for ident, data_back in answers:
            broker._on_shard(ident, data_back)
        broker._flush()
        spent += time.perf_counter() - started
    return spent / (rounds * batch) * 1e6


# -- client ------------------------------------------------------------------------


def answering_broker(address: str) -> None:
    """Role ``broker``: answer every job at once, each message with one message."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(address)
    print("ready", flush=True)
    while True:
        ident, data = sock.recv_multipart()
        message = wire.client_decoder.decode(data)
        if isinstance(message, wire.Submit):
            replies = [wire.Reply(j.id, j.body, j.ctx) for j in message.jobs]
            sock.send_multipart([ident, wire.encode(wire.Replies(replies=replies))])


async def _drive(address: str, concurrency: int, duration: float) -> tuple[int, float]:
    from shardpool.client import AsyncClient

    async with AsyncClient(address) as client:
        body = b"x" * 16
        for _ in range(100):  # connected and warm
            await client.exec(body)
        done = 0
        stop = time.monotonic() + duration
        before = resource.getrusage(resource.RUSAGE_SELF)

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < stop:
                await client.exec(body)
                done += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done, cpu


def client_cpu(concurrency: int, duration: float) -> float:
    """Microseconds of CPU per job in the client's process."""
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        address = f"ipc://{tmp}/broker"
        broker = subprocess.Popen(
            [sys.executable, __file__, "--child", "broker", address],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert broker.stdout is not None
            if broker.stdout.readline().strip() != "ready":
                raise SystemExit("the answering broker did not start")
            if len(cpus) > 1:  # apart, so that the client's CPU is its own
                os.sched_setaffinity(broker.pid, cpus[1:])
            argv = [sys.executable, __file__, "--child", "client", address]
            child = subprocess.run(
                [*argv, str(concurrency), str(duration), str(cpus[0])],
                capture_output=True,
                text=True,
                timeout=duration + 60,
            )
            if child.returncode != 0:
                raise SystemExit(f"the client run failed:\n{child.stderr[-2000:]}")
            jobs, cpu = child.stdout.split()
            return float(cpu) / int(jobs) * 1e6
        finally:
            broker.kill()
            broker.wait()


# -- main --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts", type=names_of(PARTS), default=list(PARTS), help="what to measure"
    )
    parser.add_argument("--repeat", type=positive_int, default=3, help="runs per figure")
    parser.add_argument("--batch", type=positive_int, default=48, help="jobs per broker message")
    parser.add_argument(
        "--concurrency", type=positive_int, default=256, help="client jobs in flight"
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per client run")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, address, *rest = args.child
        if role == "broker":
            answering_broker(address)
        else:
            concurrency, duration, cpu = rest
            os.sched_setaffinity(0, [int(cpu)])
            jobs, spent = uvloop.run(_drive(address, int(concurrency), float(duration)))
            print(jobs, spent)
        return
    if "php" in args.parts and shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind), or leave out php")
    rows = []
    measures: dict[str, tuple[str, Callable[[], float], str]] = {
        "php": ("instructions per 16 B job, echo worker", php_instructions, "{:,.0f}"),
        "broker": (
            f"µs of Python per job, {args.batch} jobs per message",
            lambda: broker_cpu(args.batch),
            "{:.2f}",
        ),
        "client": (
            f"µs of CPU per job, AsyncClient, {args.concurrency} in flight",
            lambda: client_cpu(args.concurrency, args.duration),
            "{:.2f}",
        ),
    }
    for part in args.parts:
        what, measure, shown = measures[part]
        runs = [measure() for _ in range(args.repeat)]
        print(f"{part}: {', '.join(shown.format(r) for r in runs)}", flush=True)
        rows.append(
            [
                part,
                what,
                ", ".join(shown.format(r) for r in runs),
                shown.format(statistics.median(runs)),
            ]
        )
    print()
    print(machine())
    print(f"shardpool from {Path(sys.modules['shardpool'].__file__ or '').parent}")
    print(table(["part", "measure", "runs", "median"], rows))


if __name__ == "__main__":
    main()
