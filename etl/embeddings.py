"""Embeddings job: images -> `embeddings` (each role and variant a metric reads: CLIP and DINO,
full and segmented, CLIP of the background), caption texts ->
`text_embeddings`. Each (image, backbone, variant) is embedded once; re-runs embed only what is
new, so metrics are recomputed from stored vectors without running a model."""

from __future__ import annotations

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.image_sets import image_keys, with_image_bytes
from etl.lakehouse import Lakehouse
from etl.model_outputs import write_model_outputs
from etl.step import Step
from core.tables import sql_literal
from core.vocabulary import EMBEDDING_VARIANTS, vector_inputs
from udfs.inference import image_embedding_udf, text_embedding_udf
from udfs.zoo import ModelZoo

STAGE = "embeddings"
IMAGE_ROLES = tuple(dict.fromkeys(role for role, _ in vector_inputs()))


def run_embeddings(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    """Every (role, variant) some metric reads (core.vocabulary.vector_inputs)."""
    written = {"embeddings": 0, "text_embeddings": 0, "quarantine": 0}
    method = zoo.models.segmenter
    # Masked variants exist only where a product was found.
    masks = lake.table("masks").where(f"method = {sql_literal(method)} AND area_fraction > 0").select(
        "image_id", "mask")
    passes = embedding_passes(zoo)
    with lake.staged(_pending(lake, passes, masks)) as pending:
        todo = {(r["role"], r["variant"]) for r in pending.select("role", "variant").distinct().collect()}
        for p in passes.itertuples():
            if (p.role, p.variant) not in todo:
                continue
            images = with_image_bytes(lake, pending.where(f"role = '{p.role}' AND variant = '{p.variant}'"))
            rows = images.select(
                "image_id", "product_id", image_embedding_udf(zoo, p.role, p.variant)("image", "mask").alias("r")
            ).selectExpr(
                "image_id", f"{sql_literal(p.backbone)} AS backbone", f"'{p.role}' AS role",
                f"'{p.variant}' AS variant", f"{sql_literal(p.mask_method)} AS mask_method", "r.vector AS vector",
                f"{sql_literal(p.model_fingerprint)} AS model_fingerprint", "product_id", "r.error AS error")
            for table, n in write_model_outputs(lake, STAGE, "embeddings", images, rows).items():
                written[table] += n
    # Every text CLIP-T may compare with: captions, and the prompts of synthetic and generated images.
    texts = lake.spark.sql("SELECT caption AS text FROM captions UNION SELECT prompt AS text FROM synthetic_images "
                           "UNION SELECT prompt AS text FROM generations")
    written["text_embeddings"] = embed_texts(lake, zoo, texts)
    return written


def embedding_passes(zoo: ModelZoo) -> pd.DataFrame:
    """One row per (role, variant) some metric reads (core.vocabulary.vector_inputs): the
    backbone, mask_method and model_fingerprint its stored vectors carry."""
    return pd.DataFrame([
        {"role": role, "variant": variant, "backbone": zoo.name(role), "mask_method": mask_method,
         "model_fingerprint": embedding_fingerprint(zoo, role, mask_method)}
        for role, variant in vector_inputs()
        for mask_method in [EMBEDDING_VARIANTS[variant].mask_method(zoo.models.segmenter)]])


def _pending(lake: Lakehouse, passes: pd.DataFrame, masks: DataFrame) -> DataFrame:
    """Every image a pass has yet to embed: role, variant, the image's keys (image_keys) and, for
    a masked variant, its product mask (an image without one has no masked vector). One query
    over the stored keys, staged once: the passes then embed exactly these, so a run reads the
    stored keys and the masks once, not once per pass."""
    wanted = lake.spark.createDataFrame(passes.assign(masked=passes.mask_method != "")).crossJoin(image_keys(lake))
    stored = lake.table("embeddings").select("image_id", "backbone", "variant", "mask_method", "model_fingerprint")
    return (wanted.join(stored, ["image_id", "backbone", "variant", "mask_method", "model_fingerprint"], "left_anti")
            .join(masks, "image_id", "left").where("NOT masked OR mask IS NOT NULL")
            .selectExpr("role", "variant", "image_id", "product_id", "kind", "has_alpha",
                        "CASE WHEN masked THEN mask END AS mask"))


def embedding_fingerprint(zoo: ModelZoo, role: str, mask_method: str) -> str:
    """The weights behind a vector: a segmented vector depends on the mask's weights too."""
    return zoo.fingerprint(role) + (f"+{zoo.fingerprint(mask_method)}" if mask_method else "")


def embed_texts(lake: Lakehouse, zoo: ModelZoo, texts) -> int:
    """CLIP-embed the distinct non-empty texts of column `text` that are not stored yet."""
    backbone, fingerprint = zoo.name("clip"), zoo.fingerprint("clip")
    done = lake.table("text_embeddings").where(
        f"backbone = {sql_literal(backbone)} AND model_fingerprint = {sql_literal(fingerprint)}").select("text_id")
    pending = (texts.where("text IS NOT NULL AND trim(text) <> ''").distinct()
               .withColumn("text_id", F.sha2("text", 256)).join(done, "text_id", "left_anti"))
    rows = pending.select("text_id", "text", text_embedding_udf(zoo)("text").alias("r")).selectExpr(
        "text_id", f"{sql_literal(backbone)} AS backbone", "text", "r.vector AS vector",
        f"{sql_literal(fingerprint)} AS model_fingerprint", "r.error AS error")
    if pending.isEmpty():
        return 0
    with lake.staged(rows) as staged:
        # Texts that cannot be embedded are empty by construction; nothing to quarantine.
        return lake.upsert("text_embeddings", staged.where("error IS NULL"))


EMBEDDINGS = Step("embeddings", run_embeddings,
                  reads=("product_images", "synthetic_images", "generations", "masks", "captions"),
                  writes=("embeddings", "text_embeddings", "quarantine"), roles=IMAGE_ROLES,
                  description="CLIP and DINO embeddings (each variant a metric reads) and CLIP text embeddings")
