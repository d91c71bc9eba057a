"""Log set-up for every shardpool process: one line per event, text or JSON.

Each process labels its records (``broker``, ``shard-0``, ``client``) so lines
from several processes stay readable in one stream. Child processes inherit
the level and format through ``SHARDPOOL_LOG_LEVEL`` and
``SHARDPOOL_LOG_FORMAT``, so ``serve --log-format json`` makes its shards
write JSON too. Fields given as ``extra={"worker_pid": ..., "reason": ...}``
become JSON keys (and stay in the message text for the plain format).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

LEVEL_ENV = "SHARDPOOL_LOG_LEVEL"
FORMAT_ENV = "SHARDPOOL_LOG_FORMAT"
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(proc)s %(name)s: %(message)s"

# LogRecord attributes that are not "extra" fields.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "proc"}


class _Label(logging.Filter):
    """Stamps each record with the process label."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def filter(self, record: logging.LogRecord) -> bool:
        record.proc = self.label
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, proc, pid, logger, msg and extras."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "proc": getattr(record, "proc", ""),
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


def _iso(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


def setup(
    label: str,
    level: str | None = None,
    fmt: str | None = None,
    *,
    default_level: str = "warning",
    stream: TextIO | None = None,
) -> None:
    """Configure the root logger for this process and export the choice to children."""
    level = (level or os.environ.get(LEVEL_ENV) or default_level).lower()
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "text").lower()
    if level not in LEVELS:
        level = default_level
    if fmt not in FORMATS:
        fmt = "text"
    os.environ[LEVEL_ENV] = level
    os.environ[FORMAT_ENV] = fmt
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_Label(label))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def is_json() -> bool:
    return os.environ.get(FORMAT_ENV) == "json"
