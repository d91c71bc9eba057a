"""``shardpool batch``: push a JSON Lines file of jobs through the service.

Jobs are read one line at a time (never the whole file) and at most
``--window`` of them are in flight, so memory stays flat however long the
input. Results go out as JSON Lines, in input order (``AsyncClient.map``
holds at most the window) or, with ``--unordered``, as they finish (one
lane per window slot, each awaiting ``AsyncClient.exec``).

Line formats are in :data:`FORMATS` (also shown by ``--help``). Every output
line is written whole; a Ctrl-C stops reading, lets the jobs in flight finish
for a few seconds (a second Ctrl-C drops them at once), and leaves OUTPUT a
file of complete lines that ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import msgspec
import uvloop
import zmq

from shardpool.argtypes import add_curve_options, curve_keys, positive_int, seconds
from shardpool.client import AsyncClient
from shardpool.embedded import EmbeddedService, ServiceStartError
from shardpool.errors import ErrorCode, ShardpoolError, UnavailableError
from shardpool.payload import Payload

if TYPE_CHECKING:
    from rich.progress import Progress

DEFAULT_WINDOW = 1024
DRAIN_GRACE = 5.0  # seconds the jobs in flight get to finish after a Ctrl-C
CONNECT_TIMEOUT = 3.0  # seconds a --connect server has to answer a ping
TICK = 0.2  # seconds between progress updates and output flushes
MAX_REPORTED = 20  # bad lines reported one by one; the rest are only counted
# Failures that mean "the service went away", not "this job failed": after a
# Ctrl-C (which a terminal also sends to the embedded service) they are not
# written, so --resume runs those jobs again.
GONE = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.SHARD_LOST, ErrorCode.POOL_CLOSED})

FORMATS = """\
input: JSON Lines, one job per line (blank lines are skipped, unknown keys ignored)
  {"id": 1, "body": "hello"}                  body as UTF-8 text
  {"id": "a7", "body_b64": "AAEC/w=="}        body as base64, for bytes
  {"id": 3, "body": "x", "context": "{}"}     optional context: "context" (text) or
                                              "context_b64"
  id: a string or a number, echoed in the result; ids should be unique
  (--resume skips a line whose id is already in OUTPUT).

output: JSON Lines, one line per job
  {"id": 1, "body": "hello"}                  the reply body as text when it is valid
  {"id": "a7", "body_b64": "AAEC/w=="}        UTF-8, else as base64; a reply context
                                              comes as "context" / "context_b64"
  {"id": 3, "error": {"code": "soft_job", "message": "..."}}
                                              the job failed; codes are stable
                                              (docs/protocol.md, section 5)
  A bad input line gets no output line: it is reported on stderr with its
  line number and counted in the summary.

exit status: 0 every job done; 1 a job failed, a line was bad, or the run
failed; 2 a usage error, or a bad line with --strict; 130 interrupted.

examples:
  shardpool batch jobs.jsonl -o results.jsonl
  shardpool batch jobs.jsonl -o results.jsonl --resume      # after a Ctrl-C
  generate-jobs | shardpool batch - --unordered --connect tcp://127.0.0.1:7400
"""

Id = str | int | float


class JobLine(msgspec.Struct):
    """One input line."""

    id: Id
    body: str | None = None
    body_b64: str | None = None
    context: str | None = None
    context_b64: str | None = None


class DoneLine(msgspec.Struct):
    """What --resume reads from an existing output line."""

    id: Id


class JobError(msgspec.Struct):
    code: str
    message: str


class ResultLine(msgspec.Struct, omit_defaults=True):
    """One output line."""

    id: Id
    body: str | None = None
    body_b64: str | None = None
    context: str | None = None
    context_b64: str | None = None
    error: JobError | None = None


_job_decoder = msgspec.json.Decoder(JobLine)
_done_decoder = msgspec.json.Decoder(DoneLine)
_encoder = msgspec.json.Encoder()


class BadLine(Exception):
    """An input line that is not a job; the message says why."""


class UsageError(Exception):
    """A mistake in the command line or its files: exit status 2."""


def parse_job(raw: bytes) -> tuple[Id, Payload]:
    """The id and payload of one input line; raises :class:`BadLine`."""
    try:
        job = _job_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise BadLine(f"not a job: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadLine(f"not JSON: {exc}") from None
    body = _bytes(job.body, job.body_b64, "body")
    if body is None:
        raise BadLine('missing the body: give "body" (text) or "body_b64" (base64)')
    return job.id, Payload(body, _bytes(job.context, job.context_b64, "context") or b"")


def _bytes(text: str | None, b64: str | None, key: str) -> bytes | None:
    if text is not None:
        if b64 is not None:
            raise BadLine(f'both "{key}" and "{key}_b64": give one')
        try:
            return text.encode()
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise BadLine(f'"{key}" is not valid Unicode text; use "{key}_b64"') from None
    if b64 is None:
        return None
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadLine(f'"{key}_b64" is not valid base64 ({exc})') from None


def result_line(jid: Id, outcome: Payload | ShardpoolError) -> bytes:
    """The output line (with its newline) of a job's reply or error."""
    if isinstance(outcome, ShardpoolError):
        line = ResultLine(jid, error=JobError(str(outcome.code), str(outcome)))
    else:
        line = ResultLine(jid)
        line.body, line.body_b64 = _text_or_b64(outcome.body)
        if outcome.context:
            line.context, line.context_b64 = _text_or_b64(outcome.context)
    return _encoder.encode(line) + b"\n"


def _text_or_b64(data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode(), None
    except UnicodeDecodeError:
        return None, base64.b64encode(data).decode("ascii")


def scan_output(path: str) -> tuple[set[Id], bool]:
    """The ids already in an output file, for --resume.

    A last line cut short (no newline: the run was killed mid-write) is
    truncated away; returns the ids and whether that happened. A complete
    line that is not a result means the file is not ours: refuse.
    """
    done: set[Id] = set()
    end = 0
    with open(path, "r+b") as file:
        for number, raw in enumerate(file, 1):
            if not raw.endswith(b"\n"):
                break
            try:
                done.add(_done_decoder.decode(raw).id)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise UsageError(
                    f"{path}:{number} is not a result line ({exc}); --resume only continues "
                    "an output file written by shardpool batch"
                ) from None
            end += len(raw)
        cut = file.seek(0, os.SEEK_END) != end
        if cut:
            file.truncate(end)
    return done, cut


def count_lines(path: str) -> int:
    """Lines in a regular file, counted in 1 MiB chunks (for the progress total)."""
    lines, last = 0, b"\n"
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


class Stats:
    """What the summary reports."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.ended: float | None = None
        self.done = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.bad = 0
        self.blank = 0
        self.skipped = 0
        self.dropped = 0

    @property
    def finished(self) -> int:
        """Lines dealt with, for the progress bar."""
        return self.done + self.failed.total() + self.bad + self.blank

    def summary(self, interrupted: bool) -> str:
        jobs = self.done + self.failed.total()
        wall = (self.ended or time.monotonic()) - self.started
        parts = [f"{self.done:,} done", f"{self.failed.total():,} failed"]
        if self.failed:
            kinds = ", ".join(f"{code} {n:,}" for code, n in self.failed.most_common())
            parts[-1] += f" ({kinds})"
        parts.append(f"{self.bad:,} bad line{'s' * (self.bad != 1)}")
        if self.skipped:
            parts.append(f"{self.skipped:,} skipped (already in OUTPUT)")
        if self.dropped:
            parts.append(f"{self.dropped:,} in flight dropped (--resume runs them)")
        head = "interrupted: " if interrupted else ""
        rate = jobs / wall if wall > 0 else 0.0
        return f"{head}{jobs:,} jobs in {wall:.1f} s ({rate:,.0f} jobs/s): " + ", ".join(parts)


class Batch:
    """One run: input lines in, result lines out, through one AsyncClient."""

    def __init__(
        self,
        args: argparse.Namespace,
        source: IO[bytes],
        sink: IO[bytes],
        skip: set[Id],
        total: int | None,
    ) -> None:
        self.args = args
        self.name = "<stdin>" if args.input == "-" else args.input
        self.source = source
        self.sink = sink
        self.skip = skip
        self.total = total
        self.stats = Stats()
        self.stopping = False  # read no more input
        self.signal: int | None = None  # the signal that interrupted the run
        self.fatal: str | None = None  # a --strict bad line
        self.write_error: OSError | None = None
        self.in_flight = 0
        self.progress: Progress | None = None
        self.task_id: Any = None  # the progress bar's task
        self._work: asyncio.Task[None] | None = None

    # -- messages -------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A line on stderr, above the progress bar when there is one."""
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def _bad(self, number: int, why: str) -> None:
        self.stats.bad += 1
        if self.args.strict:
            self.fatal = f"{self.name}:{number}: {why}"
            self.stopping = True
        elif self.stats.bad <= MAX_REPORTED:
            self.say(f"shardpool batch: {self.name}:{number}: {why}")
            if self.stats.bad == MAX_REPORTED:
                self.say("shardpool batch: further bad lines are counted, not shown")

    # -- input and output -----------------------------------------------------------

    def jobs(self) -> Iterator[tuple[Id, Payload]]:
        """The jobs to run, one input line at a time, until the input ends or a stop."""
        skip, stats = self.skip, self.stats
        for number, raw in enumerate(self.source, 1):
            if self.stopping:
                return
            if raw.isspace():
                stats.blank += 1
                continue
            try:
                jid, payload = parse_job(raw)
            except BadLine as exc:
                self._bad(number, str(exc))
                continue
            if skip and jid in skip:
                stats.skipped += 1
                continue
            self.in_flight += 1
            yield jid, payload

    def record(self, jid: Id, outcome: Payload | ShardpoolError) -> None:
        """Write one result line (whole, in one write) and count it."""
        self.in_flight -= 1
        if isinstance(outcome, ShardpoolError):
            if self.signal is not None and outcome.code in GONE:
                self.stats.dropped += 1  # the service is stopping under us: leave it to --resume
                return
            self.stats.failed[outcome.code] += 1
        else:
            self.stats.done += 1
        if self.write_error is not None:
            return
        try:
            self.sink.write(result_line(jid, outcome))
        except OSError as exc:  # a full disk, a closed pipe: stop, and say so
            self.write_error = exc
            self.stopping = True
            self._abort()

    # -- the run --------------------------------------------------------------------

    async def main(self, address: str, check: bool) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        curve = curve_keys(self.args) if self.args.connect else None
        async with AsyncClient(address, timeout=self.args.timeout, curve=curve) as client:
            if check:
                try:
                    await client.ping(timeout=CONNECT_TIMEOUT)
                except UnavailableError:
                    raise UnavailableError(
                        f"no shardpool server answered at {address} within "
                        f"{CONNECT_TIMEOUT:g} s; is `shardpool serve` running there?"
                    ) from None
            self.stats = Stats()  # time the jobs, not the connection check
            ticker = asyncio.create_task(self._tick())
            lanes = self._unordered(client) if self.args.unordered else self._ordered(client)
            self._work = asyncio.create_task(lanes)
            try:
                await self._work
            except asyncio.CancelledError:
                if not self.stopping:
                    raise
                self.stats.dropped += self.in_flight
            finally:
                self.stats.ended = time.monotonic()
                ticker.cancel()
                self._flush()
                if self.progress is not None:
                    self.progress.update(self.task_id, completed=self.stats.finished)

    async def _ordered(self, client: AsyncClient) -> None:
        ids: collections.deque[Id] = collections.deque()

        def bodies() -> Iterator[Payload]:
            for jid, payload in self.jobs():
                ids.append(jid)
                yield payload

        replies = client.map(
            bodies(), window=self.args.window, timeout=self.args.timeout, return_exceptions=True
        )
        async with contextlib.aclosing(replies):
            async for outcome in replies:
                self.record(ids.popleft(), outcome)

    async def _unordered(self, client: AsyncClient) -> None:
        replies = client.map_unordered(
            self.jobs(), window=self.args.window, timeout=self.args.timeout
        )
        async with contextlib.aclosing(replies):
            async for jid, outcome in replies:
                self.record(jid, outcome)

    def _on_signal(self, signum: int) -> None:
        if self.signal is None and not self.stopping:
            self.signal = signum
            self.stopping = True
            self.say(
                f"shardpool batch: interrupted; waiting up to {DRAIN_GRACE:g} s for "
                f"{self.in_flight:,} job(s) in flight (Ctrl-C again to drop them)"
            )
            asyncio.get_running_loop().call_later(DRAIN_GRACE, self._abort)
        else:
            self.signal = self.signal or signum
            self.stopping = True
            self._abort()

    def _abort(self) -> None:
        if self._work is not None and not self._work.done():
            self._work.cancel()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)  # a periodic refresh, not a synchronisation
            self._flush()
            if self.progress is not None:
                self.progress.update(self.task_id, completed=self.stats.finished)

    def _flush(self) -> None:
        if self.write_error is None:
            try:
                self.sink.flush()
            except OSError as exc:
                self.write_error = exc
                self.stopping = True
                self._abort()

    def exit_status(self) -> int:
        if self.signal is not None:
            return 128 + self.signal
        if self.fatal is not None:
            return 2
        if self.write_error is not None or self.stats.failed or self.stats.bad:
            return 1
        return 0


# -- progress -----------------------------------------------------------------------


def _progress(batch: Batch, forced: bool) -> Progress:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.speed
            return Text(
                "" if speed is None else f"{speed:,.0f} jobs/s", style="progress.data.speed"
            )

    columns: list[ProgressColumn] = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn() if batch.total is not None else TextColumn("{task.completed:,}"),
        RateColumn(),
        TimeElapsedColumn(),
    ]
    if batch.total is not None:
        columns[3:3] = [TaskProgressColumn()]
        columns.append(TimeRemainingColumn())
    console = Console(stderr=True, force_terminal=True if forced else None)
    progress = Progress(*columns, console=console, speed_estimate_period=10.0)
    batch.task_id = progress.add_task("batch", total=batch.total)
    return progress


# -- the command --------------------------------------------------------------------


SERVICE_FLAGS = ("shards", "workers", "worker", "command", "config")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``batch`` on the ``shardpool`` command's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "batch",
        help="run a JSON Lines file of jobs, with a progress bar",
        description="Run every job of a JSON Lines file (or stdin) on PHP workers and write\n"
        "one JSON result line per job. Runs a private service on every core unless\n"
        "--connect names a running one.",
        epilog=FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", help="the jobs file, or - for stdin")
    parser.add_argument("-o", "--output", metavar="OUTPUT", help="results file (default stdout)")
    parser.add_argument(
        "--unordered", action="store_true", help="write results as they finish, not in input order"
    )
    parser.add_argument(
        "--window",
        "--in-flight",
        dest="window",
        type=positive_int,
        default=DEFAULT_WINDOW,
        metavar="N",
        help="jobs in flight at most (default %(default)s); in order, also results held",
    )
    parser.add_argument(
        "--timeout", type=seconds, metavar="SECONDS", help="each job's deadline (default none)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip ids already in OUTPUT and append to it (a cut-off last line is removed)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first bad input line (exit status 2)"
    )
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress",
        action="store_true",
        help="show the progress bar even if stderr is no terminal",
    )
    shown.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    where = parser.add_argument_group("service (default: a private one on every core)")
    where.add_argument(
        "--connect", metavar="ADDR", help="use a running server, e.g. tcp://HOST:7400"
    )
    add_curve_options(where)
    where.add_argument("--shards", type=positive_int, help="shard processes (default: CPU count)")
    where.add_argument("--workers", type=positive_int, help="PHP workers per shard")
    where.add_argument("--worker", metavar="SCRIPT", help="PHP worker script (default: echo)")
    where.add_argument("--command", help="full worker command, e.g. 'php app/worker.php'")
    where.add_argument("-c", "--config", help="serve's YAML config file")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``shardpool batch``; returns the exit status."""
    with contextlib.ExitStack() as files:
        try:
            _check_flags(args)
            source = _open_input(args, files)
            sink, skip = _open_output(args, files)
        except UsageError as exc:
            print(f"shardpool batch: {exc}", file=sys.stderr)
            return 2
        show = not args.quiet and (args.progress or sys.stderr.isatty())
        total = None
        if show and args.input != "-" and os.path.isfile(args.input):
            total = max(0, count_lines(args.input) - len(skip))
        batch = Batch(args, source, sink, skip, total)
        if show:
            batch.progress = _progress(batch, forced=args.progress)
        try:
            _execute(batch, args)
        except KeyboardInterrupt:  # before the run's own handler was in place
            batch.signal = signal.SIGINT
        except UnavailableError as exc:
            batch.say(f"shardpool batch: {exc}")
            return 1
        except ServiceStartError as exc:
            batch.say(f"shardpool batch: {_first_cause(str(exc))}")
            return 1
        except zmq.ZMQError as exc:
            batch.say(f"shardpool batch: ZeroMQ: {exc} (address {args.connect!r}?)")
            return 2
        finally:
            if batch.progress is not None:
                batch.progress.stop()
            batch.progress = None
        return _report(batch, args)


def _execute(batch: Batch, args: argparse.Namespace) -> None:
    progress = batch.progress
    if args.connect:
        if progress is not None:
            progress.start()
        uvloop.run(batch.main(args.connect, check=True))
        return
    service = EmbeddedService(
        shards=args.shards,
        workers=args.workers,
        worker=args.worker,
        command=args.command,
        config=args.config,
    )
    with service:
        if progress is not None:
            progress.start()
        uvloop.run(batch.main(service.address, check=False))


def _first_cause(text: str) -> str:
    """One line from a failed service start: the headline and serve's first error."""
    head, *log = text.splitlines()
    for line in log:
        if " ERROR " in line and ": " in line:
            return f"{head.rstrip(':')}: {line.split(': ', 1)[1]}"
    return head.rstrip(":") + (f": {log[-1]}" if log else "")


def _report(batch: Batch, args: argparse.Namespace) -> int:
    if batch.write_error is not None:
        where = args.output or "stdout"
        print(f"shardpool batch: cannot write {where}: {batch.write_error}", file=sys.stderr)
    if batch.fatal is not None:
        print(f"shardpool batch: {batch.fatal} (--strict: stopped)", file=sys.stderr)
    if not args.quiet:
        print(f"shardpool batch: {batch.stats.summary(batch.signal is not None)}", file=sys.stderr)
    return batch.exit_status()


def _check_flags(args: argparse.Namespace) -> None:
    if args.connect:
        given = [f"--{name}" for name in SERVICE_FLAGS if getattr(args, name) is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)} configure the private service; not with --connect"
            )
    elif args.curve_server or args.curve_key:
        raise UsageError("--curve-server and --curve-key are for a server given with --connect")
    if args.worker and not os.path.isfile(args.worker):
        raise UsageError(f"worker script not found: {args.worker}")
    if args.resume and args.output in (None, "-"):
        raise UsageError("--resume needs -o OUTPUT (it reads the results already there)")


def _open_input(args: argparse.Namespace, files: contextlib.ExitStack) -> IO[bytes]:
    if args.input == "-":
        return sys.stdin.buffer
    try:
        return files.enter_context(open(args.input, "rb", buffering=1 << 20))
    except OSError as exc:
        raise UsageError(f"cannot read INPUT {args.input!r}: {exc.strerror}") from None


def _open_output(
    args: argparse.Namespace, files: contextlib.ExitStack
) -> tuple[IO[bytes], set[Id]]:
    """The output stream, and with --resume the ids already in it."""
    output = args.output
    if output in (None, "-"):
        return sys.stdout.buffer, set()
    exists = os.path.exists(output)
    if exists and args.input != "-" and os.path.samefile(args.input, output):
        raise UsageError("OUTPUT is INPUT: results would overwrite the jobs; pick another file")
    skip: set[Id] = set()
    if args.resume and exists:
        try:
            skip, cut = scan_output(output)
        except OSError as exc:
            raise UsageError(f"cannot read OUTPUT {output!r} to resume: {exc.strerror}") from None
        if cut:
            print(f"shardpool batch: removed a cut-off last line from {output}", file=sys.stderr)
    try:
        mode = "ab" if args.resume else "wb"
        return files.enter_context(open(output, mode, buffering=1 << 20)), skip
    except OSError as exc:
        raise UsageError(f"cannot write OUTPUT {output!r}: {exc.strerror}") from None
