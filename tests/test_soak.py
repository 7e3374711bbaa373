"""The fault soak (benchmarks/soak.py), run small: every call ends exactly once, as the retry
policy says, nothing processed twice."""

from __future__ import annotations

from benchmarks.soak import RATES, run_soak


async def test_small_fault_soak_has_no_violations() -> None:
    """800 calls with random 429/503/500/drops/slow replies: zero violations, every fault seen.

    A clean reply must reach the client within its timeout, or the call ends in APITimeoutError
    and counts as a violation: the benchmark's 0.15 s is too short for a loaded machine (CI
    once missed it), so the test gives 2 s, and the slow fault lasts 4 s."""
    report = await run_soak(800, seed=11, measure_memory=False, client_timeout=2.0)
    assert report.violations == []
    assert report.replies + sum(report.errors.values()) == report.calls
    assert report.requests > report.calls  # some calls were retried
    assert len(report.faults) == len(RATES) + 1  # every kind of fault, and clean answers
    assert {"APIConnectionError", "APITimeoutError", "InternalServerError"} <= set(report.errors)
