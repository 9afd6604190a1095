"""Filter job: scored images -> `training_images`, the audited training set (paper 2.3).

Per product: references are always kept; outpainted positives whose product mask IoU with the
source is below `iou_threshold` are dropped (the model hallucinated or lost the product); a
synthetic positive that is also a negative of the product (the same pixels from two lineages)
is dropped; positives scoring below `min_score_vs_references` x the references' mean score (or
`min_score`) are dropped; the rest are ranked by the weighted score within their kind and the top
`positives_per_kind[kind]` kept. Each kind has one CLIP-T definition: novel views against their
caption, outpaints against their scene prompt, so the two never compete on different texts.
Then negatives and counterfactuals are added to reach `augment.positives_per_negative`. Captions
lose the brands they name (etl/brands.py; the product's own brand stays only with
`prompt_bank.allow_own_brand`), so no training prompt teaches a brand. Every image considered gets a row, with its reason
when it was not selected:

    SELECT kind, reason, count(*) FROM training_images WHERE product_id = 'x' GROUP BY 1, 2
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd

from etl.brands import without_brands
from core.settings import TrainingSettings
from etl.lakehouse import Lakehouse
from etl.step import Step
from core.tables import TABLES, sql_list, sql_literal
from core.vocabulary import (AUGMENT_KINDS, AUGMENTED_NEGATIVES, AUGMENTED_POSITIVES, GENERATED, METRIC_COLUMNS,
                             REFERENCE, aggregate_score)

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
              "min_score_vs_references": config.min_score_vs_references,
              "positives_per_kind": config.positives_per_kind, "score_weights": config.score_weights,
              "positives_per_negative": positives_per_negative}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def select_training_images(rows: pd.DataFrame, config: TrainingSettings, positives_per_negative: float,
                           config_hash: str = "") -> pd.DataFrame:
    """One product's candidates (image_id, product_id, kind, metric columns, caption[, twin])
    -> COLUMNS. `twin`: the image is also a negative of the product (the same pixels from two
    lineages); such an image never trains as a positive."""
    rows = rows.copy()
    twin = rows.twin.fillna(False).astype(bool) if "twin" in rows else pd.Series(False, index=rows.index)
    rows["score"] = aggregate_score(rows, config.score_weights)
    rows["is_positive"] = rows.kind.isin((REFERENCE, *AUGMENTED_POSITIVES))
    rows["selected"], rows["reason"], rows["rank"] = False, None, None
    rows["config_hash"] = config_hash

    references = rows.kind == REFERENCE
    rows.loc[references, "selected"] = True
    synthetic = rows.is_positive & ~references
    iou = rows.mask_iou.astype(float)
    low_iou = synthetic & rows.kind.map(lambda k: k in AUGMENT_KINDS and AUGMENT_KINDS[k].min_iou) \
        & ~(iou >= config.iou_threshold)
    rows.loc[low_iou, "reason"] = [
        "no mask IoU (no product mask found)" if np.isnan(v) else
        f"mask IoU {v:.2f} below {config.iou_threshold} (product lost or hallucinated)" for v in iou[low_iou]]
    twins = synthetic & ~low_iou & twin
    rows.loc[twins, "reason"] = "also a negative of this product (the same pixels from two lineages)"
    bar, why = _score_bar(rows.score[references], config)
    low_score = synthetic & ~low_iou & ~twins & (rows.score < bar)
    rows.loc[low_score, "reason"] = [f"score {v:.3f} below {bar:.3f} ({why})" for v in rows.score[low_score]]
    for kind, group in rows[synthetic & ~low_iou & ~twins & ~low_score].groupby("kind"):
        quota = int(config.positives_per_kind.get(kind, AUGMENT_KINDS[kind].quota))
        eligible = group.sort_values(["score", "image_id"], ascending=[False, True])
        keep_first(rows, list(eligible.index), quota, "selected",
                   lambda rank, kind=kind, quota=quota: f"over the {kind} quota (rank {rank}, keeping {quota})")

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


def _score_bar(reference_scores: pd.Series, config: TrainingSettings) -> tuple[float, str]:
    """The score a synthetic positive needs, and why: a share of the references' mean score
    (when positive) and the absolute minimum (when set), whichever is higher."""
    bars = [(-math.inf, "no minimum")]
    mean = float(reference_scores.mean()) if len(reference_scores) else math.nan
    if config.min_score_vs_references and mean > 0:
        bars.append((config.min_score_vs_references * mean,
                     f"{config.min_score_vs_references} x the references' mean {mean:.3f}"))
    if config.min_score is not None:
        bars.append((config.min_score, "training.min_score"))
    return max(bars)


def caption_brands(lake: Lakehouse) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """The brands training captions may not name beyond the shipped list (`prompt_bank.brands`,
    the catalog's), and per product its own brand where `prompt_bank.allow_own_brand` allows it."""
    settings = lake.settings.prompt_bank
    brands = {r["product_id"]: json.loads(r["attributes"] or "{}").get("brand") or ""
              for r in lake.spark.sql("SELECT product_id, attributes FROM products").collect()}
    allowed = {p: (b,) for p, b in brands.items() if b} if settings.allow_own_brand else {}
    return [*settings.brands, *{b for b in brands.values() if b}], allowed


def run_training_set(lake: Lakehouse, zoo) -> dict[str, int]:
    settings = lake.settings
    config, ratio = settings.training, settings.augment.positives_per_negative
    config_hash = filter_hash(config, ratio)
    candidates = lake.spark.sql(
        f"""SELECT m.image_id, m.product_id, m.kind, {', '.join(f'm.{c}' for c in METRIC_COLUMNS)}, c.caption,
                   t.image_id IS NOT NULL AS twin
            FROM image_metrics m
            LEFT JOIN captions c ON c.image_id = m.image_id AND c.model = {sql_literal(zoo.name('captioner'))}
                                 AND c.prompt = {sql_literal(zoo.models.caption_prompt)}
            LEFT JOIN (SELECT DISTINCT product_id, image_id FROM synthetic_images
                       WHERE kind IN ({sql_list(AUGMENTED_NEGATIVES)})) t
                   ON t.product_id = m.product_id AND t.image_id = m.image_id
            WHERE m.kind <> {sql_literal(GENERATED)}""")  # the adapter's own outputs never train it
    schema = TABLES["training_images"].data_schema()
    refused, allowed = caption_brands(lake)
    selected = candidates.groupBy("product_id").applyInPandas(
        lambda rows: select_training_images(
            rows.assign(caption=[without_brands(c, refused, allowed.get(p, ())) for p, c in zip(rows.product_id,
                                                                                                 rows.caption)]),
            config, ratio, config_hash), schema)
    with lake.staged(selected) as staged:
        return {"training_images": lake.upsert("training_images", staged)}


TRAINING_SET = Step("training_set", run_training_set,
                    reads=("image_metrics", "captions", "synthetic_images", "products"),
                    writes=("training_images",), description="the filtered, audited training set")
