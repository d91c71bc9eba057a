"""CURVE authentication and encryption for the broker's ZeroMQ endpoints.

Keys are ZeroMQ certificate files, as ``zmq.auth`` writes them:
``shardpool keys DIR NAME`` makes ``DIR/NAME.key`` (public, to hand out) and
``DIR/NAME.key_secret`` (secret, stays with its owner).

The broker serves with its secret key; a :class:`Gatekeeper` (a ZAP handler on
a thread of pyzmq's ``ThreadAuthenticator``) admits a client or shard only if
its public key is in the allowed directory for that endpoint, and logs each
refused key (once a minute per key, so a peer retrying cannot flood the log).
A peer without CURVE at all fails the handshake; the broker logs that too
(see :func:`watch_handshakes`).

Shards that ``serve`` starts itself get a fresh key pair per run, passed in
their environment (``SHARDPOOL_CURVE``) and admitted alongside the files.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from shardpool.errors import ConfigError

log = logging.getLogger("shardpool.broker")

CURVE_ENV = "SHARDPOOL_CURVE"
CLIENTS = "clients"  # ZAP domains of the two endpoints
SHARDS = "shards"
_REFUSAL_LOG_INTERVAL = 60.0


class CurveKeys(NamedTuple):
    """What a connecting peer needs: the server's public key and its own pair (z85)."""

    server_public: bytes
    public: bytes
    secret: bytes


def generate(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` and ``name.key_secret`` into ``directory`` (made owner-only)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = zmq.auth.create_certificates(str(path), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_secret(path: str | Path, what: str) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file; ConfigError naming ``what``."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot read a secret key from {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"{what}: {path} holds only a public key; give the .key_secret file")
    return public, secret


def load_public(path: str | Path, what: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot read a public key from {path}: {exc}") from None
    return public


def client_keys(server_key: str | Path, own_secret: str | Path) -> CurveKeys:
    """Keys for a client or a shard: the server's public key file and our secret key file."""
    server_public = load_public(server_key, "server key")
    public, secret = load_secret(own_secret, "own key")
    return CurveKeys(server_public, public, secret)


def allowed_keys(location: str | Path, what: str) -> set[bytes]:
    """The public keys (z85) in a directory of ``*.key`` files, or in one file."""
    path = Path(location)
    files = sorted(path.glob("*.key")) if path.is_dir() else [path]
    if not path.exists():
        raise ConfigError(f"{what}: no such file or directory: {path}")
    keys = {load_public(f, what) for f in files}
    if not keys:
        raise ConfigError(f"{what}: no public keys (*.key files) in {path}")
    return keys


def secure_client(sock: zmq.Socket[Any], keys: CurveKeys) -> None:
    """Make ``sock`` (before connect) a CURVE client of the server with ``keys``."""
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


def secure_server(sock: zmq.Socket[Any], secret_key: bytes, domain: str) -> None:
    """Make ``sock`` (before bind) a CURVE server whose peers ZAP checks under ``domain``."""
    sock.curve_server = True
    sock.curve_secretkey = secret_key
    sock.zap_domain = domain.encode()


def to_env(keys: CurveKeys) -> str:
    return json.dumps({k: v.decode() for k, v in keys._asdict().items()})


def from_env() -> CurveKeys | None:
    text = os.environ.get(CURVE_ENV)
    if not text:
        return None
    data = json.loads(text)
    return CurveKeys(*(data[k].encode() for k in CurveKeys._fields))


class _Allowed:
    """A ZAP credentials provider: admits known keys, logs the others."""

    def __init__(self, keys: set[bytes], what: str) -> None:
        self.keys = keys
        self.what = what
        self.refused = 0
        self._logged: dict[bytes, float] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._logged.get(key, -_REFUSAL_LOG_INTERVAL) >= _REFUSAL_LOG_INTERVAL:
            self._logged[key] = now
            log.warning(
                "refused a %s with public key %s: not an allowed key",
                self.what,
                key.decode(),
                extra={"event": "peer_refused", "peer_key": key.decode()},
            )
        return False


class Gatekeeper:
    """Runs ZAP for the broker: which keys may connect to which endpoint."""

    def __init__(self, context: zmq.Context[Any]) -> None:
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("shardpool.zap"))
        self._auth.start()
        self.providers: dict[str, _Allowed] = {}

    def allow(self, domain: str, keys: set[bytes], what: str) -> None:
        provider = self.providers.get(domain)
        if provider is None:
            provider = self.providers[domain] = _Allowed(set(keys), what)
            self._auth.configure_curve_callback(domain, credentials_provider=provider)
        else:
            provider.keys |= keys

    @property
    def refused(self) -> int:
        return sum(p.refused for p in self.providers.values())

    def stop(self) -> None:
        self._auth.stop()


_HANDSHAKE_FAILURES = {
    getattr(zmq, name): text
    for name, text in (
        ("EVENT_HANDSHAKE_FAILED_NO_DETAIL", "handshake failed"),
        ("EVENT_HANDSHAKE_FAILED_PROTOCOL", "handshake failed (protocol: no CURVE, or wrong key)"),
        ("EVENT_HANDSHAKE_FAILED_AUTH", "authentication failed"),
    )
    if hasattr(zmq, name)
}


def watch_handshakes(sock: zmq.Socket[Any]) -> zmq.Socket[Any] | None:
    """A monitor socket reporting failed handshakes on ``sock``, if libzmq has the events."""
    if not _HANDSHAKE_FAILURES:
        return None
    mask = 0
    for event in _HANDSHAKE_FAILURES:
        mask |= int(event)
    monitor: zmq.Socket[Any] = sock.get_monitor_socket(mask)
    return monitor


def handshake_failure(event: Mapping[str, Any]) -> str | None:
    """The text for a failed handshake event from :func:`watch_handshakes`, else None."""
    text = _HANDSHAKE_FAILURES.get(event.get("event"))
    if text is None:
        return None
    endpoint = event.get("endpoint", b"")
    if isinstance(endpoint, bytes):
        endpoint = endpoint.decode(errors="replace")
    return f"{text} on {endpoint}"
