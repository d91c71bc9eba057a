"""The ``shardpool`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import uvloop
import zmq

from shardpool import __version__
from shardpool.argtypes import (
    add_curve_options,
    busy_poll,
    cpu_list,
    curve_keys,
    non_negative_int,
    pipeline_depth,
    positive_int,
    seconds,
)
from shardpool.curve import from_env as curve_from_env
from shardpool.errors import ConfigError, ShardpoolError


def _option(text: str) -> tuple[list[str], Any]:
    """``-o KEY=VALUE``: a dotted config key and a YAML scalar (``pool.max_jobs=100``)."""
    import yaml

    key, sep, raw = text.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE such as pool.max_jobs=100, got {text!r}"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return path, value


def _apply_options(data: dict[str, Any], options: list[tuple[list[str], Any]]) -> None:
    """Set each ``-o`` option into config data; the config checks keys and values."""
    for path, value in options:
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value


def _add_option_flag(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "-o",
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"set any config key, repeatable; dotted for sections, e.g. {example}",
    )


def _log_options(parser: argparse.ArgumentParser, default: str) -> None:
    from shardpool.logs import FORMATS, LEVELS

    parser.add_argument(
        "--log-level", choices=LEVELS, help=f"least severe level logged (default {default})"
    )
    parser.add_argument(
        "--log-format", choices=FORMATS, help="text (default) or json: one object per line"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardpool",
        description="Run jobs on persistent PHP workers (RoadRunner's worker model).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"shardpool {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    from shardpool import benchmark

    benchmark.register(sub)

    serve = sub.add_parser(
        "serve",
        help="run the broker and its shards",
        description="Start the ZeroMQ broker and N shard processes, each with its own pool.",
    )
    serve.add_argument(
        "-c", "--config", help="YAML config file (top-level keys and a pool: section)"
    )
    serve.add_argument(
        "--shards",
        type=non_negative_int,
        help="shard processes to start (default: CPU count; 0: only shards that connect)",
    )
    serve.add_argument("--frontend", help="client endpoint (default tcp://127.0.0.1:7400)")
    serve.add_argument("--backend", help="shard endpoint (default: a private ipc:// path)")
    _add_pool_flags(serve, "PHP workers per shard")
    serve.add_argument("--heartbeat", type=seconds, help="seconds between heartbeats")
    serve.add_argument(
        "--prefetch",
        type=non_negative_int,
        help="jobs per worker a shard holds beyond those running (128)",
    )
    serve.add_argument(
        "--pin-shards",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each shard and its PHP workers on CPUs of their own, or not (default: "
        "auto, where a hand-over across CPUs costs much more than one on a CPU; "
        "see docs/pool.md)",
    )
    serve.add_argument(
        "--metrics",
        metavar="ADDR",
        help="serve Prometheus metrics at http://ADDR/metrics: PORT (on loopback) or HOST:PORT",
    )
    serve.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # embedded: stop with it
    _add_option_flag(serve, "-o pool.max_jobs=100 -o pool.supervisor.exec_ttl=30s")
    _log_options(serve, "info")

    shard = sub.add_parser(
        "shard",
        help="run one shard connected to a broker (for other hosts)",
        description="Run one shard: a pool of PHP workers serving a broker's backend.",
    )
    shard.add_argument(
        "--connect", required=True, help="the broker's backend, e.g. tcp://HOST:7401"
    )
    shard.add_argument("-c", "--config", help="YAML config file (its pool: section is used)")
    shard.add_argument("--name", help="shard name (default: host-pid)")
    _add_pool_flags(shard, "PHP workers")
    shard.add_argument("--heartbeat", type=seconds, default=1.0, help=argparse.SUPPRESS)
    shard.add_argument("--liveness", type=positive_int, default=3, help=argparse.SUPPRESS)
    shard.add_argument(
        "--prefetch",
        type=non_negative_int,
        default=128,
        help="jobs per worker held beyond those running",
    )
    shard.add_argument(
        "--cpus",
        type=cpu_list,
        metavar="LIST",
        help="run this shard and its PHP workers only on these CPUs, e.g. 2 or 0-3",
    )
    shard.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    _add_option_flag(shard, "-o max_jobs=100 -o supervisor.exec_ttl=30s (pool keys)")
    add_curve_options(shard)
    _log_options(shard, "info")

    for name, text in (
        ("exec", "run one job on a running server and print the reply body"),
        ("workers", "list every shard's workers"),
        ("top", "a live view of every shard's workers (workers --watch)"),
        ("stats", "show job counts, queue length and shard load"),
        ("reset", "replace every worker, one shard at a time"),
        ("shutdown", "drain and stop a running server"),
    ):
        cmd = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        cmd.add_argument(
            "--connect", default="tcp://127.0.0.1:7400", help="the server (default %(default)s)"
        )
        cmd.add_argument("--timeout", type=seconds, default=30.0, help="seconds to wait")
        add_curve_options(cmd)
        if name == "exec":
            cmd.add_argument("body", help="the job body (text), or - to read it from stdin")
            cmd.add_argument("--context", default="", help="the job context (text)")
        if name == "workers":
            cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
            cmd.add_argument(
                "-w",
                "--watch",
                action="store_true",
                help="a live view refreshed every second (Ctrl-C to leave)",
            )
        if name in ("workers", "top"):
            cmd.add_argument(
                "--interval", type=seconds, default=1.0, help="seconds between refreshes"
            )
    keys = sub.add_parser(
        "keys",
        help="make a CURVE key pair (for serve, shards and clients)",
        description="Write NAME.key (public: hand it out) and NAME.key_secret (keep it) "
        "into DIR, for the curve: section of serve's config and --curve-* options.",
    )
    keys.add_argument("dir", metavar="DIR", help="where to write the key files")
    keys.add_argument("name", metavar="NAME", help="whose keys: server, a client or shard name")

    from shardpool import batch

    batch.add_parser(sub)
    return parser


def _check_script(path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"no such PHP worker script: {path}")


def _serve(args: argparse.Namespace) -> int:
    from shardpool.broker import Broker
    from shardpool.config import load_config, serve_config, to_builtins

    base: dict[str, Any] = {}
    if args.config:
        base = to_builtins(load_config(args.config))
    _apply_options(base, args.option)
    pool = _pool_flags(args, dict(base.pop("pool", {}) or {}))
    config = serve_config(
        base,
        shards=args.shards,
        frontend=args.frontend,
        backend=args.backend,
        heartbeat=args.heartbeat,
        prefetch=args.prefetch,
        pin_shards=args.pin_shards,
        metrics=args.metrics,
        pool=pool,
    )
    broker = Broker(config)
    broker.bind()
    broker.install_signal_handlers()
    if args.parent_pid:
        # Started by bench or batch: SIGTERM (drain, then exit) if that process dies.
        from shardpool.shard.shard import die_with_parent

        die_with_parent()
        if os.getppid() != args.parent_pid:
            return 0
    broker.start_local_shards(config.shards or 0)
    logging.getLogger("shardpool.broker").info(
        "serving on %s with %d shard(s) x %d worker(s) of %s",
        broker.frontend_address,
        config.shards,
        config.pool.num_workers,
        " ".join(config.pool.argv),
    )
    broker.run()
    return 0


def _add_pool_flags(parser: argparse.ArgumentParser, workers_help: str) -> None:
    """The pool settings both serve and shard take as flags."""
    parser.add_argument("--workers", type=positive_int, help=workers_help)
    parser.add_argument("--worker", help="PHP worker script (default: the bundled echo worker)")
    parser.add_argument("--command", help="full worker command, e.g. 'php app/worker.php'")
    parser.add_argument(
        "--pipeline-depth",
        type=pipeline_depth,
        help="jobs per worker pipe: 1 (default), N or auto",
    )
    parser.add_argument(
        "--busy-poll",
        type=busy_poll,
        metavar="DURATION",
        help="longest the loop polls for a reply before it blocks (default 50us; 0: never)",
    )


def _pool_flags(args: argparse.Namespace, pool: dict[str, Any]) -> dict[str, Any]:
    """``pool`` (a pool: section) with the flags of _add_pool_flags applied over it."""
    if args.workers:
        pool["num_workers"] = args.workers
    if args.worker:
        _check_script(args.worker)
        pool["command"] = ["php", args.worker]
    if args.command:
        pool["command"] = args.command
    if args.pipeline_depth:
        pool["pipeline_depth"] = args.pipeline_depth
    if args.busy_poll is not None:
        pool["busy_poll"] = args.busy_poll
    return pool


def _shard(args: argparse.Namespace) -> int:
    from shardpool.broker.local import pool_from_env
    from shardpool.config import load_config, pool_config, to_builtins
    from shardpool.shard import Shard
    from shardpool.shard.shard import die_with_parent, pin

    if args.parent_pid:
        die_with_parent()
    config = pool_from_env()
    if config is None:
        data = to_builtins(load_config(args.config).pool) if args.config else {}
        _apply_options(data, [(p[1:] if p[0] == "pool" else p, v) for p, v in args.option])
        config = pool_config(_pool_flags(args, data))
    if args.cpus:
        pin(args.cpus, config)  # before the pool spawns its workers: they inherit it
    shard = Shard(
        config,
        args.connect,
        name=args.name,
        heartbeat=args.heartbeat,
        liveness=args.liveness,
        parent_pid=args.parent_pid,
        prefetch=args.prefetch,
        curve=curve_keys(args) or curve_from_env(),
    )
    return uvloop.run(shard.run())


def _keys(args: argparse.Namespace) -> int:
    from shardpool import curve

    try:
        public, secret = curve.generate(args.dir, args.name)
    except OSError as exc:
        raise ConfigError(f"cannot write keys into {args.dir}: {exc.strerror}") from None
    print(f"public key: {public}  (give it to the other side)")
    print(f"secret key: {secret}  (keep it; owner-only)")
    return 0


def _client_command(args: argparse.Namespace) -> int:
    from shardpool.client import Client

    with Client(args.connect, timeout=args.timeout, curve=curve_keys(args)) as client:
        if args.subcommand == "exec":
            body = sys.stdin.buffer.read() if args.body == "-" else args.body.encode()
            reply = client.exec(body, context=args.context.encode(), timeout=args.timeout)
            sys.stdout.buffer.write(reply.body)
            if sys.stdout.isatty():
                sys.stdout.write("\n")
        elif args.subcommand in ("workers", "top"):
            from shardpool import top

            if args.subcommand == "top" or args.watch:
                return top.watch(client, args.interval)
            data = client.workers()
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                top.print_workers(data)
        elif args.subcommand == "stats":
            print(json.dumps(client.stats(), indent=2))
        elif args.subcommand == "reset":
            result = client.reset()
            print(json.dumps(result, indent=2))
        elif args.subcommand == "shutdown":
            client.shutdown()
            print("draining", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from shardpool import logs

    label = {"serve": "broker", "shard": getattr(args, "name", None) or "shard"}
    logs.setup(
        label.get(args.subcommand, args.subcommand),
        getattr(args, "log_level", None) or ("info" if args.verbose else None),
        getattr(args, "log_format", None),
        default_level="info" if args.subcommand in label else "warning",
    )
    try:
        if args.subcommand == "bench":
            from shardpool import benchmark

            return benchmark.run(args)
        if args.subcommand == "serve":
            return _serve(args)
        if args.subcommand == "shard":
            return _shard(args)
        if args.subcommand == "keys":
            return _keys(args)
        if args.subcommand == "batch":
            from shardpool import batch

            return batch.run(args)
        return _client_command(args)
    except ShardpoolError as exc:
        print(f"shardpool: {exc}", file=sys.stderr)
        return 1
    except zmq.ZMQError as exc:  # e.g. an address already in use, or malformed
        print(f"shardpool: ZeroMQ: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os._exit(main())
