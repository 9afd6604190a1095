"""The scoring stages in order: masks, captions, embeddings, metrics."""

from __future__ import annotations

import logging
import time

from etl.captions import run_captions
from etl.embeddings import run_embeddings
from etl.lakehouse import Lakehouse
from etl.masks import run_masks
from etl.metrics import run_metrics
from udfs.zoo import ModelZoo

log = logging.getLogger(__name__)

STAGES = {"masks": run_masks, "captions": run_captions, "embeddings": run_embeddings, "metrics": run_metrics}


def run_scoring(lake: Lakehouse, zoo: ModelZoo | None = None, progress=print) -> dict[str, dict[str, int]]:
    zoo = zoo or ModelZoo.from_settings(lake.settings)
    zoo.check("clip", "dino", "captioner", zoo.models.segmenter)  # fail before any task runs
    results = {}
    for name, stage in STAGES.items():
        started = time.perf_counter()
        results[name] = stage(lake, zoo)
        progress(f"  {name:<10} {time.perf_counter() - started:6.1f}s  rows written: "
                 + ", ".join(f"{t}={n}" for t, n in results[name].items()))
    return results
