"""Masks job: every image -> `masks`, with the configured segmenter, plus 'alpha' masks for
images whose alpha channel already outlines the product."""

from __future__ import annotations

from etl.image_sets import all_images
from etl.lakehouse import Lakehouse
from etl.model_outputs import write_model_outputs
from etl.step import Step
from core.tables import sql_literal
from udfs.inference import mask_udf
from udfs.zoo import SEGMENTER, ModelZoo

STAGE = "masks"


def run_masks(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    method = zoo.models.segmenter
    written = {"masks": 0, "quarantine": 0}
    for method, model_name, fingerprint, alpha_only in [
        (method, zoo.name(method), zoo.fingerprint(method), False),
        ("alpha", "alpha", "alpha", True),
    ]:
        # Done: masked with these very weights (new weights under the same name re-mask).
        done = lake.table("masks").where(f"method = '{method}' AND model_fingerprint = {sql_literal(fingerprint)}"
                                         ).select("image_id")
        pending = all_images(lake, done)
        pending = pending.where("has_alpha") if alpha_only else pending
        rows = pending.select("image_id", "product_id", mask_udf(zoo, method)("image").alias("r")).selectExpr(
            "image_id", f"'{method}' AS method", f"'{model_name}' AS model", "r.mask AS mask",
            "r.area_fraction AS area_fraction", "r.bbox AS bbox", "r.score AS score",
            f"{sql_literal(fingerprint)} AS model_fingerprint", "product_id", "r.error AS error")
        for table, n in write_model_outputs(lake, STAGE, "masks", pending, rows).items():
            written[table] += n
    return written


MASKS = Step("masks", run_masks, reads=("product_images", "synthetic_images", "generations"),
             writes=("masks", "quarantine"), roles=(SEGMENTER,),
             description="product masks of every image not masked yet (and alpha-channel masks)")
