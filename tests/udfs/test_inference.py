"""The pandas UDFs through Spark: bad rows inside a batch give nulls plus an error, the rest of
the batch is scored."""

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from sample_images import encode, product_shot
from udfs.imaging import encode_mask
from udfs.inference import caption_udf, image_embedding_udf, mask_udf, text_embedding_udf
from udfs.zoo import ModelZoo


@pytest.fixture
def zoo(lake):
    zoo = ModelZoo.from_settings(lake.settings)
    zoo.check("clip", "dino", "captioner", "u2netp")
    return zoo


@pytest.fixture
def batch(lake):
    good = encode(product_shot(120, 90, seed=1), "PNG")
    other = encode(product_shot(90, 120, seed=2), "JPEG")
    full_mask = encode_mask(np.ones((90, 120), dtype=bool))
    empty_mask = encode_mask(np.zeros((90, 120), dtype=bool))
    rows = pd.DataFrame({
        "id": [0, 1, 2, 3, 4],
        "image": [good, b"not an image", None, other, good],
        "mask": [None, None, None, None, empty_mask],
        "seg_mask": [full_mask, None, None, None, empty_mask],
    })
    return lake.spark.createDataFrame(rows, "id int, image binary, mask binary, seg_mask binary")


def test_embeddings_isolate_bad_rows(zoo, batch):
    out = batch.select(
        "id",
        image_embedding_udf(zoo, "clip", "full")("image", F.lit(None).cast("binary")).alias("clip"),
        image_embedding_udf(zoo, "dino", "segmented")("image", "seg_mask").alias("seg_dino"),
    ).orderBy("id").toPandas()
    clip = out["clip"]
    assert [r["error"] is None for r in clip] == [True, False, False, True, True]
    assert len(clip[0]["vector"]) == 32 and np.isclose(np.linalg.norm(clip[0]["vector"]), 1.0, atol=1e-5)
    assert "cannot identify image" in clip[1]["error"] and "no image bytes" in clip[2]["error"]
    np.testing.assert_allclose(clip[0]["vector"], clip[4]["vector"], atol=1e-6)  # same image, same vector
    seg = out["seg_dino"]
    assert seg[0]["error"] is None and "mask is empty" in seg[4]["error"]


def test_masks_and_captions_isolate_bad_rows(zoo, batch):
    out = batch.select("id", mask_udf(zoo, "u2netp")("image").alias("m"),
                       caption_udf(zoo, "a photo of")("image").alias("c")).orderBy("id").toPandas()
    masks, captions = out["m"], out["c"]
    assert [m["error"] is None for m in masks] == [True, False, False, True, True]
    assert [c["error"] is None for c in captions] == [True, False, False, True, True]
    good = masks[0]
    assert 0 < good["area_fraction"] <= 1 and len(good["bbox"]) == 4 and good["mask"].startswith(b"\x89PNG")
    assert masks[1]["mask"] is None and captions[1]["caption"] is None
    assert captions[0]["caption"].startswith("a photo of")


def test_text_embeddings(zoo, lake):
    texts = lake.spark.createDataFrame(pd.DataFrame({"t": ["a red cup", "", None, "a red cup"]}), "t string")
    out = texts.select(text_embedding_udf(zoo)("t").alias("e")).toPandas()["e"]
    assert [r["error"] is None for r in out] == [True, False, False, True]
    np.testing.assert_allclose(out[0]["vector"], out[3]["vector"])
