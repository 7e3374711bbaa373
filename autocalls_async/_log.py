"""Logging: the ``autocalls_async`` logger; ``AUTOCALLS_LOG=debug|info`` adds a stderr handler.

Nothing logged ever contains the API token: log lines name the path, never the headers.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("autocalls_async")
_HANDLER_NAME = "autocalls_async.env"


def configure_from_env() -> None:
    """Honour ``AUTOCALLS_LOG`` once: a library adds no handler unless asked to."""
    level = os.environ.get("AUTOCALLS_LOG", "").strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        return
    if any(handler.get_name() == _HANDLER_NAME for handler in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
