"""CURVE: only peers with an allowed key get in; the broker logs the others."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Service, free_port

from shardpool.client import Client
from shardpool.curve import client_keys
from shardpool.errors import ConfigError, ShardpoolError


def keys(directory: Path, name: str) -> tuple[Path, Path]:
    subprocess.run(
        [sys.executable, "-m", "shardpool", "keys", str(directory), name],
        check=True, capture_output=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    return directory / f"{name}.key", directory / f"{name}.key_secret"


class Curved:
    def __init__(self, root: Path) -> None:
        self.server_public, self.server_secret = keys(root / "server", "server")
        self.client_public, self.client_secret = keys(root / "clients", "alice")
        self.shard_public, self.shard_secret = keys(root / "shards", "remote")
        _, self.stranger_secret = keys(root / "strangers", "mallory")
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        config = root / "shardpool.yaml"
        config.write_text(
            f"curve:\n  server_key: {self.server_secret}\n"
            f"  clients: {root / 'clients'}\n  shards: {root / 'shards'}\n"
            "pool:\n  num_workers: 1\n"
        )
        args = ("-c", str(config), "--shards", "1", "--backend", self.backend)
        self.service = Service(root, *args, ready=False)
        try:
            self.wait_ready()
        except BaseException:
            self.service.stop()
            raise

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        with self.client(timeout=2) as client:
            while True:
                assert self.service.proc.poll() is None, self.service.output()
                try:
                    if client.stats()["shards"]:
                        return
                except ShardpoolError:
                    pass
                assert time.monotonic() < deadline, f"not ready:\n{self.service.output()}"
                time.sleep(0.05)  # polling another process: no event to await

    def client(self, secret: Path | None = None, timeout: float = 10) -> Client:
        curve = (str(self.server_public), str(secret or self.client_secret))
        return Client(self.service.address, timeout=timeout, curve=curve)

    def shard(self, name: str, secret: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "shardpool", "shard", "--connect", self.backend,
             "--name", name, "--workers", "1",
             "--curve-server", str(self.server_public), "--curve-key", str(secret)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip


@pytest.fixture(autouse=True)
def no_leaked_php() -> Iterator[None]:
    """The module shares one service, whose workers live across tests; the
    ``curved`` fixture checks for leaked PHP processes when it stops."""
    yield


@pytest.fixture(scope="module")
def curved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Curved]:
    setup = Curved(tmp_path_factory.mktemp("curve"))
    try:
        yield setup
    finally:
        setup.service.stop_leaving_no_php()


def test_a_client_with_an_allowed_key_is_served(curved: Curved) -> None:
    with curved.client() as client:
        assert client.exec(b"hello").body == b"hello"
        assert list(client.stats()["shards"]) == ["shard-0"]  # a local shard, keyed by serve


def jobs_done(curved: Curved) -> int:
    with curved.client() as client:
        return int(client.stats()["jobs_done"])


def test_a_client_without_curve_gets_nothing_and_is_logged(curved: Curved) -> None:
    before = jobs_done(curved)
    with (
        Client(curved.service.address, timeout=0.5, grace=0.5) as plain,
        pytest.raises(ShardpoolError),
    ):
        plain.exec(b"let me in")
    assert jobs_done(curved) == before  # the job never ran
    assert "refused a peer: handshake failed" in curved.service.output()


def test_a_client_with_an_unknown_key_gets_nothing_and_is_logged(curved: Curved) -> None:
    before = jobs_done(curved)
    with (
        curved.client(curved.stranger_secret, timeout=0.5) as stranger,
        pytest.raises(ShardpoolError),
    ):
        stranger.exec(b"let me in")
    assert jobs_done(curved) == before
    public = client_keys(curved.server_public, curved.stranger_secret).public.decode()
    assert f"refused a client with public key {public}" in curved.service.output()


def test_only_a_shard_with_an_allowed_key_joins(curved: Curved) -> None:
    stranger = curved.shard("intruder", curved.stranger_secret)
    remote = curved.shard("remote", curved.shard_secret)
    try:
        deadline = time.monotonic() + 30
        with curved.client() as client:
            while "remote" not in client.stats()["shards"]:
                assert time.monotonic() < deadline, "the keyed shard never joined"
                time.sleep(0.1)  # polling another process: no event to await
            # both connected at the same moment; the stranger had every chance to join
            assert "intruder" not in client.stats()["shards"]
            refused = f"refused a shard with public key {stranger_key(curved)}"
            while refused not in curved.service.output():
                assert time.monotonic() < deadline, "the refused shard was not logged"
                time.sleep(0.1)
            assert "intruder" not in client.stats()["shards"]
    finally:
        for proc in (stranger, remote):
            proc.terminate()
            proc.wait(30)


def stranger_key(curved: Curved) -> str:
    return client_keys(curved.server_public, curved.stranger_secret).public.decode()


def test_curve_config_names_a_missing_key_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(f"curve:\n  server_key: {tmp_path}/nope.key_secret\n  clients: {tmp_path}\n")
    result = subprocess.run(
        [sys.executable, "-m", "shardpool", "serve", "-c", str(config)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0
    assert "server_key" in result.stderr and "nope.key_secret" in result.stderr


def test_a_public_key_is_not_a_secret_key(tmp_path: Path) -> None:
    public, _ = keys(tmp_path, "someone")
    with pytest.raises(ConfigError, match="only a public key"):
        client_keys(public, public)


def test_ipc_endpoints_are_owner_only(tmp_path: Path) -> None:
    import stat

    backend = tmp_path / "private" / "backend"
    service = Service(tmp_path, "--shards", "1", "--workers", "1", "--backend", f"ipc://{backend}")
    try:
        assert stat.S_IMODE(backend.stat().st_mode) == 0o600
        assert stat.S_IMODE(backend.parent.stat().st_mode) == 0o700
    finally:
        service.stop()


def test_keys_are_written_with_an_owner_only_secret(tmp_path: Path) -> None:
    import stat

    public, secret = keys(tmp_path / "k", "someone")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    assert public.read_text().count("public-key") == 1 and "secret" not in public.read_text()


def test_command_line_clients_connect_with_curve_keys(curved: Curved, tmp_path: Path) -> None:
    keys_args = [
        "--curve-server",
        str(curved.server_public),
        "--curve-key",
        str(curved.client_secret),
    ]
    run = lambda *argv, **kw: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "shardpool", *argv, "--connect", curved.service.address, *keys_args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, **kw,
    )  # fmt: skip
    workers = run("workers")
    assert workers.returncode == 0 and "shard-0" in workers.stdout, workers.stderr
    lines = "".join(f'{{"id": {i}, "body": "job {i}"}}\n' for i in range(3))
    batch = run("batch", "-", "--quiet", input=lines)
    assert batch.returncode == 0, batch.stderr
    assert sorted(batch.stdout.splitlines()) == [f'{{"id":{i},"body":"job {i}"}}' for i in range(3)]
    out = tmp_path / "bench.json"
    bench = run("bench", "--quick", "--concurrency", "4", "--json", str(out))
    assert bench.returncode == 0, bench.stderr
    assert out.stat().st_size > 0


def test_curve_flags_without_a_server_to_connect_to_are_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardpool", "batch", "-", "--curve-server", "x.key",
         "--curve-key", "y.key_secret"],
        capture_output=True, text=True, timeout=30, cwd=ROOT, input="",
    )  # fmt: skip
    assert result.returncode == 2 and "--connect" in result.stderr
