"""Benchmark: request latency of recontext-service, first and later requests, in one process.

    OMP_NUM_THREADS=1 python bench/bench_imagine.py --home H      # H: a trained home (after `recontext demo`)

Registers recontext-service on a copy of the home (the home itself is left as it was), loads it
with MLflow's own pyfunc loader, as `mlflow models serve` does, and times `predict` for the same
requests in order: the first (models load: base pipeline, CLIP, DINO, segmenter), the same
product again with other seeds, another product. Each request: 4 images, keep 2, at the adapter's
training resolution, scored, ranked and recorded. With the demo's tiny random-weight models the
figures are the pipeline's overhead (Spark reads and writes, scoring), not model cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

REQUESTS = [  # (label, request)
    ("first request (models load)", {"product_id": "coffee-cup", "scene": "on a marble kitchen counter, morning light",
                                     "n": 4, "keep": 2, "seed": 100}),
    ("second request, same product", {"product_id": "coffee-cup", "scene": "on a wooden table by a window",
                                      "n": 4, "keep": 2, "seed": 200}),
    ("third request, another product", {"product_id": "motorcycle", "scene": "parked on a city street at dusk",
                                        "n": 4, "keep": 2, "seed": 300}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", required=True, help="a trained home (e.g. after `recontext demo`)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from homes import copy_home

    home = copy_home(Path(args.home).resolve(), Path(tempfile.mkdtemp(prefix="bench-imagine-")) / "home")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"  # before mlflow is imported
    import mlflow
    import pandas as pd
    import torch

    from core.settings import Settings
    from jobs.service import SERVICE_NAME, register_service

    version = register_service(Settings.load(home))
    started = time.perf_counter()
    service = mlflow.pyfunc.load_model(f"models:/{SERVICE_NAME}/{version}")
    figures = {"load_model_s": round(time.perf_counter() - started, 2), "requests": []}
    for label, request in REQUESTS:
        started = time.perf_counter()
        answer = service.predict(pd.DataFrame([request]))
        seconds = time.perf_counter() - started
        figures["requests"].append({"request": label, **request, "seconds": round(seconds, 2),
                                    "kept": len(answer), "base_model_loads": int(answer.base_model_loads.iloc[0])})
        print(f"{label:<32} {seconds:6.2f} s  kept {len(answer)}, base model loads {answer.base_model_loads.iloc[0]}")
    figures.update(machine=platform.machine(), cpus=os.cpu_count(), threads=torch.get_num_threads(),
                   torch=torch.__version__, models="tiny random weights (the demo's)")
    print(f"load_model {figures['load_model_s']} s; {json.dumps(figures)}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))

if __name__ == "__main__":
    main()
