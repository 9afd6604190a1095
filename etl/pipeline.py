"""The steps of the pipeline: `(lake, zoo) -> {table: rows written}`, each incremental (it
processes only what is not stored yet, so running it again writes nothing).

jobs/pipeline.toml groups steps into stages with dependencies; `recontext run` (jobs/runner.py)
runs those. `run_stages` runs a list of steps directly (tests, benchmarks).
"""

from __future__ import annotations

import time
from typing import Callable

from etl.augment import run_negatives, run_novel_views, run_outpaint
from etl.captions import run_captions
from etl.embeddings import run_embeddings
from etl.evaluation import run_evaluation
from etl.lakehouse import Lakehouse
from etl.masks import run_masks
from etl.metrics import run_metrics
from etl.prompt_bank import run_classify, run_prompt_bank
from etl.training_set import run_training_set
from udfs.zoo import ModelZoo

Step = Callable[[Lakehouse, ModelZoo], dict[str, int]]

STEPS: dict[str, Step] = {
    "ingest": lambda lake, zoo: _ingest(lake),
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
    "train_baseline": lambda lake, zoo: _train_baseline(lake, zoo),
    "generate": lambda lake, zoo: _generate(lake, zoo),
    "rank": lambda lake, zoo: _rank(lake, zoo),
    "evaluate": run_evaluation,
    "fit_ranker": lambda lake, zoo: _fit_ranker(lake, zoo),
    "report": lambda lake, zoo: _report(lake),
}

SCORING = ["masks", "captions", "embeddings", "metrics"]


def _ingest(lake: Lakehouse) -> dict[str, int]:
    """Every configured source (ingest.sources), limited to lake.products when set."""
    from etl.ingest import ingest

    written: dict[str, int] = {}
    with lake.unscoped():
        for source in lake.settings.ingest.sources:
            for table, n in ingest(lake, source, products=lake.products).rows_written.items():
                written[table] = written.get(table, 0) + n
    return written


def _report(lake: Lakehouse) -> dict[str, int]:
    from etl.report import write_report

    write_report(lake, lake.settings.home / "report", sorted(lake.products) if lake.products else None)
    return {}


def _train(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    from training.train_job import run_training  # torch training code, loaded only when training

    return run_training(lake, zoo)


def _train_baseline(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    if not lake.settings.evaluation.baseline:
        return {"adapters": 0}
    from training.train_job import run_baseline_training

    return run_baseline_training(lake, zoo)


def _fit_ranker(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    from training.ranker import run_fit_ranker

    return run_fit_ranker(lake, zoo)


def run_stages(lake: Lakehouse, names: list[str], zoo: ModelZoo | None = None,
               progress: Callable[[str], None] = print) -> dict[str, dict[str, int]]:
    """Run stages in the given order; returns rows written per stage (summed over repeats)."""
    zoo = zoo or ModelZoo.from_settings(lake.settings)
    results: dict[str, dict[str, int]] = {}
    for name in names:
        started = time.perf_counter()
        written = STEPS[name](lake, zoo)
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
