"""Benchmark: `recontext demo` on the embedded engine (Sail) and on real Apache Spark, back to back.

    jobs/spark_jars.sh && python bench/bench_engines.py [--repeat 1] [--config FILE]

Starts `python -m jobs.spark_local` once (its start is timed apart), then runs the demo as a user
does, in a fresh home each time: embedded, then `SPARK_REMOTE=<url>`, alternating `--repeat`
times. Reports wall seconds per engine, their ratio, and the row counts of the tables the issue
names, which must agree. Each engine as a user gets it: torch on every core in the embedded
engine's process, one thread per task in Spark's Python workers (OMP_NUM_THREADS =
spark.task.cpus). Tiny random-weight models: the figures say what the engine costs, not what
real models cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("products", "product_images", "synthetic_images", "training_images", "adapters", "ranked_generations")


def demo(home: Path, remote: str | None) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("SPARK_REMOTE", None)
    if remote:
        env["SPARK_REMOTE"] = remote
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "--home", str(home), "demo"], env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"demo failed ({remote or 'embedded'}): {result.stderr[-2000:]}")
    return seconds


def row_counts(home: Path) -> dict[str, int]:
    from deltalake import DeltaTable

    return {name: DeltaTable(home / "lakehouse" / name).to_pyarrow_dataset().count_rows() for name in TABLES}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--config", type=Path, help="a config.toml for every home (default: none)")
    args = parser.parse_args()
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "jobs.spark_local", "--log", os.devnull], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().strip()
    server_start = time.perf_counter() - started
    results = {"embedded": [], "spark": []}
    counts, homes = {}, {}
    try:
        for _ in range(args.repeat):
            for engine, remote in (("embedded", None), ("spark", url)):
                home = Path(tempfile.mkdtemp(prefix=f"recontext-bench-{engine}-"))
                if args.config:
                    (home / "config.toml").write_text(args.config.read_text())
                homes[engine] = str(home)
                results[engine].append(round(demo(home, remote), 1))
                counts[engine] = row_counts(home)
    finally:
        server.terminate()
        server.wait(timeout=120)
    embedded, spark = min(results["embedded"]), min(results["spark"])
    print(json.dumps({"models": "tiny random-weight models: the engines' cost, not real models' cost",
                      "spark_server_start_s": round(server_start, 1), "demo_s": results,
                      "spark_over_embedded": round(spark / embedded, 2), "rows": counts,
                      "rows_agree": counts["embedded"] == counts["spark"], "homes": homes}, indent=1))
    os._exit(0)  # deltalake + pyarrow may abort at interpreter exit (docs/engine.md)


if __name__ == "__main__":
    main()
