"""Embeddings job: images -> `embeddings` (CLIP and DINO, full and segmented), caption texts ->
`text_embeddings`. Each (image, backbone, variant) is embedded once; re-runs embed only what is
new, so metrics are recomputed from stored vectors without running a model."""

from __future__ import annotations

from pyspark.sql import functions as F

from etl.image_sets import all_images
from etl.lakehouse import Lakehouse
from etl.model_outputs import write_model_outputs
from etl.step import Step
from core.tables import sql_literal
from udfs.inference import image_embedding_udf, text_embedding_udf
from udfs.zoo import ModelZoo

STAGE = "embeddings"
IMAGE_ROLES = ("clip", "dino")


def run_embeddings(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    written = {"embeddings": 0, "text_embeddings": 0, "quarantine": 0}
    method = zoo.models.segmenter
    # Segmented variants exist only where a product was found.
    masks = lake.table("masks").where(f"method = {sql_literal(method)} AND area_fraction > 0").select(
        "image_id", "mask")
    variants = {
        "full": (lambda images: images.withColumn("mask", F.lit(None).cast("binary")), ""),
        "segmented": (lambda images: images.join(masks, "image_id"), method),
    }
    for role in IMAGE_ROLES:
        backbone = zoo.name(role)
        for variant, (with_mask, mask_method) in variants.items():
            fingerprint = embedding_fingerprint(zoo, role, mask_method)
            done = lake.table("embeddings").where(
                f"backbone = {sql_literal(backbone)} AND variant = '{variant}' "
                f"AND mask_method = {sql_literal(mask_method)} "
                f"AND model_fingerprint = {sql_literal(fingerprint)}").select("image_id")
            pending = with_mask(all_images(lake, done))
            rows = pending.select(
                "image_id", "product_id", image_embedding_udf(zoo, role)("image", "mask").alias("r")
            ).selectExpr(
                "image_id", f"{sql_literal(backbone)} AS backbone", f"'{role}' AS role", f"'{variant}' AS variant",
                f"{sql_literal(mask_method)} AS mask_method", "r.vector AS vector",
                f"{sql_literal(fingerprint)} AS model_fingerprint", "product_id", "r.error AS error")
            for table, n in write_model_outputs(lake, STAGE, "embeddings", pending, rows).items():
                written[table] += n
    # Every text CLIP-T may compare with: captions, and the prompts of synthetic and generated images.
    texts = lake.spark.sql("SELECT caption AS text FROM captions UNION SELECT prompt AS text FROM synthetic_images "
                           "UNION SELECT prompt AS text FROM generations")
    written["text_embeddings"] = embed_texts(lake, zoo, texts)
    return written


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
                  description="CLIP and DINO embeddings (full and segmented) and CLIP text embeddings")
