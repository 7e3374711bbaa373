"""pytest fixtures that run your code against the local emulator: no network, no waiting.

Install the plugin's requirements (pytest and pytest-asyncio) with the `testing` extra:

```sh
pip install 'autocalls-async[testing]'
```

and load the plugin in the `conftest.py` at the root of your tests (pytest reads
`pytest_plugins` only there):

```python
pytest_plugins = ["autocalls_async.testing.pytest_plugin"]
```

pytest-asyncio warns until its fixtures' event loop scope is set; set it once, in
`pyproject.toml` (or the `[pytest]` section of `pytest.ini`, without the quotes):

```toml
[tool.pytest.ini_options]
asyncio_default_fixture_loop_scope = "function"
```

A test then asks for `autocalls_client`, an `AsyncAutocalls` already bound to the
emulator, and for `autocalls_server`, the emulator itself (a started `MockAutocalls`), to
check what it received. With pytest-asyncio's default (strict) mode, mark async tests
`@pytest.mark.asyncio`; with `asyncio_mode = "auto"` the mark may be left out:

```python
import pytest

@pytest.mark.asyncio
async def test_reply(autocalls_client, autocalls_server):
    reply = await autocalls_client.generate_reply(
        assistant_id=123, customer_identifier="+14155551234", message="Hi"
    )
    assert reply.reply == "Hi there! Thanks for your message: Hi"
    assert autocalls_server.count() == 1
```

Both fixtures are made for each test and closed after it. `autocalls_server` has no rate
limit (a test suite must not wait for a minute's window) and knows assistant 123.
`autocalls_client` has no client-side rate limit when the emulator has none, so its calls
never wait. When the emulator has one (the marker's `rate_limit`), the client keeps to it as
the SDK does in production: at most `requests` starts in any rolling `period`, in a private
`LocalRateLimiter` (never the host-wide limiter store's schedules, so tests cannot slow each
other or the machine's other processes down). Under `rate_limit=(5, 60)` the sixth call waits
a minute: give the marker a scaled limit such as `(5, 0.5)`. Retries back off 10 to 50 ms (a
`Retry-After` the emulator sends is still honoured). Both fixtures run in the test's own event loop
(`loop_scope="function"`, pytest-asyncio's default), whatever the project's
`asyncio_default_fixture_loop_scope`; tests that use them run in that loop too (not
`@pytest.mark.asyncio(loop_scope="session")`). For other client options, build your own
client from `autocalls_server.base_url`.

The emulator's options come from the marker
`@pytest.mark.autocalls_server(rate_limit=(5, 0.5), assistants=(7,), balance=3, ...)`
(registered by this plugin), or from indirect parametrization:

```python
@pytest.mark.parametrize("autocalls_server", [{"balance": 3}], indirect=True)
async def test_balance(autocalls_server): ...
```

The client fixture follows them: it uses the marker's first token when `tokens` is set, and
the emulator's rate limit when there is one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection
from typing import Any

import pytest

try:
    import pytest_asyncio
except ImportError as exc:  # pragma: no cover - the dev environment always has it
    raise ImportError(
        "autocalls_async.testing.pytest_plugin needs pytest-asyncio: "
        "pip install 'autocalls-async[testing]'"
    ) from exc

from .._client import AsyncAutocalls
from .._models import RateLimit
from .._ratelimit import LocalRateLimiter
from .._retry import RetryPolicy
from ._server import MockAutocalls

#: The token ``autocalls_client`` sends when the marker sets no ``tokens``.
TEST_TOKEN = "autocalls-test-token"

#: The emulator's ``tokens`` option, for the client fixture (the emulator keeps only hashes).
_TOKENS = pytest.StashKey[Collection[str] | None]()

#: Retries as the default policy decides them, without its seconds of backoff.
TEST_RETRIES = RetryPolicy(backoff_base=0.01, backoff_max=0.05)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, so ``--strict-markers`` accepts it."""
    config.addinivalue_line(
        "markers", "autocalls_server(**options): options for the autocalls_server fixture"
    )


# Both fixtures run in the test's own event loop, whatever the project's
# ``asyncio_default_fixture_loop_scope`` (a project whose database fixtures share a session
# loop still gets a client bound to the loop its tests run in).
@pytest_asyncio.fixture(loop_scope="function")
async def autocalls_server(request: pytest.FixtureRequest) -> AsyncIterator[MockAutocalls]:
    """A started emulator on a free loopback port, closed after the test."""
    options = server_options(request)
    request.node.stash[_TOKENS] = options.get("tokens")
    async with MockAutocalls(**options) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="function")
async def autocalls_client(
    autocalls_server: MockAutocalls, request: pytest.FixtureRequest
) -> AsyncIterator[AsyncAutocalls]:
    """An ``AsyncAutocalls`` bound to ``autocalls_server``, closed after the test."""
    tokens = request.node.stash.get(_TOKENS, None)
    token = next(iter(tokens)) if tokens else TEST_TOKEN
    limit = autocalls_server.rate_limit
    # A clock of its own gives the limiter a store of its own: nothing is kept between tests.
    limiter = None if limit is None else LocalRateLimiter(RateLimit(*limit), clock=time.monotonic)
    try:
        async with AsyncAutocalls(
            token,
            base_url=autocalls_server.base_url,
            rate_limit=None,
            limiter=limiter,
            retry_policy=TEST_RETRIES,
        ) as client:
            yield client
    finally:
        if limiter is not None:
            await limiter.aclose()


def server_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The fixture's options: the defaults, then the marker's, then the indirect parameter."""
    options: dict[str, Any] = {"rate_limit": None}
    marker = request.node.get_closest_marker("autocalls_server")
    if marker is not None:
        options.update(marker.kwargs)
    options.update(getattr(request, "param", None) or {})
    return options
