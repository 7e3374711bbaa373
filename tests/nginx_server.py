"""nginx for the tests: skipped without the binary, unless ``AUTOCALLS_REQUIRE_NGINX`` is set
(CI), where a missing nginx is a failure."""

from __future__ import annotations

import os

import pytest

from benchmarks._nginx import NginxLimiter, find_nginx

__all__ = ["NginxLimiter", "require_nginx"]


def require_nginx() -> str:
    binary = find_nginx()
    if binary is None:
        reason = "nginx is not installed (apt-get install nginx-light)"
        if os.environ.get("AUTOCALLS_REQUIRE_NGINX"):
            pytest.fail(f"AUTOCALLS_REQUIRE_NGINX is set but {reason}")
        pytest.skip(reason)
    return binary
