"""The fault soak (benchmarks/soak.py), run small: every call ends exactly once, as the retry
policy says, nothing processed twice."""

from __future__ import annotations

import pytest

from benchmarks.soak import RATES, run_soak


#: Timing: a clean reply must reach the client within the soak's 0.15 s timeout, or the call
#: ends in APITimeoutError and is counted a violation; a loaded machine takes longer.
@pytest.mark.timing
async def test_small_fault_soak_has_no_violations() -> None:
    """800 calls with random 429/503/500/drops/slow replies: zero violations, every fault seen."""
    report = await run_soak(800, seed=11, measure_memory=False)
    assert report.violations == []
    assert report.replies + sum(report.errors.values()) == report.calls
    assert report.requests > report.calls  # some calls were retried
    assert len(report.faults) == len(RATES) + 1  # every kind of fault, and clean answers
    assert {"APIConnectionError", "APITimeoutError", "InternalServerError"} <= set(report.errors)
