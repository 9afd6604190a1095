"""Benchmark: how long `recontext` takes to refuse a bad argument, as a user runs it (a new process).

    python bench/bench_refusals.py [--home H] [--repeats 5]

Each refusal below needs no data: it is refused before the engine starts. Prints the median
and the slowest wall time per case (process start and imports included), and the machine's load
average, since the machine may be shared. H: any home (default: a new empty one); nothing is
written to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENE = "on a marble kitchen counter, morning light"
CASES = [
    ("imagine -n 0", ["imagine", "coffee-cup", SCENE, "-n", "0"]),
    ("imagine -n 2 --keep 5", ["imagine", "coffee-cup", SCENE, "-n", "2", "--keep", "5"]),
    ("imagine, a brand in the scene", ["imagine", "coffee-cup", "next to a Nike shoe"]),
    ("run, an unknown stage", ["run", "no_such_stage"]),
    ("sql, a write", ["sql", "DELETE FROM products"]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp()) / "home"
    (home / "lakehouse").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    print(f"{'case':<32} {'median s':>9} {'max s':>7}  exit")
    for label, argv in CASES:
        times, codes = [], set()
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "jobs.cli", "--home", str(home), *argv],
                                    capture_output=True, text=True, env=env)
            times.append(time.perf_counter() - started)
            codes.add(result.returncode)
        print(f"{label:<32} {statistics.median(times):9.2f} {max(times):7.2f}  {sorted(codes)}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
