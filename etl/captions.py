"""Captions job: every image -> `captions`, from the captioner with the configured prompt."""

from __future__ import annotations

from etl.image_sets import all_images
from etl.lakehouse import Lakehouse
from etl.model_outputs import write_model_outputs
from etl.tables import sql_literal
from udfs.inference import caption_udf
from udfs.zoo import ModelZoo

STAGE = "captions"


def run_captions(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    zoo.check("captioner")
    model, prompt = zoo.name("captioner"), zoo.models.caption_prompt
    done = lake.table("captions").where(
        f"model = {sql_literal(model)} AND prompt = {sql_literal(prompt)}").select("image_id")
    pending = all_images(lake).join(done, "image_id", "left_anti")
    rows = pending.select("image_id", "product_id", caption_udf(zoo, prompt)("image").alias("r")).selectExpr(
        "image_id", f"{sql_literal(model)} AS model", f"{sql_literal(prompt)} AS prompt", "r.caption AS caption",
        "current_timestamp() AS created_at", "product_id", "r.error AS error")
    return write_model_outputs(lake, STAGE, "captions", pending, rows)
