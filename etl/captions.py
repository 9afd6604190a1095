"""Captions job: every image -> `captions`, from the captioner with the configured prompt."""

from __future__ import annotations

from etl.image_sets import all_images
from etl.lakehouse import Lakehouse
from etl.model_outputs import write_model_outputs
from etl.step import Step
from core.tables import sql_literal
from udfs.inference import caption_udf
from udfs.zoo import ModelZoo

STAGE = "captions"


def run_captions(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    model, prompt, fingerprint = zoo.name("captioner"), zoo.models.caption_prompt, zoo.fingerprint("captioner")
    done = lake.table("captions").where(
        f"model = {sql_literal(model)} AND prompt = {sql_literal(prompt)} "
        f"AND model_fingerprint = {sql_literal(fingerprint)}").select("image_id")
    pending = all_images(lake, done)
    rows = pending.select("image_id", "product_id", caption_udf(zoo, prompt)("image").alias("r")).selectExpr(
        "image_id", f"{sql_literal(model)} AS model", f"{sql_literal(prompt)} AS prompt", "r.caption AS caption",
        f"{sql_literal(fingerprint)} AS model_fingerprint", "product_id", "r.error AS error")
    return write_model_outputs(lake, STAGE, "captions", pending, rows)


CAPTIONS = Step("captions", run_captions, reads=("product_images", "synthetic_images", "generations"),
                writes=("captions", "quarantine"), roles=("captioner",),
                description="fine-grained captions of every image not captioned yet")
