"""Logging: the ``autocalls_async`` logger; ``AUTOCALLS_LOG=debug|info`` adds a stderr handler.

Nothing logged ever contains the API token: log lines name the path, never the headers.
"""

from __future__ import annotations

import logging
import os
from typing import Final

logger = logging.getLogger("autocalls_async")
_HANDLER_NAME = "autocalls_async.env"
LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
_warned: set[str] = set()  # the unknown AUTOCALLS_LOG values already warned about


def configure_from_env() -> None:
    """Honour ``AUTOCALLS_LOG`` once: a library adds no handler unless asked to.

    An unknown value is not ignored silently: a WARNING through the package logger (once per
    value) says which values are accepted. Like any library warning it goes where the
    program's logging sends it; a program that configured none sees it on stderr (Python's
    last-resort handler).
    """
    raw = os.environ.get("AUTOCALLS_LOG", "").strip()
    level = raw.upper()
    if level not in LEVELS:
        if raw and raw not in _warned:
            _warned.add(raw)
            logger.warning(
                "AUTOCALLS_LOG=%r is not a log level: use %s (or unset it); no log handler "
                "was added",
                raw,
                ", ".join(name.lower() for name in LEVELS),
            )
        return
    if any(handler.get_name() == _HANDLER_NAME for handler in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
