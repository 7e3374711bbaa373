"""Shared fixtures: a clean environment, the emulator on a free loopback port, client factory."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from autocalls_async import AsyncAutocalls, RetryPolicy
from autocalls_async.testing import MockAutocalls
from benchmarks._nginx import find_nginx

# As the plugin's docs say: loaded from the root conftest.py, so its marker is registered
# before any test module is imported (tests/test_pytest_plugin.py uses it).
pytest_plugins = ["autocalls_async.testing.pytest_plugin"]

#: What a full run needs beyond pip, how to get it, and what happens without it.
SERVERS = (
    (
        "redis-server",
        lambda: shutil.which("redis-server"),
        "AUTOCALLS_REQUIRE_REDIS",
        "the Redis tests (about 30)",
        "sudo apt-get install redis-server (Debian, Ubuntu) or brew install redis (macOS)",
    ),
    (
        "nginx",
        find_nginx,
        "AUTOCALLS_REQUIRE_NGINX",
        "the tests against nginx's limit_req (a few)",
        "sudo apt-get install nginx-light (Debian, Ubuntu) or brew install nginx (macOS)",
    ),
)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say at the start, not only in the skips at the end, what is missing and how to get it."""
    lines = []
    for name, find, required, tests, install in SERVERS:
        if find() is None:
            fate = (
                f"fail ({required} is set)"
                if os.environ.get(required)
                else "be skipped, and the coverage gate may fail without them"
            )
            lines.append(f"{name} is not installed: {tests} will {fate}; install: {install}")
    return lines


#: Retries without real waiting: the policy is tested on its own in test_retry.py.
FAST_RETRIES = RetryPolicy(backoff_base=0.01, backoff_max=0.02)


@pytest.fixture(autouse=True)
def _clean_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    for name in ("AUTOCALLS_API_TOKEN", "AUTOCALLS_BASE_URL", "AUTOCALLS_LOG"):
        monkeypatch.delenv(name, raising=False)
    # The default limiter is host-wide and its files outlive a run: each test gets its own
    # directory (children inherit it), so no test sees another's pauses or schedule.
    monkeypatch.setenv("AUTOCALLS_LIMITER_DIR", str(tmp_path_factory.mktemp("limiter")))
    yield


@pytest.fixture
async def server() -> AsyncIterator[MockAutocalls]:
    """The emulator with no rate limit; tests that need one start their own."""
    async with MockAutocalls(rate_limit=None, assistants=(123, 456)) as emulator:
        yield emulator


@pytest.fixture
def token() -> str:
    """A fresh token per test, so limiter state never leaks between tests."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
async def make_client(token: str) -> AsyncIterator[Callable[..., AsyncAutocalls]]:
    """Build clients that are closed at the end of the test."""
    clients: list[AsyncAutocalls] = []

    def make(base_url: str, **options: Any) -> AsyncAutocalls:
        options.setdefault("rate_limit", None)
        options.setdefault("retry_policy", FAST_RETRIES)
        client = AsyncAutocalls(options.pop("api_token", token), base_url=base_url, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
