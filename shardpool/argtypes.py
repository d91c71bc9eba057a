"""argparse value types shared by the ``shardpool`` subcommands: one wording per mistake."""

from __future__ import annotations

import argparse

from shardpool.curve import CurveKeys, client_keys
from shardpool.errors import ConfigError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


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
