"""MkDocs hook: ``<!-- cli-help: COMMAND -->`` in a page becomes that command's ``--help``.

The command line reference then always shows what the installed CLI prints, never a copy that
drifts. The help is produced by running the CLI (``python -m autocalls_async``), at a fixed
width so the build does not depend on the terminal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import cache
from typing import Any

_MARKER = re.compile(r"<!-- cli-help: ?([a-z-]*) -->")


@cache
def _help(command: str) -> str:
    argv = [sys.executable, "-m", "autocalls_async", *([command] if command else []), "--help"]
    env = {**os.environ, "COLUMNS": "92", "NO_COLOR": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=True)
    return done.stdout.rstrip()


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each marker with a ``text`` code block of the command's help."""
    return _MARKER.sub(lambda m: f"```text\n{_help(m.group(1))}\n```", markdown)
