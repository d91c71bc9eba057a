"""The service's topology on this machine: what it can do, and what shardpool does.

Every row drives 2 PHP echo workers with ``--concurrency`` jobs of 16 B in
flight; figures are medians of ``--repeat`` rounds, each round running
every row once (interleaved), and ratios are against the in-process pool
of the same rounds.

- **wake-up**: two Python processes hand one byte back and forth over pipes,
  on one CPU, then on two: what a context switch costs, against a wake-up
  of another CPU. The gap decides whether pinning pays; serve measures it
  the same way (``pin_shards: auto``).
- **in-process Pool**: ``shardpool.Pool`` of 2 workers in this process,
  driven by coroutines as ``shardpool bench`` does (the baseline).
- **bare topology**: client -> broker -> 2 shards x 1 PHP worker over ZeroMQ
  in the least Python possible: blocking pyzmq, no event loop, no pool, no
  deadlines or bookkeeping; one message carries many jobs, and a shard holds
  up to ``--credit`` jobs. What the processes and hops cost by themselves.
- **serve**: ``shardpool serve --shards 2 --workers 1`` driven by one
  AsyncClient: ``--no-pin-shards``, ``--pin-shards``, and as shipped
  (``auto``, which measures and decides).

    .venv/bin/python bench/topology_bench.py [--repeat 3] [--duration 3] [--concurrency 256]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import msgspec
import uvloop
import zmq
from common import ECHO, OUT, echo_worker, machine, table

from shardpool.benchmark.baselines import measure_pool
from shardpool.benchmark.service import inspect_service, measure_service
from shardpool.broker.placement import measure_handover
from shardpool.embedded import EmbeddedService
from shardpool.protocol import FrameDecoder, encode_job

BODY = b"x" * 16
WORKERS = 2
_enc = msgspec.msgpack.Encoder().encode
_dec = msgspec.msgpack.Decoder().decode


# -- the bare topology ------------------------------------------------------------------


def _bare_shard(backend: str, credit: int) -> None:
    """Role ``shard``: one PHP worker over blocking pipes, jobs from a DEALER."""
    php = echo_worker()
    assert php.stdin is not None and php.stdout is not None
    wfd, rfd = php.stdin.fileno(), php.stdout.fileno()
    decoder = FrameDecoder()
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(backend)
    sock.send(_enc(credit))
    queue: collections.deque[tuple[int, bytes]] = collections.deque()
    out: list[tuple[int, bytes]] = []
    held = 0
    try:
        while True:
            # Wait for jobs only when none are held; else take whatever has come.
            while not queue or int(sock.get(zmq.EVENTS)) & zmq.POLLIN:
                if not queue and out:
                    sock.send(_enc(out))
                    out = []
                jobs = _dec(sock.recv())
                if jobs is None:  # the end
                    return
                queue.extend(jobs)
                held += len(jobs)
            job_id, body = queue.popleft()
            os.write(wfd, encode_job(body))
            frames = decoder.feed(os.read(rfd, 65536))
            while not frames:
                frames = decoder.feed(os.read(rfd, 65536))
            out.append((job_id, frames[0].payload))
            held -= 1
            if len(out) >= held:  # half of what it held has answered: send them back
                sock.send(_enc(out))
                out = []
    finally:
        php.kill()
        php.wait()


def _bare_broker(frontend: str, backend: str, shards: int) -> None:
    """Role ``broker``: route client batches to the shard with the most room."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    front.bind(frontend)
    back.bind(backend)
    room: dict[bytes, int] = {}
    while len(room) < shards:
        ident, data = back.recv_multipart()
        room[ident] = _dec(data)
    print("ready", flush=True)
    owner: dict[int, tuple[bytes, object]] = {}
    waiting: collections.deque[tuple[int, bytes]] = collections.deque()
    next_id = 0
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            while int(sock.get(zmq.EVENTS)) & zmq.POLLIN:
                ident, data = sock.recv_multipart()
                batch = _dec(data)
                if sock is front and batch is None:
                    for shard in room:
                        back.send_multipart([shard, _enc(None)])
                    return
                if sock is front:
                    for job_id, body in batch:
                        next_id += 1
                        owner[next_id] = (ident, job_id)
                        waiting.append((next_id, body))
                    continue
                room[ident] += len(batch)
                by_client: dict[bytes, list[tuple[object, bytes]]] = {}
                for job_id, body in batch:
                    client, their_id = owner.pop(job_id)
                    by_client.setdefault(client, []).append((their_id, body))
                for client, replies in by_client.items():
                    front.send_multipart([client, _enc(replies)])
        while waiting:
            shard = max(room, key=room.__getitem__)
            n = min(room[shard], len(waiting))
            if not n:
                break
            room[shard] -= n
            back.send_multipart([shard, _enc([waiting.popleft() for _ in range(n)])])


def bare_topology(concurrency: int, duration: float, credit: int) -> float:
    """Jobs/s of the bare topology, ``concurrency`` jobs in flight from one client."""
    OUT.mkdir(parents=True, exist_ok=True)
    frontend, backend = f"ipc://{OUT}/bare-front", f"ipc://{OUT}/bare-back"
    me = [sys.executable, __file__, "--role"]
    broker = subprocess.Popen(
        [*me, "broker", frontend, backend, "2"], stdout=subprocess.PIPE, text=True
    )
    shards = [subprocess.Popen([*me, "shard", backend, str(credit)]) for _ in range(2)]
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    try:
        assert broker.stdout is not None and broker.stdout.readline().strip() == "ready"
        sock.connect(frontend)
        clock = time.perf_counter
        sock.send(_enc([(i, BODY) for i in range(concurrency)]))
        next_id, done, counted_from = concurrency, 0, 0.0
        warm_until = clock() + min(0.5, duration / 4)
        while True:
            replies = _dec(sock.recv())
            now = clock()
            if not counted_from:
                counted_from = now if now >= warm_until else 0.0
            else:
                done += len(replies)
                if now - counted_from >= duration:
                    break
            sock.send(_enc([(next_id + i, BODY) for i in range(len(replies))]))
            next_id += len(replies)
        sock.send(_enc(None))
        return done / (now - counted_from)
    finally:
        sock.close(linger=0)
        procs: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = [broker, *shards]
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- shardpool ------------------------------------------------------------------------


def pool(concurrency: int, duration: float) -> float:
    sample, _ = uvloop.run(
        measure_pool(["php", str(ECHO)], WORKERS, concurrency, len(BODY), duration, 0.5)
    )
    return sample.jobs_s


def serve(concurrency: int, duration: float, *extra: str) -> float:
    with EmbeddedService(shards=2, workers=1, worker=str(ECHO), extra=list(extra)) as svc:
        info = inspect_service(svc.address, broker_pid=svc.pid)
        sample, _ = uvloop.run(measure_service(info, concurrency, len(BODY), duration, 0.5))
    return sample.jobs_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--credit", type=int, default=128, help="jobs a bare shard holds")
    args = parser.parse_args()
    print(machine(), flush=True)
    c, d = args.concurrency, args.duration
    if len(os.sched_getaffinity(0)) >= 2:
        handover = measure_handover(sorted(os.sched_getaffinity(0)))  # serve's own probe
        ratio = handover.cross_cpu / handover.same_cpu
        print(f"wake-up: {handover.describe()} ({ratio:.0f}x);", flush=True)
        print(f"         serve's pin_shards: auto pins here: {'yes' if handover.dear else 'no'}")
    rows: dict[str, Callable[[], float]] = {
        "in-process Pool, 2 PHP": lambda: pool(c, d),
        f"bare topology, 2 shards × 1 PHP, credit {args.credit}": lambda: bare_topology(
            c, d, args.credit
        ),
        "serve 2 shards × 1 PHP, not pinned": lambda: serve(c, d, "--no-pin-shards"),
        "serve 2 shards × 1 PHP, pinned": lambda: serve(c, d, "--pin-shards"),
        "serve 2 shards × 1 PHP, as shipped (auto)": lambda: serve(c, d),
    }
    got: dict[str, list[float]] = {name: [] for name in rows}
    for round_ in range(args.repeat):
        for name, run in rows.items():
            got[name].append(run())
            print(f"round {round_ + 1}: {name}: {got[name][-1]:,.0f} jobs/s", flush=True)
    base = statistics.median(got["in-process Pool, 2 PHP"])
    out = []
    for name, values in got.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:,.0f}" for v in values)
        out.append([name, runs, f"{median:,.0f}", f"{median / base:.2f}"])
    print()
    print(f"{c} jobs of 16 B in flight; medians of {args.repeat} interleaved rounds of {d:g} s")
    print(table(["path", "jobs/s per round", "median", "× Pool"], out))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--role"]:
        role, rest = sys.argv[2], sys.argv[3:]
        if role == "shard":
            _bare_shard(rest[0], int(rest[1]))
        elif role == "broker":
            _bare_broker(rest[0], rest[1], int(rest[2]))
        sys.exit(0)
    main()
