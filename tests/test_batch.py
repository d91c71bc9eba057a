"""``shardpool batch``: the real command on a real embedded service (commands.php workers).

Most tests run ``python -m shardpool batch`` as a subprocess, each with its
own private service of 1 shard x 2 workers; the usage-error tests call
``batch.run`` in-process, where no service is needed.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, WORKERS, free_port

from shardpool import batch
from shardpool.cli import build_parser

SERVICE = ["--shards", "1", "--workers", "2", "--worker", str(WORKERS / "commands.php")]
RUN_TIMEOUT = 60.0  # bound for one batch run, service start and stop included


def write_jobs(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "shardpool", "batch", *args, *SERVICE]


def run_batch(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        batch_argv(*args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=ROOT,
    )


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Bounded poll of another process's output file: it signals nothing we could await."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the batch process"
        time.sleep(0.02)


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def slow_first(n: int = 10) -> list[dict[str, Any]]:
    """Job 0 sleeps while the others are quick, so they finish before it."""
    return [{"id": 0, "body": "sleep:400"}] + [{"id": i, "body": f"echo:r{i}"} for i in range(1, n)]


def test_results_follow_input_order(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", slow_first())
    out = tmp_path / "out.jsonl"
    done = run_batch(str(jobs), "-o", str(out))
    assert done.returncode == 0, done.stderr
    results = read_results(out)
    assert [r["id"] for r in results] == list(range(10))
    assert results[0] == {"id": 0, "body": "slept"}
    assert results[3] == {"id": 3, "body": "r3"}
    assert "10 done, 0 failed" in done.stderr
    assert "\x1b[" not in done.stderr  # no progress bar: stderr is not a terminal


def test_unordered_writes_results_as_they_finish(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", slow_first())
    out = tmp_path / "out.jsonl"
    done = run_batch(str(jobs), "-o", str(out), "--unordered")
    assert done.returncode == 0, done.stderr
    ids = [r["id"] for r in read_results(out)]
    assert sorted(ids) == list(range(10))
    assert ids[-1] == 0  # the slow job finished last, and was written last


def test_failed_job_gets_its_error_code_and_message(tmp_path: Path) -> None:
    jobs = [{"id": "a", "body": "echo:fine"}, {"id": "b", "body": "error:boom"}]
    out = tmp_path / "out.jsonl"
    done = run_batch(str(write_jobs(tmp_path / "jobs.jsonl", jobs)), "-o", str(out))
    assert done.returncode == 1
    assert read_results(out) == [
        {"id": "a", "body": "fine"},
        {"id": "b", "error": {"code": "soft_job", "message": "boom"}},
    ]
    assert "1 done, 1 failed (soft_job 1)" in done.stderr


def test_bodies_and_contexts_round_trip_as_text_or_base64(tmp_path: Path) -> None:
    binary = b"\xff\x00\xfe"
    jobs = [
        {"id": 1, "body_b64": base64.b64encode(binary).decode()},
        {"id": 2, "body": "plain", "context": "ctx"},
        {"id": 3, "body": "héllo ☃"},
    ]
    out = tmp_path / "out.jsonl"
    done = run_batch(str(write_jobs(tmp_path / "jobs.jsonl", jobs)), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert read_results(out) == [
        {"id": 1, "body_b64": base64.b64encode(binary).decode()},
        {"id": 2, "body": "plain", "context": "ctx"},
        {"id": 3, "body": "héllo ☃"},
    ]


def test_bad_lines_are_reported_with_line_numbers_and_the_run_continues(tmp_path: Path) -> None:
    lines = [
        '{"id": 1, "body": "echo:one"}',
        "not json",
        '{"body": "no id"}',
        '{"id": true, "body": "x"}',
        '{"id": 5, "body_b64": "!!!"}',
        '{"id": 6, "body": "x", "body_b64": "eA=="}',
        '{"id": 7}',
        "",
        '{"id": 9, "body": "echo:nine"}',
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    done = run_batch(str(jobs), "-o", str(out))
    assert done.returncode == 1  # not every line got a result
    assert read_results(out) == [{"id": 1, "body": "one"}, {"id": 9, "body": "nine"}]
    for number, cause in [
        (2, "not JSON"),
        (3, "missing required field `id`"),
        (4, "got `bool`"),
        (5, "not valid base64"),
        (6, 'both "body" and "body_b64"'),
        (7, "missing the body"),
    ]:
        assert f"jobs.jsonl:{number}: " in done.stderr and cause in done.stderr, done.stderr
    assert "jobs.jsonl:8:" not in done.stderr  # a blank line is not an error
    assert "6 bad lines" in done.stderr


def test_strict_stops_at_the_first_bad_line(tmp_path: Path) -> None:
    lines = ['{"id": 0, "body": "echo:a"}', '{"id": 1, "body": "echo:b"}', "{oops"]
    lines += [json.dumps({"id": i, "body": "echo:c"}) for i in range(3, 20)]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    done = run_batch(str(jobs), "-o", str(out), "--strict")
    assert done.returncode == 2
    assert "jobs.jsonl:3: not JSON" in done.stderr and "--strict" in done.stderr
    assert [r["id"] for r in read_results(out)] == [0, 1]  # read before it: run and written


def test_jobs_from_stdin_and_results_to_stdout() -> None:
    jobs = "".join(json.dumps({"id": i, "body": f"echo:s{i}"}) + "\n" for i in range(5))
    done = run_batch("-", stdin=jobs)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert results == [{"id": i, "body": f"s{i}"} for i in range(5)]


def test_interrupt_leaves_whole_lines_and_resume_finishes_the_rest(tmp_path: Path) -> None:
    count = 300  # 2 workers x 10 ms: about 1.5 s of work; the interrupt comes well before
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", [{"id": i, "body": "sleep:10"} for i in range(count)]
    )
    out = tmp_path / "out.jsonl"
    argv = batch_argv(str(jobs), "-o", str(out), "--window", "4")
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_until(lambda: complete_lines(out) >= 5)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    data = out.read_bytes()
    assert data.endswith(b"\n")
    first = [json.loads(line) for line in data.splitlines()]  # every line whole
    assert 5 <= len(first) < count

    resumed = run_batch(str(jobs), "-o", str(out), "--window", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(first):,} skipped" in resumed.stderr
    ids = [r["id"] for r in read_results(out)]
    assert sorted(ids) == list(range(count))  # exactly one result per input line


def test_second_interrupt_drops_the_jobs_in_flight(tmp_path: Path) -> None:
    jobs = [{"id": 0, "body": "echo:a"}, {"id": 1, "body": "echo:b"}]
    jobs += [{"id": i, "body": "sleep:2000"} for i in (2, 3)]
    out = tmp_path / "out.jsonl"
    argv = batch_argv(str(write_jobs(tmp_path / "jobs.jsonl", jobs)), "-o", str(out))
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: queue.Queue[str] = queue.Queue()
    stream = proc.stderr
    assert stream is not None
    reader = threading.Thread(target=lambda: [lines.put(x) for x in stream], daemon=True)
    reader.start()
    try:
        wait_until(lambda: complete_lines(out) >= 2)
        proc.send_signal(signal.SIGINT)
        first = lines.get(timeout=10)
        assert "interrupted; waiting" in first
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    reader.join(timeout=10)
    stderr = first + "".join(lines.queue)
    assert proc.returncode == 130, stderr
    assert "2 in flight dropped" in stderr
    assert read_results(out) == [{"id": 0, "body": "a"}, {"id": 1, "body": "b"}]


def test_resume_cuts_off_a_partial_last_line(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": i, "body": f"echo:{i}"} for i in range(4)])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id":0,"body":"0"}\n{"id":1,"body":"1"}\n{"id":2,"bo')
    done = run_batch(str(jobs), "-o", str(out), "--resume")
    assert done.returncode == 0, done.stderr
    assert "removed a cut-off last line" in done.stderr
    assert read_results(out) == [{"id": i, "body": str(i)} for i in range(4)]


def test_progress_flag_shows_the_bar_off_a_terminal_and_quiet_hides_all(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": i, "body": "x"} for i in range(10)])
    shown = run_batch(str(jobs), "-o", str(tmp_path / "b.jsonl"), "--progress")
    assert shown.returncode == 0 and "10/10" in shown.stderr  # done / total (lines counted)
    quiet = run_batch(str(jobs), "-o", str(tmp_path / "c.jsonl"), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""


# -- user mistakes, in-process (no service is started) ---------------------------------


def run_inline(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    args = build_parser().parse_args(["batch", *argv])
    code = batch.run(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.jsonl"], "cannot read INPUT 'missing.jsonl': No such file or directory"),
        (["jobs.jsonl", "-o", "jobs.jsonl"], "OUTPUT is INPUT"),
        (["jobs.jsonl", "--resume"], "--resume needs -o OUTPUT"),
        (["jobs.jsonl", "--connect", "tcp://127.0.0.1:1", "--shards", "2"], "not with --connect"),
        (["jobs.jsonl", "--worker", "nope.php"], "worker script not found: nope.php"),
        (["jobs.jsonl", "-o", "no/such/dir/out.jsonl"], "cannot write OUTPUT"),
    ],
)
def test_user_mistakes_get_one_line_and_status_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_jobs(tmp_path / "jobs.jsonl", [{"id": 1, "body": "x"}])
    code, err = run_inline(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1, err


def test_bad_flag_values_are_argparse_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["batch", "jobs.jsonl", "--window", "0"])
    assert exit_info.value.code == 2
    assert "--window" in capsys.readouterr().err


def test_resume_refuses_an_output_it_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": 1, "body": "x"}])
    out = tmp_path / "notes.txt"
    out.write_text("my precious notes\nmore\n")
    code, err = run_inline(capsys, str(jobs), "-o", str(out), "--resume")
    assert code == 2 and "notes.txt:1 is not a result line" in err
    assert out.read_text() == "my precious notes\nmore\n"


def test_unreachable_server_is_one_line_and_status_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(batch, "CONNECT_TIMEOUT", 0.3)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": 1, "body": "x"}])
    address = f"tcp://127.0.0.1:{free_port()}"
    code, err = run_inline(capsys, str(jobs), "-o", os.devnull, "--connect", address)
    assert code == 1
    assert f"no shardpool server answered at {address}" in err and "Traceback" not in err


def test_a_failed_service_start_is_told_in_one_line() -> None:
    # The text ServiceStartError carries: a headline, then serve's log (a shard
    # that cannot boot PHP restarts a few times first).
    text = (
        "the embedded service exited with status 1:\n"
        "2026-11-27 12:29:23,278 ERROR shard-0 shardpool.shard: shard shard-0 cannot start "
        "its pool: PHP could not find the worker script: Could not open input file: /x.php\n"
        "2026-11-27 12:29:23,814 WARNING broker shardpool.broker: shard shard-0 exited\n"
        "shard shard-0 failed at boot 3 times in a row; stopping\n"
    )
    assert batch._first_cause(text) == (
        "the embedded service exited with status 1: shard shard-0 cannot start its pool: "
        "PHP could not find the worker script: Could not open input file: /x.php"
    )
