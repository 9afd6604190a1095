"""The images every model stage processes: reference photos plus synthetic images.

Masks, captions, embeddings and metrics read these two functions, so every kind of image
(reference, novel view, outpaint, negative, counterfactual, generated) is covered by the
same code.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import Window
from pyspark.sql import functions as F

from etl.lakehouse import Lakehouse
from core.tables import sql_list
from core.vocabulary import AUGMENTED_NEGATIVES, AUGMENTED_POSITIVES, GENERATED, REFERENCE

PRODUCT_FILTER = 10_000  # pending products up to which image bytes are read by product
KIND_ORDER = (REFERENCE, *AUGMENTED_POSITIVES, *AUGMENTED_NEGATIVES, GENERATED)

_UNION = f"""
    SELECT image_id, product_id, role AS kind, NULL AS parent_image_id, NULL AS prompt, image, has_alpha
    FROM product_images
    UNION ALL
    SELECT image_id, product_id, kind, parent_image_id, prompt, image, false AS has_alpha
    FROM synthetic_images
    UNION ALL
    SELECT image_id, product_id, '{GENERATED}' AS kind, NULL AS parent_image_id, prompt, image, false AS has_alpha
    FROM generations
"""


# The bytes of every stored image by id (an image shared by products, or stored as a reference
# and as a synthetic image, appears once): augmentation parents and training examples read it.
IMAGE_BYTES = """
    SELECT image_id, first(image) AS image FROM (
        SELECT image_id, image FROM product_images UNION ALL SELECT image_id, image FROM synthetic_images)
    GROUP BY image_id
"""


def image_keys(lake: Lakehouse, done: DataFrame | None = None) -> DataFrame:
    """image_id, product_id, kind, has_alpha of every stored image, once (an image shared by
    products under its first product), `done` (an image_id column) left out: key columns only,
    no image bytes are read."""
    keys = lake.spark.sql(f"SELECT image_id, product_id, kind, has_alpha FROM ({_UNION})")
    if done is not None:  # before ranking: the window sorts the pending rows only
        keys = keys.join(done, "image_id", "left_anti")
    first = Window.partitionBy("image_id").orderBy("product_id")
    return keys.withColumn("n", F.row_number().over(first)).where("n = 1").drop("n")


def with_image_bytes(lake: Lakehouse, keys: DataFrame) -> DataFrame:
    """`keys` (rows with image_id and product_id, one per image) with each image's bytes as
    `image`. Only the bytes of these images are read: the cost follows new work, not the size of
    the tables (ranking and anti-joining rows that carry every stored image's bytes was most of a
    100k-image home's incremental cost: bench/bench_growth.py)."""
    # The images' products, as literals the scan can skip files by (Delta keeps each file's
    # product_id range: files of other products are not read); a first run's long list is not
    # worth it.
    products = [r["product_id"] for r in keys.select("product_id").distinct().limit(PRODUCT_FILTER + 1).collect()]
    where = f"WHERE product_id IN ({sql_list(products)})" if 0 < len(products) <= PRODUCT_FILTER else ""
    images = (lake.spark.sql(f"SELECT image_id, image FROM ({_UNION}) {where}")
              .join(keys.select("image_id"), "image_id", "left_semi")
              .groupBy("image_id").agg(F.first("image").alias("image")))
    return keys.join(images, "image_id")


def all_images(lake: Lakehouse, done: DataFrame | None = None) -> DataFrame:
    """image_id, product_id, kind, image, has_alpha of every stored image but `done`'s (an
    image_id column); an image shared by products appears once."""
    return with_image_bytes(lake, image_keys(lake, done)).select("image_id", "product_id", "kind", "image", "has_alpha")


def scored_images(lake: Lakehouse) -> DataFrame:
    """image_id, product_id, kind, is_reference, parent_image_id, prompt: one row per scored
    (image, product) pair. The same pixels can come from two lineages (a counterfactual that came
    out as its parent, two frames alike): the first by kind wins (reference, positives, negatives,
    generated; then parent and prompt), and the training-set filter excludes such twins."""
    order = " ".join(f"WHEN '{kind}' THEN {n}" for n, kind in enumerate(KIND_ORDER))
    return lake.spark.sql(
        f"""
        SELECT image_id, product_id, kind, kind = '{REFERENCE}' AS is_reference, parent_image_id, prompt FROM (
          SELECT *, row_number() OVER (PARTITION BY image_id, product_id
                                       ORDER BY CASE kind {order} ELSE {len(KIND_ORDER)} END,
                                                parent_image_id NULLS FIRST, prompt NULLS FIRST) AS n
          FROM (SELECT DISTINCT image_id, product_id, kind, parent_image_id, prompt FROM ({_UNION})))
        WHERE n = 1
        """
    )
