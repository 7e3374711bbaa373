"""A real ``redis-server`` for tests: a free loopback port, a temp dir, no persistence.

Tests run against the real engine (Lua, ``TIME``, expiry), never a fake. Without the binary
the Redis tests are skipped with the reason, unless ``AUTOCALLS_REQUIRE_REDIS`` is set (CI),
where a missing binary is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

__all__ = ["RedisCluster", "RedisServer", "require_redis_cluster", "require_redis_server"]


def require_redis_server() -> str:
    """The path of ``redis-server``, or skip (fail when ``AUTOCALLS_REQUIRE_REDIS`` is set)."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("AUTOCALLS_REQUIRE_REDIS"):
            pytest.fail(f"AUTOCALLS_REQUIRE_REDIS is set but {reason}")
        pytest.skip(reason)
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int, timeout: float = 0.5) -> bool:
    """Speak RESP directly: the helper must not depend on the client under test."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; ``url`` once started; ``stop()`` / ``kill()`` end it."""

    def __init__(self, binary: str, *args: str) -> None:
        self.binary = binary
        self.args = args  #: more configuration, e.g. ("--maxmemory-policy", "allkeys-lru")
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        # The port is picked, freed, then bound by redis-server: another process may take it
        # in between, so a start that fails is tried again on another port.
        for _ in range(3):
            if self._start_once(timeout):
                return self
        raise RuntimeError("redis-server did not start (see its log above)")

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Start again on the same port (empty: nothing is persisted), as after a crash."""
        self.stop()
        if not self._start_once(timeout, self.port):
            raise RuntimeError("redis-server did not restart (see its log above)")
        return self

    def _start_once(self, timeout: float, port: int = 0) -> bool:
        self._dir = tempfile.TemporaryDirectory(prefix="autocalls-redis-")
        self.port = port or _free_port()
        log = Path(self._dir.name) / "redis.log"
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--logfile",
                str(log),
                "--daemonize",
                "no",
                *self.args,
            ],  # fmt: skip
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if _ping(self.port):
                return True
            time.sleep(0.02)
        if log.exists():
            print(log.read_text(errors="replace")[-2000:])
        self.stop()
        return False

    def kill(self) -> None:
        """End it abruptly, as a crash or an OOM kill would: connections are reset."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
            self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class RedisCluster:
    """Three ``redis-server --cluster-enabled yes`` nodes, joined by ``redis-cli --cluster
    create`` (three primaries, no replicas): ``url`` is a ``redis+cluster://`` URL of one node."""

    def __init__(self, binary: str, cli: str) -> None:
        self.binary = binary
        self.cli = cli
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, timeout: float = 30.0) -> RedisCluster:
        try:
            for _ in range(3):
                node = RedisServer(
                    self.binary,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    # Its own free port: the default (port + 10000) may be taken, or past 65535.
                    "--cluster-port",
                    str(_free_port()),
                )
                self.nodes.append(node.start())
            created = subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{node.port}" for node in self.nodes),
                    "--cluster-yes",
                ],
                check=False,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if created.returncode:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
            deadline = time.monotonic() + timeout
            while not all(self._ok(node.port) for node in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _ok(self, port: int) -> bool:
        answer = subprocess.run(
            [self.cli, "-p", str(port), "cluster", "info"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return "cluster_state:ok" in answer.stdout

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()


def require_redis_cluster() -> tuple[str, str]:
    """``redis-server`` and ``redis-cli`` (for ``--cluster create``), or skip (fail when
    ``AUTOCALLS_REQUIRE_REDIS`` is set)."""
    server = require_redis_server()
    cli = shutil.which("redis-cli")
    if cli is None:
        reason = (
            "redis-cli is not installed (it comes with redis-server: apt-get install redis-tools)"
        )
        if os.environ.get("AUTOCALLS_REQUIRE_REDIS"):
            pytest.fail(f"AUTOCALLS_REQUIRE_REDIS is set but {reason}")
        pytest.skip(reason)
    return server, cli
