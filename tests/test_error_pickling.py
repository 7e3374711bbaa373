"""Every SDK error crosses a process boundary intact: pickle, and a real ProcessPoolExecutor.

One error that cannot be unpickled breaks the whole pool (``BrokenProcessPool``) and loses what
it said (``sent``: whether the message may have been processed). The error tree is found by
walking ``AutocallsError``'s subclasses once every module is imported, so a class added later
is covered, or this test names the constructor argument it has no sample for.
"""

from __future__ import annotations

import importlib
import inspect
import multiprocessing
import pickle
import pkgutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

import autocalls_async
from autocalls_async import AutocallsError

#: A sample value per constructor argument name, as the SDK passes them.
SAMPLES: dict[str, Any] = {
    "message": "something failed: HTTP 503",
    "sent": True,
    "status": 503,
    "error_code": "SOME_CODE",
    "body": {"error": "busy", "errors": {"message": ["required"]}},
    "headers": {"Retry-After": "7", "Content-Type": "application/json"},
    "retry_after": 7.5,
    "assistant_id": 123,
    "cause": "row-42",
    "row": "row 43",
}
#: The attributes compared after the round trip (when the error has them).
COMPARED = ("message", "status", "error_code", "sent", "maybe_processed", "retry_after")


def _classes() -> list[type[AutocallsError]]:
    for module in pkgutil.walk_packages(autocalls_async.__path__, "autocalls_async."):
        try:
            importlib.import_module(module.name)
        except ImportError:  # an optional extra not installed
            continue

    def walk(cls: type[AutocallsError]) -> Iterator[type[AutocallsError]]:
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    return sorted(set(walk(AutocallsError)), key=lambda cls: cls.__qualname__)


def make(cls: type[AutocallsError]) -> AutocallsError:
    """An instance of ``cls`` built the way the SDK builds it, from the samples."""
    signature = inspect.signature(cls.__init__)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, parameter in list(signature.parameters.items())[1:]:
        if parameter.kind is parameter.VAR_POSITIONAL:
            args.append(f"{cls.__name__}: nothing was sent")
        elif parameter.kind is parameter.VAR_KEYWORD:
            continue
        elif name not in SAMPLES:
            pytest.fail(f"{cls.__qualname__}({name}=...): add a sample for {name!r} to SAMPLES")
        elif parameter.kind is parameter.KEYWORD_ONLY:
            kwargs[name] = SAMPLES[name]
        else:
            args.append(SAMPLES[name])
    return cls(*args, **kwargs)


def assert_same(again: BaseException, error: BaseException) -> None:
    assert type(again) is type(error)
    assert again.args == error.args and str(again) == str(error)
    assert vars(again) == vars(error)
    for name in COMPARED:
        assert getattr(again, name, None) == getattr(error, name, None), name


CLASSES = _classes()


def test_the_tree_is_all_there() -> None:
    names = {cls.__name__ for cls in CLASSES}
    assert {"APIConnectionError", "APITimeoutError", "SkippedAssistantError"} <= names
    assert len(CLASSES) >= 20


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__qualname__)
def test_every_error_pickles_to_an_equal_error(cls: type[AutocallsError]) -> None:
    error = make(cls)
    error.add_note("a note added on the way")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert_same(pickle.loads(pickle.dumps(error, protocol)), error)


def _raise(module: str, name: str) -> None:
    """Run in a worker process: raise the error, for the pool to send it back pickled."""
    raise make(getattr(importlib.import_module(module), name))


def test_every_error_crosses_a_real_process_pool() -> None:
    """A worker raises each error in turn; the pool stays usable and each comes back equal.
    ``spawn``: the worker imports everything afresh, as on macOS and Windows."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        futures = [(cls, pool.submit(_raise, cls.__module__, cls.__name__)) for cls in CLASSES]
        for cls, future in futures:
            error = future.exception(timeout=60)
            assert error is not None
            assert_same(error, make(cls))
        assert pool.submit(str, 1).result(timeout=60) == "1"  # not broken
