"""Filter job: scored images -> `training_images`, the audited training set (paper 2.3).

Per product: references are always kept; outpainted positives whose product mask IoU with the
source is below `iou_threshold` are dropped (the model hallucinated or lost the product);
positives scoring below `min_score` are dropped; the rest are ranked by the weighted score and
the top `positives_per_product` kept; then negatives and counterfactuals are added to reach
`augment.positives_per_negative`. Every image considered gets a row, with its reason when it was
not selected:

    SELECT kind, reason, count(*) FROM training_images WHERE product_id = 'x' GROUP BY 1, 2
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd

from etl.config import TrainingSettings
from etl.lakehouse import Lakehouse
from etl.tables import TABLES, sql_literal

POSITIVE_KINDS = ("reference", "novel_view", "outpaint")
COLUMNS = TABLES["training_images"].data_columns


def keep_first(rows: pd.DataFrame, ordered: list, keep: int, flag: str, reason) -> None:
    """Rank `ordered` (row labels, best first) 1..n in place; the first `keep` get `flag` True,
    the rest `reason(rank)`."""
    for rank, index in enumerate(ordered, start=1):
        rows.loc[index, "rank"] = rank
        if rank <= keep:
            rows.loc[index, flag] = True
        else:
            rows.loc[index, "reason"] = reason(rank)


def filter_hash(config: TrainingSettings, positives_per_negative: float) -> str:
    fields = {"iou_threshold": config.iou_threshold, "min_score": config.min_score,
              "positives_per_product": config.positives_per_product, "score_weights": config.score_weights,
              "positives_per_negative": positives_per_negative}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def select_training_images(rows: pd.DataFrame, config: TrainingSettings, positives_per_negative: float,
                           config_hash: str = "") -> pd.DataFrame:
    """One product's candidates (image_id, product_id, kind, metric columns, caption) -> COLUMNS."""
    rows = rows.copy()
    weights = config.score_weights
    rows["score"] = sum(w * rows[m].astype(float).fillna(0.0) for m, w in weights.items())
    rows["is_positive"] = rows.kind.isin(POSITIVE_KINDS)
    rows["selected"], rows["reason"], rows["rank"] = False, None, None
    rows["config_hash"] = config_hash

    references = rows.kind == "reference"
    rows.loc[references, "selected"] = True
    synthetic = rows.is_positive & ~references
    iou = rows.mask_iou.astype(float)
    low_iou = synthetic & (rows.kind == "outpaint") & ~(iou >= config.iou_threshold)
    rows.loc[low_iou, "reason"] = [
        "no mask IoU (no product mask found)" if np.isnan(v) else
        f"mask IoU {v:.2f} below {config.iou_threshold} (product lost or hallucinated)" for v in iou[low_iou]]
    low_score = synthetic & ~low_iou & (rows.score < config.min_score)
    rows.loc[low_score, "reason"] = [f"score {v:.3f} below {config.min_score}" for v in rows.score[low_score]]
    eligible = rows[synthetic & ~low_iou & ~low_score].sort_values(["score", "image_id"], ascending=[False, True])
    keep_first(rows, list(eligible.index), config.positives_per_product, "selected",
               lambda rank: f"over quota (rank {rank}, keeping {config.positives_per_product})")

    wanted = math.ceil(int(rows.selected.sum()) / positives_per_negative)
    negatives = rows[~rows.is_positive]
    # Alternate counterfactuals and in-class negatives, each in image_id order.
    ordered = sorted(negatives.index, key=lambda i: (
        sorted(negatives[negatives.kind == negatives.kind[i]].image_id).index(negatives.image_id[i]),
        negatives.kind[i] != "counterfactual"))
    keep_first(rows, ordered, wanted, "selected",
               lambda rank: f"over quota (negative {rank}, keeping {wanted} for the ratio)")
    rows["rank"] = rows["rank"].astype("Int32")
    return rows[COLUMNS]


def run_training_set(lake: Lakehouse, zoo) -> dict[str, int]:
    settings = lake.settings
    config, ratio = settings.training, settings.augment.positives_per_negative
    config_hash = filter_hash(config, ratio)
    candidates = lake.spark.sql(
        f"""SELECT m.image_id, m.product_id, m.kind, m.clip_i, m.dino_i, m.clip_t, m.seg_clip_i, m.seg_dino_i,
                   m.seg_clip_t, m.mask_iou, c.caption
            FROM image_metrics m
            LEFT JOIN captions c ON c.image_id = m.image_id AND c.model = {sql_literal(zoo.name('captioner'))}
                                 AND c.prompt = {sql_literal(zoo.models.caption_prompt)}
            WHERE m.kind <> 'generated'""")  # the adapter's own outputs never train it
    schema = TABLES["training_images"].data_schema()
    selected = candidates.groupBy("product_id").applyInPandas(
        lambda rows: select_training_images(rows, config, ratio, config_hash), schema)
    with lake.staged(selected.selectExpr("*", "current_timestamp() AS created_at")) as staged:
        return {"training_images": lake.upsert("training_images", staged)}
