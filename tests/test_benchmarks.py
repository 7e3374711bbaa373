"""The benchmark suite runs at tiny sizes and returns well-formed results (no timing asserted)."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import BENCHMARKS, BenchResult, Config, Row, run_benchmark
from benchmarks.__main__ import main, table
from benchmarks._common import percentile
from benchmarks.plots import FILES, _rolling, _stacked, nginx_rate
from benchmarks.rate import _max_in_window, ideal_makespan

from .nginx_server import require_nginx

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _children_unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks' own processes (emulators, workers, the plots' runs) start without
    coverage: they run the package at scale, lines the other tests cover, and measuring them
    doubled what this module costs (the bulk benchmark's 11,000 rows: 54 s of CPU, 27 s
    unmeasured). What runs in this process is still measured."""
    for name in list(os.environ):
        if name.startswith(("COVERAGE_", "COV_CORE_")):
            monkeypatch.delenv(name)


def check_well_formed(result: BenchResult, name: str) -> None:
    """Every row has a case, a metric, a finite or missing value, and a judged target."""
    assert result.name == name
    assert result.title
    if not result.available:
        assert any("not available" in note for note in result.notes)
        return
    assert result.rows
    for row in result.rows:
        assert row.case and row.metric
        assert row.value is None or math.isfinite(row.value), row
        if row.spread is not None:
            low, high = row.spread
            assert low <= high
        if row.target is not None:
            assert row.met in (True, False, None)
    json.dumps(result.to_json())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_runs_quick(name: str) -> None:
    """Each benchmark runs at --quick sizes and returns rows for the table."""
    result = run_benchmark(name, Config(quick=True))
    check_well_formed(result, name)
    assert result.seconds > 0


def test_overhead_compares_every_client() -> None:
    """The overhead benchmark measures the SDK, raw aiohttp and httpx at concurrency 1 and 20."""
    result = run_benchmark("overhead", Config(quick=True, rounds=1))
    cases = {row.case for row in result.rows}
    for client in ("SDK", "raw aiohttp", "raw httpx"):
        assert f"{client}, c=1" in cases
        assert f"{client}, c=20" in cases
    targets = [row for row in result.rows if row.target is not None]
    assert {row.metric for row in targets} == {
        "throughput ratio",
        "p50 latency ratio",
        "client CPU/call ratio",
    }
    assert all(row.case == "SDK ÷ raw aiohttp, c=20" for row in targets)


def test_cli_runs_selected_benchmark_and_writes_json(tmp_path: Path) -> None:
    """`python -m benchmarks --quick waiting` prints one table and writes the JSON."""
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "waiting"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[0]
    assert header.startswith("| benchmark") and "median" in header
    assert "| waiting" in done.stdout
    document = json.loads(out.read_text())
    assert document["environment"]["quick"] is True
    assert list(document["benchmarks"]) == ["waiting"]
    rows = document["benchmarks"]["waiting"]["rows"]
    assert {"case", "metric", "value", "unit", "spread", "target", "met"} <= set(rows[0])


def test_cli_refuses_unknown_benchmark() -> None:
    """An unknown name is a usage error that lists the benchmarks."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown benchmark nope" in done.stderr
    assert "overhead" in done.stderr


def test_a_broken_benchmark_does_not_cost_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A benchmark that raises is reported as FAILED, the exit code is 1, the JSON is written."""
    monkeypatch.setitem(BENCHMARKS, "broken", ("benchmarks._no_such_module", "always fails"))
    out = tmp_path / "results.json"
    assert main(["--quick", "--out", str(out), "broken"]) == 1
    printed = capsys.readouterr()
    assert "| broken    | FAILED (see below)" in printed.out
    assert "ModuleNotFoundError" in printed.err
    document = json.loads(out.read_text())
    assert document["benchmarks"]["broken"]["failed"].startswith("ModuleNotFoundError")


def test_table_shows_unavailable_benchmarks_and_targets() -> None:
    """A missing module gets a 'not available' row; a target shows whether it was met."""
    missing = BenchResult("bulk", "Bulk", available=False, notes=["not available: no module"])
    present = BenchResult("rate", "Rate")
    present.add("SDK", "429s received", 0.0, digits=0).expect("0", lambda v: v == 0)
    present.summary("SDK", "makespan", [10.2, 10.0, 10.4], unit="s")
    text = table([missing, present])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert "| bulk " in text and "not available" in text
    assert "0 (met)" in text
    assert "10.20 s" in text and "10.00–10.40 s" in text


def test_row_formatting() -> None:
    """Ratios print with ×, missing values as n/a, and an unmet target as MISSED."""
    row = Row("SDK", "throughput ratio", 0.5, unit="×").expect("≥ 0.90×", lambda v: v >= 0.9)
    assert row.formatted() == ("0.50×", "", "≥ 0.90× (MISSED)")
    assert Row("x", "y", None).formatted()[0] == "n/a"


def test_statistics_helpers() -> None:
    """Percentiles interpolate; the rolling-window count and the ideal makespan are exact."""
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    assert _max_in_window([0.0, 0.1, 0.2, 1.0, 1.05], 1.0) == 4
    assert _max_in_window([0.0, 1.0, 2.0], 1.0) == 1
    assert ideal_makespan(50, 5, 1.0) == 9.0
    assert ideal_makespan(5, 5, 1.0) == 0.0


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, from its IHDR chunk; fails on anything else."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.timing
@pytest.mark.slow
def test_plots_draw_the_figures_from_real_runs(tmp_path: Path) -> None:
    """`python -m benchmarks.plots --quick` draws the three figures and writes the numbers behind
    them; the arrivals recorded by nginx show the SDK within the limit with no 429, and the
    clients without the SDK's limiter over it and refused."""
    require_nginx()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.plots", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for name in FILES.values():
        width, height = png_size(tmp_path / name)
        assert 800 <= width <= 1000 and 300 <= height <= 800, (name, width, height)
        assert (tmp_path / name).stat().st_size < 200_000
    document = json.loads((tmp_path / "figures.json").read_text())
    assert document["summary"] == done.stdout.splitlines()

    arrivals = document["arrivals"]
    limit, period, calls = arrivals["requests"], arrivals["period"], arrivals["calls"]
    clients = arrivals["clients"]
    assert set(clients) == {"sdk", "asynclimiter", "none"}
    for client in clients.values():  # the summary is the series'
        times = [t for t, _ in client["arrivals"]]
        assert times == sorted(times) and times[0] == 0
        assert client["max_in_window"] == _max_in_window(times, period)
        assert client["rejected"] == sum(s == 429 for _, s in client["arrivals"])
        assert client["accepted"] == sum(s == 200 for _, s in client["arrivals"])
        assert client["accepted"] + client["failed_calls"] == calls
    sdk = clients["sdk"]
    assert [s for _, s in sdk["arrivals"]] == [200] * calls
    assert sdk["max_in_window"] <= limit
    assert clients["asynclimiter"]["max_in_window"] > limit  # its first burst
    assert clients["asynclimiter"]["rejected"] > 0
    assert clients["none"]["rejected"] > clients["none"]["accepted"]

    bulk = document["bulk"]
    assert bulk["ok"] == bulk["rows"] == len(bulk["completions"])
    assert bulk["rejected"] == 0
    assert bulk["max_in_window"] <= bulk["requests"]
    assert bulk["max_in_window"] == _max_in_window(bulk["arrivals"], bulk["period"])

    waiters = document["waiters"]
    for key in ("rss", "tracemalloc"):
        counts = [count for count, _ in waiters[key]]
        assert counts == list(range(0, waiters["total"] + 1, waiters["step"]))
        assert waiters[key][-1][1] > waiters[key][1][1] > 0  # grows with the waiting calls
        assert 1_000 < waiters[f"{key}_per_call_bytes"] < 20_000


def test_plot_helpers() -> None:
    """Rolling counts are exact, a burst stands in one column, nginx's rate is per minute."""
    times = [0.0, 0.0, 0.5, 1.0, 2.5]
    assert _rolling(times, 1.0, [0.0, 0.4, 0.5, 1.0, 1.2, 2.0, 2.5]) == [2, 2, 3, 2, 2, 0, 1]
    ys = _stacked([0.0, 0.001, 0.002, 1.0], 0.05, 2)
    assert ys[:3] == pytest.approx([1.6, 2.0, 2.4]) and ys[3] == 2
    assert nginx_rate(5, 2.0) == "150r/m"
    assert nginx_rate(5, 1.0) == "300r/m"
    with pytest.raises(ValueError, match="whole number per minute"):
        nginx_rate(5, 7.0)
