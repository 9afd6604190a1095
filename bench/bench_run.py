"""Benchmark: operating the pipeline with `recontext run`.

    python bench/bench_run.py                  # run all on the sample catalog, then a no-change re-run
    python bench/bench_run.py --scale 10 100 1000   # cost per product as the catalog grows

The full run uses the default settings and tiny models (the prompt bank's LLM is the real
SmolLM2), with `training.auto_promote` so generation has champions. The no-change re-run is the
same command again: every stage finds its inputs unchanged. The scaling run ingests N generated
products (one 256 px photo each) and runs masks, embeddings and metrics on them, in a new home
per N; it reports seconds per product, which stays flat when cost grows linearly.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from core.settings import Settings  # noqa: E402
from etl.lakehouse import Lakehouse  # noqa: E402


def full_run() -> dict:
    from etl.sample_catalog import write_sample_catalog
    from jobs.runner import run

    home = Path(tempfile.mkdtemp(prefix="recontext-bench-run-"))
    catalog = write_sample_catalog(home / "catalog")
    settings = Settings.load(home, ingest={"sources": (str(catalog),)}, training={"auto_promote": True})
    lake = Lakehouse(settings)
    started = time.perf_counter()
    first = run(lake, ["all"], progress=lambda _: None)
    total = time.perf_counter() - started
    started = time.perf_counter()
    again = run(lake, ["all"], progress=lambda _: None)
    rerun = time.perf_counter() - started
    return {"stages_s": {r.stage: round(r.seconds, 2) for r in first}, "total_s": round(total, 1),
            "statuses": sorted({r.status for r in first}), "rerun_s": round(rerun, 2),
            "rerun_rows_written": sum(r.rows_written for r in again),
            "rerun_fraction_of_full": round(rerun / total, 4)}


def scaled(products: int) -> dict:
    from jobs.steps import run_steps
    from sample_images import encode, product_shot, write_files

    home = Path(tempfile.mkdtemp(prefix=f"recontext-bench-scale{products}-"))
    for n in range(products):
        write_files(home / "catalog" / f"p{n:05d}", {"1.jpg": encode(product_shot(256, 256, seed=n), "JPEG")})
    lake = Lakehouse(Settings.load(home, ingest={"sources": (str(home / "catalog"),)}))
    seconds = {}
    for step in ("ingest", "masks", "embeddings", "metrics"):
        started = time.perf_counter()
        run_steps(lake, [step], progress=lambda _: None)
        seconds[step] = time.perf_counter() - started
    total = sum(seconds.values())
    return {"products": products, **{f"{k}_s": round(v, 2) for k, v in seconds.items()},
            "total_s": round(total, 2), "ms_per_product": round(1000 * total / products, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, nargs="*", help="catalog sizes for the scaling run")
    args = parser.parse_args()
    if args.scale:
        print(json.dumps([scaled(n) for n in args.scale], indent=2))
    else:
        print(json.dumps(full_run(), indent=2))


if __name__ == "__main__":
    main()
