"""EmbeddedService: the private serve behind bench and batch."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
from conftest import ROOT, WORKERS

from shardpool.client import Client
from shardpool.embedded import EmbeddedService, ServiceStartError


def test_runs_jobs_and_stops_with_its_context() -> None:
    with EmbeddedService(shards=2, workers=1) as service:
        with Client(service.address, timeout=10) as client:
            assert client.exec(b"hi").body == b"hi"
            assert len(client.stats()["shards"]) == 2
        serve = psutil.Process(service.pid)
        family = [serve, *serve.children(recursive=True)]
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive


def test_a_worker_that_cannot_start_is_reported_with_serves_output() -> None:
    command = f"php {WORKERS / 'missing.php'}"  # PHP itself says what is wrong
    with pytest.raises(ServiceStartError, match="Could not open input file"):
        EmbeddedService(shards=1, workers=1, command=command).start()


def test_serve_stops_when_the_process_that_started_it_is_killed() -> None:
    script = textwrap.dedent(
        """
        import sys
        from shardpool.embedded import EmbeddedService
        service = EmbeddedService(shards=1, workers=1)
        service.start()
        print(service.pid, flush=True)
        sys.stdin.read()  # until killed
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
    )
    assert parent.stdout is not None
    serve = psutil.Process(int(parent.stdout.readline()))
    family = [serve, *serve.children(recursive=True)]
    assert any(p.name().startswith("php") for p in family)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"outlived their parent: {alive}"
