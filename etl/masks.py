"""Masks job: every image -> `masks`, with the configured segmenter, plus 'alpha' masks for
images whose alpha channel already outlines the product."""

from __future__ import annotations

from etl.image_sets import all_images
from etl.lakehouse import Lakehouse
from etl.model_outputs import write_model_outputs
from udfs.inference import mask_udf
from udfs.zoo import ModelZoo

STAGE = "masks"


def run_masks(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    method = zoo.models.segmenter
    zoo.check(method)
    images = all_images(lake)
    written = {"masks": 0, "quarantine": 0}
    for method, model_name, todo in [
        (method, zoo.name(method), images),
        ("alpha", "alpha", images.where("has_alpha")),
    ]:
        done = lake.table("masks").where(f"method = '{method}'").select("image_id")
        pending = todo.join(done, "image_id", "left_anti")
        rows = pending.select("image_id", "product_id", mask_udf(zoo, method)("image").alias("r")).selectExpr(
            "image_id", f"'{method}' AS method", f"'{model_name}' AS model", "r.mask AS mask",
            "r.area_fraction AS area_fraction", "r.bbox AS bbox", "r.score AS score",
            "current_timestamp() AS created_at", "product_id", "r.error AS error")
        for table, n in write_model_outputs(lake, STAGE, "masks", pending, rows).items():
            written[table] += n
    return written
