"""Metrics job: stored embeddings and masks -> `image_metrics`, one row per scored image.

Definitions (raw cosine; backbones recorded next to the values; see docs/metrics.md):
- clip_i / dino_i (DreamBooth CLIP-I / DINO): the mean cosine similarity between the image's
  embedding and the embeddings of its product's reference images. A reference image is compared
  with the *other* references (leave-one-out), so a product with one photo gets NULL rather than
  a trivial 1.0; synthetic and generated images are compared with every reference.
- clip_t (DreamBooth CLIP-T): the cosine between the image's CLIP image embedding and the CLIP
  text embedding of its text (the prompt that made it, else its caption).
- seg_clip_i / seg_dino_i / seg_clip_t (MultiBooth): the same three on segmented images, i.e.
  the product alone (background set to white, cropped to the mask's box), on both sides.
- mask_iou: |A and B| / |A or B| of the image's product mask and its source mask: the parent
  image's mask for derived images, the image's own alpha channel for a reference photo that has
  one (how well the segmenter recovers a known outline), else NULL.
No model runs here; a product is recomputed only when its set of images or references changed,
or when the weights behind its scores did (the `models` fingerprints).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from etl.image_sets import scored_images
from etl.lakehouse import Lakehouse
from etl.step import Step
from core.tables import TABLES, sql_literal
from udfs.imaging import decode_mask
from udfs.zoo import ModelZoo

STAGE = "metrics"


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with each row of `b`."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; `b` is resized (nearest) to `a`'s shape when they differ."""
    if a.shape != b.shape:
        b = np.asarray(Image.fromarray(b.astype(np.uint8) * 255).resize((a.shape[1], a.shape[0]),
                                                                         Image.Resampling.NEAREST)) >= 128
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def run_metrics(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    spark = lake.spark
    clip, dino, method = zoo.name("clip"), zoo.name("dino"), zoo.models.segmenter
    constants = metric_constants(zoo)
    scored_images(lake).createOrReplaceTempView("_scored")
    todo = _products_to_score(lake, constants["models"])
    if not todo:
        return {"image_metrics": 0}
    spark.createDataFrame(pd.DataFrame({"product_id": todo}), "product_id string").createOrReplaceTempView("_todo")

    def vectors(backbone: str, variant: str) -> str:
        mask_method = "" if variant == "full" else method
        return (f"(SELECT image_id, vector FROM embeddings WHERE backbone = {sql_literal(backbone)} "
                f"AND variant = '{variant}' AND mask_method = {sql_literal(mask_method)})")

    wide = spark.sql(
        f"""
        SELECT s.image_id, s.product_id, s.kind, s.is_reference,
               cf.vector AS clip_vector, df.vector AS dino_vector, cs.vector AS seg_clip_vector,
               ds.vector AS seg_dino_vector,
               coalesce(nullif(s.prompt, ''), cap.caption) AS text,
               CASE WHEN nullif(s.prompt, '') IS NOT NULL THEN 'prompt' ELSE 'caption' END AS text_source,
               tf.vector AS text_vector, m.mask AS mask,
               coalesce(pm.mask, a.mask) AS source_mask,
               CASE WHEN pm.mask IS NOT NULL THEN concat('parent:', s.parent_image_id)
                    WHEN a.mask IS NOT NULL THEN 'alpha' END AS iou_against
        FROM _scored s JOIN _todo t ON t.product_id = s.product_id
        LEFT JOIN {vectors(clip, 'full')} cf ON cf.image_id = s.image_id
        LEFT JOIN {vectors(dino, 'full')} df ON df.image_id = s.image_id
        LEFT JOIN {vectors(clip, 'segmented')} cs ON cs.image_id = s.image_id
        LEFT JOIN {vectors(dino, 'segmented')} ds ON ds.image_id = s.image_id
        LEFT JOIN (SELECT image_id, min(caption) AS caption FROM captions
                   WHERE model = {sql_literal(zoo.name('captioner'))}
                   AND prompt = {sql_literal(zoo.models.caption_prompt)} GROUP BY image_id) cap
               ON cap.image_id = s.image_id
        LEFT JOIN (SELECT text, vector FROM text_embeddings WHERE backbone = {sql_literal(clip)}) tf
               ON tf.text = coalesce(nullif(s.prompt, ''), cap.caption)
        LEFT JOIN (SELECT image_id, mask FROM masks WHERE method = {sql_literal(method)}) m ON m.image_id = s.image_id
        LEFT JOIN (SELECT image_id, mask FROM masks WHERE method = 'alpha') a ON a.image_id = s.image_id
        LEFT JOIN (SELECT image_id, mask FROM masks WHERE method = {sql_literal(method)}) pm
               ON pm.image_id = s.parent_image_id
        """
    )
    schema = TABLES["image_metrics"].data_schema()
    metrics = wide.groupBy("product_id").applyInPandas(
        lambda rows: score_product(rows, constants), schema)
    with lake.staged(metrics) as staged:
        return {"image_metrics": lake.upsert("image_metrics", staged)}


def metric_constants(zoo: ModelZoo) -> dict:
    """The columns every image_metrics row carries: backbones, mask method, and the fingerprints
    of the weights behind its scores (a change recomputes the product)."""
    method = zoo.models.segmenter
    return {"clip_backbone": zoo.name("clip"), "dino_backbone": zoo.name("dino"), "mask_method": method,
            "models": ";".join(zoo.fingerprint(role) for role in ("clip", "dino", method, "captioner"))}


def _products_to_score(lake: Lakehouse, models: str) -> list[str]:
    """Products with an image lacking metrics, whose number of references changed, or whose
    metrics came from other weights (`models`: a swapped CLIP, DINO, segmenter or captioner)."""
    rows = lake.spark.sql(
        f"""
        SELECT s.product_id FROM (
            SELECT product_id, count(*) AS images, sum(CAST(is_reference AS INT)) AS refs
            FROM _scored GROUP BY product_id) s
        LEFT JOIN (  -- a reference is compared with the others: its n_references is one short
            SELECT product_id, count(*) AS images,
                   max(n_references + CASE WHEN kind = 'reference' THEN 1 ELSE 0 END) AS refs,
                   sum(CASE WHEN models <=> {sql_literal(models)} THEN 0 ELSE 1 END) AS stale
            FROM image_metrics GROUP BY product_id) m ON m.product_id = s.product_id
        WHERE m.product_id IS NULL OR m.images <> s.images OR NOT (m.refs <=> s.refs) OR m.stale > 0
        """
    ).collect()
    return sorted(r["product_id"] for r in rows)


def score_product(rows: pd.DataFrame, constants: dict) -> pd.DataFrame:
    """All metric columns for one product's images (the applyInPandas function)."""
    refs = rows[rows.is_reference.astype(bool)]
    out = []
    for row in rows.itertuples(index=False):
        others = refs[refs.image_id != row.image_id] if row.is_reference else refs
        values = {
            "clip_i": _mean_to_refs(row.clip_vector, others["clip_vector"]),
            "dino_i": _mean_to_refs(row.dino_vector, others["dino_vector"]),
            "seg_clip_i": _mean_to_refs(row.seg_clip_vector, others["seg_clip_vector"]),
            "seg_dino_i": _mean_to_refs(row.seg_dino_vector, others["seg_dino_vector"]),
            "clip_t": _pair_cosine(row.clip_vector, row.text_vector),
            "seg_clip_t": _pair_cosine(row.seg_clip_vector, row.text_vector),
            "mask_iou": (mask_iou(decode_mask(row.mask), decode_mask(row.source_mask))
                         if _present(row.mask) and _present(row.source_mask) else None),
        }
        out.append({
            "image_id": row.image_id, "product_id": row.product_id, "kind": row.kind, **values,
            "n_references": len(others), "text": row.text,
            "text_source": row.text_source if row.text is not None else None,
            **constants, "iou_against": row.iou_against,
        })
    columns = TABLES["image_metrics"].data_columns
    return pd.DataFrame(out, columns=columns).astype({"n_references": "int32"})


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def _mean_to_refs(vector, ref_vectors: pd.Series) -> float | None:
    refs = [np.asarray(v, dtype=np.float64) for v in ref_vectors if _present(v)]
    if not _present(vector) or not refs:
        return None
    return float(cosine(np.asarray(vector, dtype=np.float64)[None], np.stack(refs)).mean())


def _pair_cosine(a, b) -> float | None:
    if not (_present(a) and _present(b)):
        return None
    return float(cosine(np.asarray(a, dtype=np.float64)[None], np.asarray(b, dtype=np.float64)[None])[0, 0])


METRICS_STEP = Step("metrics", run_metrics,
                    reads=("product_images", "synthetic_images", "generations", "embeddings", "text_embeddings",
                           "captions", "masks"),
                    writes=("image_metrics",),
                    description="CLIP-I, CLIP-T, DINO, segmented variants and mask IoU from stored vectors")
