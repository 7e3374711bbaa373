"""The environment of a child process a test starts (the CLI, a program, a worker)."""

from __future__ import annotations

import os


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without the caller's AUTOCALLS_ variables, but with this
    test's own limiter directory (conftest gives each test one), so that children never share
    a token's schedule with another test or another run; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOCALLS_")}
    env["AUTOCALLS_LIMITER_DIR"] = os.environ["AUTOCALLS_LIMITER_DIR"]
    env.update(extra)
    return env
