"""pytest plugin providing the ``autocalls_server`` fixture.

Enable it in your root ``conftest.py``:

```python
pytest_plugins = ["autocalls_async.testing.pytest_plugin"]

async def test_reply(autocalls_server):
    client = AsyncAutocalls("test-token", base_url=autocalls_server.base_url, rate_limit=None)
    ...
```

The fixture is function-scoped and yields a started ``MockAutocalls`` with no server-side rate
limit (a test suite must not wait a minute for a window). Options come from the marker
``@pytest.mark.autocalls_server(rate_limit=(5, 0.5), balance=3, ...)`` (registered by this
plugin when it is loaded from a conftest.py), or from indirect parametrization, which works
wherever the plugin is loaded:

```python
@pytest.mark.parametrize("autocalls_server", [{"balance": 3}], indirect=True)
async def test_balance(autocalls_server): ...
```
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from ._server import MockAutocalls


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, so ``--strict-markers`` accepts it."""
    config.addinivalue_line(
        "markers", "autocalls_server(**options): options for the autocalls_server fixture"
    )


@pytest_asyncio.fixture
async def autocalls_server(request: pytest.FixtureRequest) -> AsyncIterator[MockAutocalls]:
    """A started emulator on a free loopback port, closed after the test."""
    async with MockAutocalls(**server_options(request)) as server:
        yield server


def server_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The fixture's options: the defaults, then the marker's, then the indirect parameter."""
    options: dict[str, Any] = {"rate_limit": None}
    marker = request.node.get_closest_marker("autocalls_server")
    if marker is not None:
        options.update(marker.kwargs)
    options.update(getattr(request, "param", None) or {})
    return options
