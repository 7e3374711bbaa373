"""A real nginx in front of the emulator: ``limit_req`` without ``burst``, a strict leaky bucket.

nginx counts a request when its headers arrive and refuses (429 here) any request that comes
sooner than ``1 / rate`` after the previous one of the same key (the API token): stricter than
the service's fixed window, and written by nobody here. Used by the tests and the benchmarks.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["NginxLimiter", "find_nginx"]

CONFIG = """
daemon off;
master_process off;
worker_processes 1;
user {user};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format arrivals '$msec $request_time $status';
    access_log {access_log};
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    limit_req_zone $http_authorization zone=token:1m rate={rate};
    limit_req_status 429;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            limit_req zone=token;
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    """The nginx binary, or None."""
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").exists():
        found = "/usr/sbin/nginx"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NginxLimiter:
    """nginx on a free loopback port, limiting each token to ``rate`` requests per second.

    ``rate`` may also be nginx's own spelling, e.g. ``"150r/m"`` (one every 0.4 s). With
    ``access_log=True`` nginx logs every request, refused ones included: see ``arrivals()``.
    """

    def __init__(
        self, binary: str, *, upstream_port: int, rate: int | str, access_log: bool = False
    ) -> None:
        self.binary = binary
        self.upstream_port = upstream_port
        self.rate = rate
        self.access_log = access_log
        self.port = 0
        self._dir = tempfile.TemporaryDirectory(prefix="autocalls-nginx-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> NginxLimiter:
        self.port = _free_port()
        directory = Path(self._dir.name)
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        config = directory / "nginx.conf"
        config.write_text(
            CONFIG.format(
                dir=directory,
                port=self.port,
                upstream=self.upstream_port,
                rate=f"{self.rate}r/s" if isinstance(self.rate, int) else self.rate,
                user=user,
                access_log=f"{directory}/access.log arrivals" if self.access_log else "off",
            )
        )
        self.process = subprocess.Popen(
            [
                self.binary,
                "-c",
                str(config),
                "-p",
                str(directory),
                "-e",
                str(directory / "error.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.process.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nginx did not start listening")

    def arrivals(self) -> list[tuple[float, int]]:
        """(arrival time, status) of every request logged so far, in the order they ended.

        The time is nginx's own: when it began reading the request (``$msec - $request_time``,
        wall clock, millisecond resolution). Needs ``access_log=True``.
        """
        log = Path(self._dir.name) / "access.log"
        if not log.exists():
            return []
        rows = []
        for line in log.read_text().splitlines():
            ended, took, status = line.split()
            rows.append((float(ended) - float(took), int(status)))
        return rows

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self._dir.cleanup()
