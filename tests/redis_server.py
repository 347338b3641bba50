"""Real redis-server instances for tests and benchmarks: own port, own dir, stopped after.

Never touches a system service: each instance binds 127.0.0.1 on a free port, keeps no
persistence, and lives in a temporary directory.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server child process; ``kill()`` then ``start()`` brings it back on the same port."""

    def __init__(
        self, *args: str, password: str | None = None, port: int | None = None, tls: bool = False
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.port = port or free_port()
        self.password = password
        self.args = list(args)
        self.dir = Path(tempfile.mkdtemp(prefix="kvstore-redis-"))
        self.proc: subprocess.Popen | None = None
        self.tls = tls
        if tls:
            self._make_certificate()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    @property
    def ca_file(self) -> str:
        return str(self.dir / "cert.pem")

    def _make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1 (the server's and the clients' CA)."""
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-keyout",
                str(self.dir / "key.pem"),
                "-out",
                self.ca_file,
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )

    def _listen_args(self) -> list[str]:
        if not self.tls:
            return ["--port", str(self.port)]
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            self.ca_file,
            "--tls-key-file",
            str(self.dir / "key.pem"),
            "--tls-ca-cert-file",
            self.ca_file,
            "--tls-auth-clients",
            "no",
        ]

    def start(self, timeout: float = 10.0) -> RedisServer:
        cmd = [
            "redis-server",
            *self._listen_args(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--protected-mode",
            "no",
            *self.args,
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {cmd}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def ping(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as raw,
        ):
            sock = raw
            if self.tls:
                context = ssl.create_default_context(cafile=self.ca_file)
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
            sock.sendall(auth + b"PING\r\n")
            reply = sock.recv(64)
            return b"PONG" in reply or (bool(auth) and reply.startswith(b"+OK"))
        return False

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_redis(
    *args: str, password: str | None = None, tls: bool = False
) -> Iterator[RedisServer]:
    server = RedisServer(*args, password=password, tls=tls).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_srv() -> Iterator[RedisServer]:
    """A fresh redis-server per test (tests/conftest.py makes it available everywhere)."""
    with running_redis() as server:
        yield server
