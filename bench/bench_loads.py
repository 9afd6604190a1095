"""Benchmark: diffusion base-model loads from disk per product, for training (token sweep,
training, validation) and generation, on the tiny models.

    python bench/bench_loads.py                       # this checkout
    python bench/bench_loads.py --checkout ../old     # another checkout of the project (e.g. a
                                                      # `git worktree` of an older commit), same script

Every `DiffusionPipeline.from_pretrained` call is counted (the loader every version uses). Two
products, references only (no augmentation), 3 sweep tokens, both arms, then generation with the
champions (3 approved prompts written directly; the LLM prompt bank is not timed here). Prints `loads: N products, L loads, L/N per product` as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
parser = argparse.ArgumentParser()
parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
args = parser.parse_args()
sys.path.insert(0, str(args.checkout / "tests"))
sys.path.insert(0, str(args.checkout.resolve()))

from diffusers import DiffusionPipeline  # noqa: E402

calls = []
original = DiffusionPipeline.from_pretrained.__func__


def counted(cls, *a, **k):
    calls.append(cls.__name__)
    return original(cls, *a, **k)


DiffusionPipeline.from_pretrained = classmethod(counted)

from core.settings import Settings  # noqa: E402
from etl.ingest import ingest  # noqa: E402
from etl.lakehouse import Lakehouse  # noqa: E402
from etl import tracking  # noqa: E402
from sample_images import encode, product_shot, write_files  # noqa: E402
from training.generate import run_generation  # noqa: E402
from training.train_job import run_baseline_training, run_training  # noqa: E402
from udfs.zoo import ModelZoo  # noqa: E402

try:
    from jobs.steps import SCORING, run_steps  # noqa: E402
except ImportError:  # before the step declarations (issue 11)
    from etl.pipeline import SCORING, run_steps  # noqa: E402


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="recontext-bench-loads-"))
    products = {"mug-a": [1, 2], "mug-b": [3, 4]}
    for product_id, seeds in products.items():
        write_files(home / "catalog" / product_id, {f"{s}.png": encode(product_shot(seed=s), "PNG") for s in seeds})
        (home / "catalog" / product_id / "product.json").write_text(json.dumps({"product_type": "mug"}))
    lake = Lakehouse(Settings.load(home, training={"token_candidates": 3, "sweep_steps": 2, "steps": 4,
                                                   "checkpoint_every": 2, "validate_every": 2,
                                                   "validation_images": 1, "auto_promote": True},
                                   generation={"prompts_per_product": 1, "seeds_per_prompt": 2}))
    ingest(lake, home / "catalog")
    zoo = ModelZoo.from_settings(lake.settings)
    run_steps(lake, [*SCORING, "classify", "training_set"], zoo, progress=lambda _: None)
    # A few approved prompts written directly (the LLM's prompt bank is not what is measured here).
    import pandas as pd

    prompts = [("scene", "on a wooden desk"), ("scene", "on a kitchen shelf"), ("target", "on a marble counter")]
    from core.tables import TABLES

    lake.upsert_rows("prompt_bank", pd.DataFrame(
        [{"prompt_id": f"bench-{i}", "product_type": "mug", "purpose": purpose, "text": text, "status": "approved",
          "reviewed_by": "auto", "source": "seed", "seed": 0} for i, (purpose, text) in enumerate(prompts)],
        columns=TABLES["prompt_bank"].data_columns).astype({"seed": "int32"}))
    zoo.check("text2img")
    before = len(calls)
    run_training(lake, zoo, progress=lambda _: None)
    run_baseline_training(lake, zoo, progress=lambda _: None)
    tracking.configure(lake.settings)
    run_generation(lake, zoo, progress=lambda _: None)
    loads = len(calls) - before
    print(json.dumps({"checkout": str(args.checkout), "pipelines_loaded": calls[before:]}))
    print(f"loads: {len(products)} products, {loads} loads, {loads / len(products):g} per product")


if __name__ == "__main__":
    main()
