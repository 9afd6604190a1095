"""The stages in dependency order, and the sequences the commands run.

Every stage is `(lake, zoo) -> {table: rows written}` and incremental: it processes only what is
not stored yet, so running a sequence again writes nothing.
"""

from __future__ import annotations

import time
from typing import Callable

from etl.augment import run_negatives, run_novel_views, run_outpaint
from etl.captions import run_captions
from etl.embeddings import run_embeddings
from etl.lakehouse import Lakehouse
from etl.masks import run_masks
from etl.metrics import run_metrics
from etl.prompt_bank import run_classify, run_prompt_bank
from etl.training_set import run_training_set
from udfs.zoo import ModelZoo

Stage = Callable[[Lakehouse, ModelZoo], dict[str, int]]

STAGES: dict[str, Stage] = {
    "masks": run_masks,
    "captions": run_captions,
    "embeddings": run_embeddings,
    "metrics": run_metrics,
    "classify": lambda lake, zoo: run_classify(lake, zoo, lake.settings.prompt_bank.known_types),
    "prompt_bank": lambda lake, zoo: run_prompt_bank(lake, zoo, lake.settings.prompt_bank, lake.settings.augment.seed),
    "novel_views": lambda lake, zoo: run_novel_views(lake, zoo, lake.settings.augment),
    "outpaint": lambda lake, zoo: run_outpaint(lake, zoo, lake.settings.augment, zoo.models.segmenter),
    "negatives": lambda lake, zoo: run_negatives(lake, zoo, lake.settings.augment, zoo.models.segmenter,
                                                 zoo.name("captioner"), zoo.models.caption_prompt),
    "training_set": run_training_set,
    "train": lambda lake, zoo: _train(lake, zoo),
    "generate": lambda lake, zoo: _generate(lake, zoo),
    "rank": lambda lake, zoo: _rank(lake, zoo),
}

SCORING = ["masks", "captions", "embeddings", "metrics"]
# Classification needs reference embeddings; outpainting needs masks of the novel views;
# counterfactuals need masks of the outpaints; negatives need captions of the positives.
AUGMENTATION = ["masks", "captions", "embeddings", "classify", "prompt_bank", "novel_views", "masks", "outpaint",
                "masks", "captions", "negatives", *SCORING]
TRAINING = ["training_set", "train"]
GENERATION = ["generate", *SCORING, "rank"]


def _train(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    from training.train_job import run_training  # torch training code, loaded only when training

    return run_training(lake, zoo)


def run_stages(lake: Lakehouse, names: list[str], zoo: ModelZoo | None = None,
               progress: Callable[[str], None] = print) -> dict[str, dict[str, int]]:
    """Run stages in the given order; returns rows written per stage (summed over repeats)."""
    zoo = zoo or ModelZoo.from_settings(lake.settings)
    results: dict[str, dict[str, int]] = {}
    for name in names:
        started = time.perf_counter()
        written = STAGES[name](lake, zoo)
        for table, n in written.items():
            results.setdefault(name, {}).setdefault(table, 0)
            results[name][table] += n
        progress(f"  {name:<12} {time.perf_counter() - started:6.1f}s  rows written: "
                 + ", ".join(f"{t}={n}" for t, n in written.items()))
    return results


def run_scoring(lake: Lakehouse, zoo: ModelZoo | None = None, progress=print) -> dict[str, dict[str, int]]:
    zoo = zoo or ModelZoo.from_settings(lake.settings)
    zoo.check("clip", "dino", "captioner", zoo.models.segmenter)  # fail before any task runs
    return run_stages(lake, SCORING, zoo, progress)


def _generate(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    from training.generate import run_generation

    return run_generation(lake, zoo)


def _rank(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    from training.generate import run_ranking

    return run_ranking(lake, zoo)
