"""Resuming a bulk run on a big OUT (issue 21 item 8): time and peak memory of the check.

Builds an input of N rows and the OUT a finished run leaves (a "sending" line and an answer per
row), then runs ``autocalls-async bulk IN --out OUT --dry-run`` in a child process, which reads
OUT, snapshots and checks the input against it exactly as a run does before sending, and reports
its wall time and peak RSS (``ru_maxrss`` of the child).

    python -m benchmarks.resume_scale [ROWS]      # default 1,000,000
"""

from __future__ import annotations

import json
import os
import resource
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


def measure(source: Path, out: Path) -> tuple[float, float, str]:
    """Seconds, peak MiB and the last line of the dry run's report."""
    command = [sys.executable, "-m", "autocalls_async", "bulk", str(source), "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "--dry-run"], capture_output=True, text=True, check=False, env=os.environ
    )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines = done.stdout.strip().splitlines() or done.stderr.strip().splitlines()
    return seconds, peak, lines[2] if len(lines) > 2 else "\n".join(lines)


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as folder:
        source, out = build(Path(folder), rows)
        size = out.stat().st_size / 2**20
        seconds, peak, said = measure(source, out)
    print(f"resume check on {rows:,} rows (OUT {size:.0f} MiB, 2 lines per row):")
    print(f"  {seconds:.1f} s, peak RSS {peak:.0f} MiB; the dry run said: {said.strip()}")


if __name__ == "__main__":
    main()
