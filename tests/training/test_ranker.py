"""The learned ranker's guard on a constructed case where it clearly beats the plain aggregate:
fit on synthetic ratings it stays @candidate; fit on people's ratings it becomes @champion."""

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from etl import tracking
from etl.step import REGISTERED_MODELS
from core.tables import TABLES
from etl.ranker import MODEL_NAME, run_fit_ranker


def _rated_images(lake, source: str) -> None:
    """40 rated images of 4 products: an image passes when its segmented DINO is above 0.5, and
    the aggregate's metrics (CLIP-T, CLIP-I, DINO) are noise, so a learned ranker beats the sum."""
    rng = np.random.default_rng(0)
    n = 40
    metrics = pd.DataFrame({m: rng.uniform(0, 1, n) for m in ("clip_i", "dino_i", "clip_t", "seg_clip_i",
                                                               "seg_clip_t", "seg_dino_i", "mask_iou")})
    metrics["image_id"] = [f"img-{i:02d}" for i in range(n)]
    metrics["product_id"] = [f"p{i % 4}" for i in range(n)]
    metrics["kind"] = "generated"
    for column in TABLES["image_metrics"].data_columns:
        if column not in metrics:
            metrics[column] = None
    lake.upsert_rows("image_metrics", metrics.astype({"n_references": "Int32"}))
    rated = metrics[["image_id", "product_id"]].assign(
        evaluation_id="constructed", arm="ours", raters=3, passed=metrics.seg_dino_i > 0.5, failed_questions=None,
        score=0.0, kept=False, ratings_source=source)
    lake.upsert_rows("rated_images", rated.astype({"raters": "int32"}))


def _fit(lake, source: str) -> dict:
    lake.settings.evaluation.__dict__.update(ranker_min_images=20)  # frozen dataclass; the default
    _rated_images(lake, source)
    assert run_fit_ranker(lake) == {REGISTERED_MODELS: 1}
    client = MlflowClient()
    (version,) = client.search_model_versions(f"name = '{MODEL_NAME}'")
    metrics = client.get_run(version.run_id).data.metrics
    # The constructed case: the learned ranker beats the sum on held-out products, by far.
    assert metrics["heldout_pearson_learned"] > 0.5 > metrics["heldout_pearson_sum"]
    return client.get_registered_model(MODEL_NAME).aliases


def test_a_ranker_fit_on_synthetic_ratings_never_becomes_champion_even_when_it_wins(lake):
    aliases = _fit(lake, "synthetic")
    assert tracking.CHAMPION not in aliases and str(aliases[tracking.CANDIDATE]) == "1"


def test_a_ranker_fit_on_human_ratings_that_wins_becomes_champion(lake):
    aliases = _fit(lake, "human")
    assert str(aliases[tracking.CHAMPION]) == "1"

