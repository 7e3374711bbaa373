"""Resuming a bulk run on a big OUT (issue 21 item 8): time and peak memory before a send.

Builds an input of N rows and the OUT a finished run leaves (a "sending" line and an answer per
row), then runs in a child process, each measured alone (wall time, and the child's own peak
RSS from ``wait4``):

* ``autocalls-async bulk IN --out OUT --dry-run``: reads OUT, snapshots the input and checks
  it against OUT exactly as a run does before sending, and reports;
* ``autocalls-async bulk IN --out OUT``: the resume itself, which finds every row answered and
  sends nothing (its base URL is a closed loopback port: a send would fail, and say so).

Each twice: first on OUT alone ("no index": an OUT written before runs left an index, or moved
without its ``.OUT.index``), which reads every line of OUT and every row of the input; the
resume then leaves the index beside OUT, as every run does as it closes; then on OUT and that
index, which is what a resume usually finds.

    python -m benchmarks.resume_scale [ROWS]      # default 1,000,000
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(directory: Path, rows: int) -> tuple[Path, Path]:
    from autocalls_async._bulkio import InputFile

    source, out = directory / "in.csv", directory / "out.jsonl"
    with source.open("w", encoding="utf-8") as file:
        file.write("assistant_id,customer_identifier,message\n")
        for n in range(1, rows + 1):
            file.write(f"123,+1555{n % 100_000:07d},Hello number {n}\n")
    with out.open("w", encoding="utf-8") as file:
        for request, key in InputFile(source).keyed():
            common = {
                "row": request.row,
                "assistant_id": 123,
                "customer_identifier": request.customer_identifier,
            }
            sending = {"id": request.id, "sending": True, "key": key, **common}
            answer = {
                "id": request.id,
                "ok": True,
                "key": key,
                **common,
                "conversation_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
                "reply": f"Thanks for your message: {request.message}",
                "function_calls": [],
                "ai_disabled": False,
            }
            file.write(json.dumps(sending, separators=(",", ":")) + "\n")
            file.write(json.dumps(answer, separators=(",", ":")) + "\n")
    return source, out


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """Seconds, the child's peak RSS in MiB, its exit code and its output."""
    started = time.perf_counter()
    child = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert child.stdout is not None
    with child.stdout:
        output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024, child.returncode, output


def measure(source: Path, out: Path) -> list[tuple[str, float, float, int, str]]:
    """For the dry run and the resume: seconds, peak MiB, exit code and a line of output."""
    command = [sys.executable, "-m", "autocalls_async", "bulk", str(source), "--out", str(out)]
    # As installed: from compiled bytecode (a shell that sets PYTHONDONTWRITEBYTECODE would
    # otherwise have each run compile every module first).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AUTOCALLS_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="resume-scale-") as limiter:
        resume_env = {
            **env,
            "AUTOCALLS_API_TOKEN": "resume-benchmark",
            "AUTOCALLS_BASE_URL": f"http://127.0.0.1:{closed_port()}/api",
            "AUTOCALLS_LIMITER_DIR": limiter,
        }
        for name, argv, run_env in (
            ("dry run, no index", [*command, "--dry-run"], env),
            ("resume, no index", [*command, "--progress", "off"], resume_env),
            ("dry run", [*command, "--dry-run"], env),
            ("resume", [*command, "--progress", "off"], resume_env),
        ):
            seconds, peak, code, output = run(argv, run_env)
            lines = output.strip().splitlines()
            said = next((line for line in lines if "answered" in line), lines[-1] if lines else "")
            results.append((name, seconds, peak, code, said.strip()))
    return results


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as folder:
        source, out = build(Path(folder), rows)
        size = out.stat().st_size / 2**20
        results = measure(source, out)
    print(f"resume on {rows:,} rows (OUT {size:.0f} MiB, 2 lines per row):")
    for name, seconds, peak, code, said in results:
        print(f"  {name + ':':18} {seconds:5.1f} s, peak RSS {peak:4.0f} MiB, exit {code}: {said}")


if __name__ == "__main__":
    main()
