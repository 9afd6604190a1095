"""Benchmark: engine start to first query, and ingest throughput.

    python bench/bench_ingest.py [--products 100] [--images-per-product 10] [--side 512]

Generates a folder catalog of 512 px JPEGs, then measures in one run, side by side:
  - engine start -> first query (embedded Sail, this process's first session);
  - `ingest` through Spark (list, decode UDF, stage, MERGE into three tables);
  - the same decode/normalize work in a plain Python loop (no engine), as the reference;
  - a re-run of ingest on the unchanged source (idempotent: writes nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sample_images import encode, photo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--images-per-product", type=int, default=10)
    parser.add_argument("--side", type=int, default=512)
    args = parser.parse_args()

    started = time.perf_counter()
    from core.settings import Settings
    from etl.engine import spark_session

    work = Path(tempfile.mkdtemp(prefix="recontext-bench-"))
    settings = Settings.load(work / "home")
    spark = spark_session(settings)
    spark.sql("SELECT 1").collect()
    first_query_s = time.perf_counter() - started

    from etl.images import normalize_image
    from etl.ingest import ingest
    from etl.lakehouse import Lakehouse

    catalog = work / "catalog"
    for p in range(args.products):
        folder = catalog / f"product-{p:05d}"
        folder.mkdir(parents=True)
        for i in range(args.images_per_product):
            image = photo(args.side, args.side, seed=p * 1000 + i)
            (folder / f"{i:02d}.jpg").write_bytes(encode(image, "JPEG", quality=90))
    files = sorted(catalog.rglob("*.jpg"))

    t = time.perf_counter()
    for file in files:
        normalize_image(file.read_bytes(), settings.ingest)
    direct_s = time.perf_counter() - t

    t = time.perf_counter()
    lake = Lakehouse(settings, spark)
    open_s = time.perf_counter() - t

    t = time.perf_counter()
    summary = ingest(lake, catalog)
    ingest_s = time.perf_counter() - t
    assert summary.images_ok == len(files), summary

    t = time.perf_counter()
    again = ingest(lake, catalog)
    rerun_s = time.perf_counter() - t
    assert sum(again.rows_written.values()) == 0, again

    result = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "images": len(files),
        "engine_start_to_first_query_s": round(first_query_s, 3),
        "lakehouse_open_s": round(open_s, 3),
        "ingest_s": round(ingest_s, 2),
        "ingest_images_per_s": round(len(files) / ingest_s, 1),
        "direct_decode_images_per_s": round(len(files) / direct_s, 1),
        "spark_vs_direct_time_ratio": round(ingest_s / direct_s, 2),
        "unchanged_rerun_s": round(rerun_s, 2),
        "rerun_fraction_of_first": round(rerun_s / ingest_s, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
