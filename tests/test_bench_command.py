"""`shardpool bench`: the sweep, its table, JSON and plot, --connect, errors and Ctrl-C.

Every test runs the real command as a subprocess (`python -m shardpool bench`)
with short runs, so it measures real PHP workers, a real embedded service
and real baselines, just briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, Service

BENCH = [sys.executable, "-m", "shardpool", "bench"]
RUN_TIMEOUT = 90.0  # seconds for a whole short bench (a loaded 2-core machine is slow)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RATIO_COLUMNS = (("limit", "× limit"), ("pool", "× pool"), ("per_job_php", "× php/job"))


def bench(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BENCH, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def table_rows(stdout: str) -> list[dict[str, str]]:
    """The Markdown table the command prints when stdout is not a terminal."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, stdout
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:  # after the header and its rule
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def size_label(size: int) -> str:
    return f"{size >> 10} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def key(entry: dict[str, Any]) -> tuple[str, str, str]:
    return entry["label"], str(entry["concurrency"]), size_label(entry["size"])


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def close_to(cell: str, value: float) -> bool:
    """A table cell shows ``value`` rounded to the digits it has."""
    decimals = len(cell.partition(".")[2])
    return abs(number(cell) - value) <= 0.5 * 10**-decimals + 1e-9


def test_quick_run_prints_table_json_and_plot_that_agree(tmp_path: Path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = bench(
        "--quick", "--duration", "0.2", "--concurrency", "16", "--shards", "2",
        "--json", str(out), "--plot", str(plot),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is False
    assert doc["machine"]["cpus"] >= 1
    rows = {(r["configuration"], r["in flight"], r["body"]): r for r in table_rows(result.stdout)}
    entries = doc["baselines"] + doc["configurations"]
    assert set(rows) == {key(e) for e in entries}
    assert {b["kind"] for b in doc["baselines"]} == {"limit", "pool", "per-job php"}
    assert [(c["shards"], c["concurrency"]) for c in doc["configurations"]] == [(2, 16)]
    baselines = {b["id"]: b for b in doc["baselines"]}
    for config in doc["configurations"]:
        row = rows[key(config)]
        assert row["jobs/s"] == f"{config['jobs_s']:,.0f}"
        assert config["jobs"] > 0 and config["p50_us"] <= config["p99_us"] <= config["max_us"]
        for name, column in RATIO_COLUMNS:
            base = baselines[config["compared_with"][name]]
            assert config["ratios"][name] == pytest.approx(config["jobs_s"] / base["jobs_s"])
            assert close_to(row[column], config["ratios"][name]), (row, config)
        assert set(config["cpu_percent"]) == {"client", "broker", "shards", "php"}
        assert row["broker %"] and row["PHP %"]
    for entry in entries:
        # Every job wakes its PHP worker at least once (it blocks between jobs).
        assert entry["switches_per_job"] >= 0.5, entry
        assert close_to(rows[key(entry)]["switches/job"], entry["switches_per_job"]), entry
    data = plot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_pipeline_depths_are_measured_side_by_side_each_against_its_own_pool(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench.json"
    result = bench(
        "--quick", "--duration", "0.2", "--concurrency", "16", "--shards", "1",
        "--pipeline-depth", "1,4", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["settings"]["pipeline_depths"] == ["1", "4"]
    configs = doc["configurations"]
    assert [(c["pipeline_depth"], c["label"].endswith("depth 4")) for c in configs] == [
        ("1", False),
        ("4", True),
    ]
    pools = {b["id"]: b for b in doc["baselines"] if b["kind"] == "pool"}
    assert sorted(b["pipeline_depth"] for b in pools.values()) == ["1", "4"]
    for config in configs:
        pool = pools[config["compared_with"]["pool"]]
        assert pool["pipeline_depth"] == config["pipeline_depth"]
        assert config["jobs"] > 0
    rows = {r["configuration"] for r in table_rows(result.stdout)}
    php = configs[0]["workers"]  # one shard with a worker per CPU
    assert {f"serve 1 shard × {php} PHP, depth 4", f"in-process Pool, {php} PHP, depth 4"} <= rows


@pytest.mark.parametrize(("flag", "seconds"), [("0", 0.0), ("50us", 50e-6)])
def test_busy_poll_setting_reaches_the_service_and_the_pool_baseline(
    tmp_path: Path, flag: str, seconds: float
) -> None:
    out = tmp_path / "bench.json"
    result = bench(
        "--quick", "--duration", "0.2", "--concurrency", "16", "--shards", "1",
        "--busy-poll", flag, "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr  # serve took --busy-poll as given
    doc = json.loads(out.read_text())
    assert doc["settings"]["busy_poll"] == pytest.approx(seconds)
    assert all(c["jobs"] > 0 for c in doc["configurations"])


@pytest.mark.parametrize(
    ("flag", "setting"), [("--pin-shards", True), ("--no-pin-shards", False), (None, "auto")]
)
def test_the_service_is_placed_as_asked_and_its_label_says_how_it_ran(
    tmp_path: Path, flag: str | None, setting: bool | str
) -> None:
    out = tmp_path / "bench.json"
    result = bench(
        "--quick", "--duration", "0.2", "--concurrency", "16", "--shards", "1,2",
        "--workers", "1", *([flag] if flag else []), "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr  # serve took the flag
    doc = json.loads(out.read_text())
    assert doc["settings"]["pin_shards"] == setting
    assert all(c["jobs"] > 0 for c in doc["configurations"])
    got = {c["shards"]: (c["pinned"], c["label"]) for c in doc["configurations"]}
    # one shard keeps every CPU: never pinned, whatever the setting
    assert got[1] == (False, "serve 1 shard × 1 PHP")
    pinned, label = got[2]
    if setting == "auto":  # serve measured and chose; the row says what it chose
        assert isinstance(pinned, bool)
    else:
        assert pinned is setting
    assert label == "serve 2 shards × 1 PHP" + (", pinned" if pinned else "")
    rows = {r["configuration"] for r in table_rows(result.stdout)}
    assert label in rows


def test_a_server_that_stops_answering_fails_the_run_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardpool.benchmark import service as measuring
    from shardpool.benchmark.limit import BenchmarkError

    hang = str(ROOT / "workers" / "hang_after_first.php")
    args = ("--shards", "1", "--workers", "1", "--worker", hang, "-o", "drain_timeout=0.5s")
    server = Service(tmp_path, *args)
    try:
        info = measuring.inspect_service(server.address)
        monkeypatch.setattr(measuring, "JOB_TIMEOUT", 0.5)
        started = time.monotonic()
        with pytest.raises(BenchmarkError, match=r"left jobs unanswered 0\.5 s after the run"):
            asyncio.run(measuring.measure_service(info, 2, 16, 0.2, 0.0))
        assert time.monotonic() - started < 10
    finally:
        # The hung job would hold up the server's drain: end its worker first.
        for proc in psutil.Process(server.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if proc.name() == "php":
                    proc.kill()
        server.stop()


def test_connect_measures_a_running_server(tmp_path: Path) -> None:
    service = Service(tmp_path, "--shards", "1", "--workers", "2")
    try:
        out = tmp_path / "bench.json"
        result = bench(
            "--connect", service.address, "--quick", "--duration", "0.2", "--concurrency", "4",
            "--json", str(out),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (config,) = json.loads(out.read_text())["configurations"]
        assert config["label"] == f"server {service.address}"
        assert (config["workers"], config["shards"], config["jobs"] > 0) == (2, 1, True)
        # the server runs here, so its processes are found for the CPU columns
        assert set(config["cpu_percent"]) == {"client", "broker", "shards", "php"}
        assert config["ratios"]["limit"] > 0
        row = next(r for r in table_rows(result.stdout) if r["configuration"].startswith("server"))
        assert row["broker %"] != ""
    finally:
        assert service.stop() == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--concurrency", "0"],
        ["--concurrency", "many"],
        ["--size", "12q"],
        ["--duration", "-1"],
        ["--worker", "no/such/worker.php"],
        ["--plot", "no/such/dir/bench.png"],
        ["--plot", "bench.txt"],
        ["--connect", "tcp://127.0.0.1:1", "--shards", "2"],
        ["--pipeline-depth", "0"],
        ["--pipeline-depth", "deep"],
        ["--connect", "tcp://127.0.0.1:1", "--pipeline-depth", "4"],
        ["--busy-poll", "1s"],
        ["--connect", "tcp://127.0.0.1:1", "--busy-poll", "0"],
        ["--connect", "tcp://127.0.0.1:1", "--pin-shards"],
        ["--connect", "tcp://127.0.0.1:1", "--no-pin-shards"],
    ],
)
def test_bad_arguments_give_a_one_line_error(args: list[str]) -> None:
    result = bench(*args, timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("shardpool bench: error: "), result.stderr
    assert result.stdout == ""


def wait_for_line(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """Read the process's stderr until a line contains ``marker`` (bounded)."""
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while marker not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} in time; stderr so far:\n{seen.decode()}"
            if sel.select(left):
                chunk = proc.stderr.read1(65536)
                assert chunk, f"the bench exited early:\n{seen.decode()}"
                seen += chunk
    return seen


def php_descendants(pid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if proc.name().startswith("php"):
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


def test_ctrl_c_prints_results_so_far_and_leaves_no_php(tmp_path: Path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.Popen(
        [*BENCH, "--duration", "1", "--concurrency", "16", "--shards", "1",
         "--json", str(out), "--plot", str(plot)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_for_line(proc, b"[4/4] serve", RUN_TIMEOUT)  # the baselines are done
        # The embedded service's PHP workers show up once it is up: poll them
        # (another process: there is no event to wait on), bounded.
        deadline = time.monotonic() + 30
        while not [p for p in php_descendants(proc.pid) if p.ppid() != proc.pid]:
            assert time.monotonic() < deadline, "the embedded service did not start"
            time.sleep(0.05)
        everything = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr
    text = stdout.decode()
    assert "interrupted: 3 run(s) done" in text
    assert len(table_rows(text)) == 3  # php per job, limit, pool
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is True and len(doc["baselines"]) == 3
    assert doc["configurations"] == []
    assert plot.read_bytes().startswith(PNG_MAGIC)
    _, alive = psutil.wait_procs(everything, timeout=10)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
