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
- bg_clip_t: clip_t of the scene alone, the product's pixels masked out (udfs.imaging
  .without_product), against the same text: scene adherence apart from the product.
Each metric is a row of core.vocabulary.METRICS naming its inputs and one of the compute
functions at the end of this module. No model runs here; a product is recomputed only when its
set of images or references changed, when the weights behind its scores did (the `models`
fingerprints), or when a metric was added or its definition changed (`metric_versions`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from etl.embeddings import embedding_passes
from etl.image_sets import scored_images
from etl.lakehouse import Lakehouse
from etl.step import Step
from core.tables import TABLES, sql_literal
from core.vocabulary import METRIC_VERSIONS, METRICS, resolve, vector_inputs
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
    method = zoo.models.segmenter
    constants = metric_constants(zoo)
    scored_images(lake).createOrReplaceTempView("_scored")
    todo = _products_to_score(lake, constants)
    if not todo:
        return {"image_metrics": 0}
    spark.createDataFrame(pd.DataFrame({"product_id": todo}), "product_id string").createOrReplaceTempView("_todo")
    wide = spark.sql(
        f"""
        SELECT s.image_id, s.product_id, s.kind, s.is_reference, {stored_vector_columns()},
               coalesce(nullif(s.prompt, ''), cap.caption) AS text,
               CASE WHEN nullif(s.prompt, '') IS NOT NULL THEN 'prompt' ELSE 'caption' END AS text_source,
               tf.vector AS {input_column("text")}, m.mask AS mask,
               coalesce(pm.mask, a.mask) AS source_mask,
               CASE WHEN pm.mask IS NOT NULL THEN concat('parent:', s.parent_image_id)
                    WHEN a.mask IS NOT NULL THEN 'alpha' END AS iou_against
        FROM _scored s JOIN _todo t ON t.product_id = s.product_id
        {stored_vector_joins(zoo, "s")}
        LEFT JOIN (SELECT image_id, min(caption) AS caption FROM captions
                   WHERE model = {sql_literal(zoo.name('captioner'))}
                   AND prompt = {sql_literal(zoo.models.caption_prompt)} GROUP BY image_id) cap
               ON cap.image_id = s.image_id
        LEFT JOIN (SELECT text, vector FROM text_embeddings WHERE backbone = {sql_literal(zoo.name("clip"))}) tf
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


def input_column(name: str) -> str:
    """The column a metric input travels in: "clip:full" -> clip_full_vector, "text" -> text_vector."""
    return name.replace(":", "_") + "_vector" if ":" in name or name == "text" else name


def stored_vector_columns() -> str:
    return ", ".join(f"{_alias(role, variant)}.vector AS {input_column(f'{role}:{variant}')}"
                     for role, variant in vector_inputs())


def stored_vector_joins(zoo: ModelZoo, images: str) -> str:
    """LEFT JOINs of every stored embedding a metric reads onto `images`.image_id."""
    joins = []
    for p in embedding_passes(zoo).itertuples():
        alias = _alias(p.role, p.variant)
        joins.append(f"LEFT JOIN (SELECT image_id, vector FROM embeddings WHERE backbone = {sql_literal(p.backbone)} "
                     f"AND variant = '{p.variant}' AND mask_method = {sql_literal(p.mask_method)}) {alias} "
                     f"ON {alias}.image_id = {images}.image_id")
    return "\n".join(joins)


def _alias(role: str, variant: str) -> str:
    return f"e_{role}_{variant}"


def metric_constants(zoo: ModelZoo) -> dict:
    """The columns every image_metrics row carries: backbones, mask method, the fingerprints of
    the weights behind its scores and the metrics' versions (a change recomputes the product)."""
    method = zoo.models.segmenter
    return {"clip_backbone": zoo.name("clip"), "dino_backbone": zoo.name("dino"), "mask_method": method,
            "models": ";".join(zoo.fingerprint(role) for role in ("clip", "dino", method, "captioner")),
            "metric_versions": METRIC_VERSIONS}


def _products_to_score(lake: Lakehouse, constants: dict) -> list[str]:
    """Products with an image lacking metrics, whose number of references changed, whose metrics
    came from other weights (`models`: a swapped CLIP, DINO, segmenter or captioner) or from
    other metric definitions (a metric added or its version raised)."""
    current = (f"models <=> {sql_literal(constants['models'])} "
               f"AND metric_versions <=> {sql_literal(constants['metric_versions'])}")
    rows = lake.spark.sql(
        f"""
        SELECT s.product_id FROM (
            SELECT product_id, count(*) AS images, sum(CAST(is_reference AS INT)) AS refs
            FROM _scored GROUP BY product_id) s
        LEFT JOIN (  -- a reference is compared with the others: its n_references is one short
            SELECT product_id, count(*) AS images,
                   max(n_references + CASE WHEN kind = 'reference' THEN 1 ELSE 0 END) AS refs,
                   sum(CASE WHEN {current} THEN 0 ELSE 1 END) AS stale
            FROM image_metrics GROUP BY product_id) m ON m.product_id = s.product_id
        WHERE m.product_id IS NULL OR m.images <> s.images OR NOT (m.refs <=> s.refs) OR m.stale > 0
        """
    ).collect()
    return sorted(r["product_id"] for r in rows)


def score_product(rows: pd.DataFrame, constants: dict) -> pd.DataFrame:
    """Every metric (core.vocabulary.METRICS) for one product's images: the applyInPandas
    function of the metrics job, and what `recontext imagine` scores its images with. `rows`
    carry each metric input in its input_column."""
    computes = [(m.name, m.inputs, resolve(m.compute)) for m in METRICS]
    inputs = list(dict.fromkeys(i for m in METRICS for i in m.inputs))
    values = [{i: _value(getattr(row, input_column(i))) for i in inputs} for row in rows.itertuples(index=False)]
    references = [k for k, is_reference in enumerate(rows.is_reference.astype(bool)) if is_reference]
    out = []
    for n, row in enumerate(rows.itertuples(index=False)):
        others = [values[k] for k in references if k != n]
        out.append({
            "image_id": row.image_id, "product_id": row.product_id, "kind": row.kind,
            **{name: compute(metric_inputs, values[n], others) for name, metric_inputs, compute in computes},
            "n_references": len(others), "text": row.text,
            "text_source": row.text_source if row.text is not None else None,
            **constants, "iou_against": row.iou_against,
        })
    columns = TABLES["image_metrics"].data_columns
    return pd.DataFrame(out, columns=columns).astype({"n_references": "int32"})


def _value(value):
    """None for a missing input (NULL arrives as None or NaN)."""
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


# The compute functions METRICS name: (inputs, image, references) -> float or None, None when an
# input is missing.

def mean_cosine_to_references(inputs: tuple[str, ...], image: dict, references: list[dict]) -> float | None:
    """The mean cosine of the image's vector with each reference's (CLIP-I, DINO and their
    segmented variants)."""
    (name,) = inputs
    refs = [np.asarray(r[name], dtype=np.float64) for r in references if r[name] is not None]
    if image[name] is None or not refs:
        return None
    return float(cosine(np.asarray(image[name], dtype=np.float64)[None], np.stack(refs)).mean())


def cosine_of_pair(inputs: tuple[str, ...], image: dict, references: list[dict]) -> float | None:
    """The cosine of two of the image's own vectors (CLIP-T: its image and its text)."""
    a, b = (image[name] for name in inputs)
    if a is None or b is None:
        return None
    return float(cosine(np.asarray(a, dtype=np.float64)[None], np.asarray(b, dtype=np.float64)[None])[0, 0])


def iou_of_masks(inputs: tuple[str, ...], image: dict, references: list[dict]) -> float | None:
    """Mask IoU of the image's two masks (PNG bytes)."""
    a, b = (image[name] for name in inputs)
    return None if a is None or b is None else mask_iou(decode_mask(a), decode_mask(b))


METRICS_STEP = Step("metrics", run_metrics,
                    reads=("product_images", "synthetic_images", "generations", "embeddings", "text_embeddings",
                           "captions", "masks"),
                    writes=("image_metrics",),
                    description="every metric of core.vocabulary.METRICS, from stored vectors and masks")
