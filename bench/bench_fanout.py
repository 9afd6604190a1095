"""Benchmark: training fanned out over Spark tasks against one product at a time.

    python bench/bench_fanout.py --products 4 --parallel 2

Builds one home of `--products` tiny products (2 reference photos each, scored and filtered
through the real steps), then trains every product twice through `run_training`: with
training.parallel_products = 1 (one task at a time: today's loop) and = `--parallel`, same seeds
and settings (only the MLflow experiment differs, so the second run is not skipped as already
trained). One torch thread per task. Times are whole `run_training` calls: the fanned-out tasks
plus the driver's MLflow logging, registration and MERGEs. A warm-up product is trained first so
neither timed run pays for first loads. The adapters are compared tensor by tensor.

The embedded engine (Sail) runs tasks as threads of its one server process: torch releases the
GIL inside its ops, Python code between them does not. On Spark each task is its own Python
worker process, with its own GPU when `spark.task.resource.gpu.amount=1`.
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

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from core.settings import Settings  # noqa: E402
from etl.ingest import ingest  # noqa: E402
from etl.lakehouse import Lakehouse  # noqa: E402
from jobs.steps import SCORING, run_steps  # noqa: E402
from sample_images import encode, product_shot, write_files  # noqa: E402
from training.lora import ADAPTER_FILE  # noqa: E402
import training.train_job as train_job  # noqa: E402
from training.train_job import run_training  # noqa: E402
from udfs.zoo import ModelZoo  # noqa: E402

TRAINING = {"token_candidates": 2, "sweep_steps": 10, "steps": 40, "checkpoint_every": 20, "validate_every": 20,
            "validation_images": 1}


def lake_for(home: Path, experiment: str, parallel: int) -> Lakehouse:
    return Lakehouse(Settings.load(home, training={**TRAINING, "experiment": experiment,
                                                   "parallel_products": parallel}))


def adapters(lake: Lakehouse, experiment: str) -> dict[str, dict]:
    """Each product's adapter tensors from the run of `experiment`."""
    import mlflow

    rows = lake.spark.sql("SELECT product_id, model_name, model_version, run_id FROM adapters "
                          "WHERE arm = 'ours'").collect()
    out = {}
    for r in rows:
        if mlflow.get_run(r.run_id).info.experiment_id == mlflow.get_experiment_by_name(experiment).experiment_id:
            # the registry's copy: training deletes its own folder once the adapter is registered
            path = mlflow.diffusers.load_model(f"models:/{r.model_name}/{r.model_version}").adapter_path
            out[r.product_id] = load_file(path if path.endswith(".safetensors") else f"{path}/{ADAPTER_FILE}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--products", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per task
    home = Path(tempfile.mkdtemp(prefix="recontext-bench-fanout-"))
    products = [f"item-{i}" for i in range(args.products)]
    for n, product_id in enumerate(["warmup", *products]):
        write_files(home / "catalog" / product_id,
                    {f"{s}.png": encode(product_shot(seed=10 * n + s), "PNG") for s in (1, 2)})
        (home / "catalog" / product_id / "product.json").write_text(json.dumps({"product_type": "mug"}))
    lake = lake_for(home, "bench-warmup", 1)
    ingest(lake, home / "catalog")
    zoo = ModelZoo.from_settings(lake.settings)
    run_steps(lake, [*SCORING, "training_set"], zoo, progress=lambda _: None)
    run_training(lake, zoo, products=["warmup"], progress=lambda _: None)

    tasks_seconds = []  # the fan-out's share of each run; the rest is the driver's (MLflow, MERGEs, queries)
    fan_out = train_job.fan_out

    def timed_fan_out(*a, **kw):
        started = time.perf_counter()
        try:
            return fan_out(*a, **kw)
        finally:
            tasks_seconds.append(time.perf_counter() - started)

    train_job.fan_out = timed_fan_out
    seconds = {}
    for name, parallel in (("sequential", 1), ("parallel", args.parallel)):
        lake = lake_for(home, f"bench-{name}", parallel)
        started = time.perf_counter()
        written = run_training(lake, zoo, products=products, progress=lambda _: None)
        seconds[name] = time.perf_counter() - started
        assert written == {"adapters": args.products, "quarantine": 0}, written
        print(f"{name}: {parallel} task(s) at once, {seconds[name]:.1f} s (tasks {tasks_seconds[-1]:.1f} s, driver "
              f"{(seconds[name] - tasks_seconds[-1]) / args.products:.2f} s per product)", flush=True)
    one, many = adapters(lake, "bench-sequential"), adapters(lake, "bench-parallel")
    identical = sorted(one) == sorted(many) == products and all(
        one[p].keys() == many[p].keys() and all(torch.equal(one[p][k], many[p][k]) for k in one[p]) for p in one)
    print(f"fan-out: {args.products} products, sequential {seconds['sequential']:.1f} s, parallel "
          f"{seconds['parallel']:.1f} s, speed-up {seconds['sequential'] / seconds['parallel']:.2f}, "
          f"adapters identical: {'yes' if identical else 'no'}")


if __name__ == "__main__":
    main()
