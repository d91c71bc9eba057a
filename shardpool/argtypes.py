"""argparse value types shared by the ``shardpool`` subcommands: one wording per mistake."""

from __future__ import annotations

import argparse

from shardpool.config import MAX_BUSY_POLL, MAX_PIPELINE_DEPTH, parse_duration
from shardpool.curve import CurveKeys, client_keys
from shardpool.errors import ConfigError


def _int_from(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a number of at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_from(text, 1)


def non_negative_int(text: str) -> int:
    return _int_from(text, 0)


def busy_poll(text: str) -> float:
    """A pool's ``busy_poll``: a duration up to 10ms (``50us``), 0 for none."""
    try:
        value = float(parse_duration(text))
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_BUSY_POLL:
        raise argparse.ArgumentTypeError(
            f"a busy poll is a duration from 0 (none) to {MAX_BUSY_POLL * 1e3:g}ms, "
            f"e.g. 50us; got {text!r}"
        )
    return value


def pipeline_depth(text: str) -> int | str:
    """A pool's ``pipeline_depth``: 1 to 64, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PIPELINE_DEPTH:
        # One message for every bad value: it names "auto", which a bare number check would not.
        raise argparse.ArgumentTypeError(
            f"a pipeline depth is a whole number from 1 to {MAX_PIPELINE_DEPTH}, or auto; "
            f"got {text!r}"
        )
    return value


def cpu_list(text: str) -> list[int]:
    """CPU numbers as taskset writes them: ``3``, ``0,2`` or ``0-3``, one or more."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            low = int(first)
            high = int(last) if dash else low
            if low < 0 or high < low:
                raise ValueError
            cpus.update(range(low, high + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected CPU numbers such as 3, 0,2 or 0-3; got {text!r}"
        ) from None
    return sorted(cpus)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def add_curve_options(parser: argparse._ActionsContainer) -> None:
    """``--curve-server FILE --curve-key FILE``: connect to a broker that uses CURVE."""
    parser.add_argument(
        "--curve-server", metavar="FILE", help="CURVE: the broker's public key file (.key)"
    )
    parser.add_argument(
        "--curve-key", metavar="FILE", help="CURVE: our own secret key file (.key_secret)"
    )


def curve_keys(args: argparse.Namespace) -> CurveKeys | None:
    """The keys ``add_curve_options`` asked for; both files or neither."""
    if bool(args.curve_server) != bool(args.curve_key):
        raise ConfigError("CURVE needs both --curve-server and --curve-key")
    if args.curve_server:
        return client_keys(args.curve_server, args.curve_key)
    return None
