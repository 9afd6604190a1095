"""Benchmark: the training driver's serial seconds per product, against a real MLflow tracking server.

    python bench/bench_driver.py                  # 200 products
    python bench/bench_driver.py --products 50

Training runs in Spark tasks (one per product, in parallel on as many GPUs as there are); what
the driver then does for each product, one after another, is the same on 1 or 64 GPUs and bounds
how far training scales: plan the tasks (`plan_products`: what a killed run registered, titles
and types) and record their results (`record_results`: the logged adapter registered with its
alias, the `adapters` rows in one write). Each task logs its own MLflow run (nested sweep runs,
per-step losses, validation metrics and images, the adapter as a model) in parallel with the
others: timed here too, one product after another, as `task logging` (not part of the driver's
serial share). This times them on results shaped as the tiny models' tasks return them (the default [training] settings: 3 sweep tokens, 30 steps, 2 validation images per
validation) for `--products` products, against `mlflow server` (SQLite backend, artifacts
uploaded through the server) started on a loopback port here. The adapter logged is a real tiny
LoRA (trained once, 2 steps, tiny random-weight SD). Last line: `driver: ... s per product`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from homes import mlflow_server, task_outcomes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--products", type=int, default=200)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="recontext-bench-driver-"))
    with mlflow_server(root / "mlflow-server") as url:
        os.environ["MLFLOW_TRACKING_URI"] = url  # before etl.tracking reads it
        import pandas as pd

        from etl import tracking
        from core.settings import Settings
        from etl.lakehouse import Lakehouse
        from training import train_job
        from udfs.zoo import ModelZoo

        lake = Lakehouse(Settings.load(root / "home", models={"tiny_dir": str(root / "tiny")}))
        zoo = ModelZoo.from_settings(lake.settings)
        zoo.check("text2img")  # builds the tiny model on first use
        products = [f"product-{n:04d}" for n in range(args.products)]
        lake.upsert_rows("products", pd.DataFrame({"product_id": products, "title": "a bench mug",
                                                   "product_type": "mug", "attributes": "{}", "source": "bench"}))
        tasks = task_outcomes(zoo, lake.settings, products, root / "work")
        digests = {p: "d" * 16 for p in products}
        quiet = lambda _: None  # noqa: E731
        started = time.perf_counter()
        written, specs = train_job.plan_products(lake, products, 1, digests, tracking.OURS, quiet)
        planned = time.perf_counter() - started
        started = time.perf_counter()
        for spec in specs:  # the bench's adapters stand where the tasks would have left theirs; each task logs
            spec["spec"] = json.dumps({**json.loads(spec["spec"]), "work": str(root / "work" / spec["product_id"])})
            outcome = tasks[spec["product_id"]]
            outcome.update(train_job.log_training_run(lake.settings, zoo, spec["product_id"], json.loads(spec["spec"]),
                                                      outcome, "cpu"))
        task_logging = time.perf_counter() - started
        results = pd.DataFrame([{"product_id": p, "arm": tracking.OURS, "device": "cpu", "error": None,
                                 "result": json.dumps(tasks[p])} for p in products])
        started = time.perf_counter()
        recorded, failures = train_job.record_results(lake, tracking.OURS, 1, specs, results, quiet)
        record = time.perf_counter() - started
        assert (written, recorded, failures) == (0, len(products), []), (written, recorded, failures)
        assert lake.table("adapters").count() == len(products)
    total = planned + record
    print(f"task logging (in the tasks, in parallel; timed one after another here): "
          f"{task_logging / len(products):.3f} s per product")
    print(f"driver: {len(products)} products against a local mlflow server: plan {planned:.1f} s, record "
          f"{record:.1f} s; {total / len(products):.3f} s per product")


if __name__ == "__main__":
    main()
