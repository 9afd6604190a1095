"""The images every model stage processes: one row per image_id with its bytes and product.

Reference photos today; later stages add their synthetic and generated images here, and masks,
captions, embeddings and metrics then cover them with the same code.
"""

from __future__ import annotations

from pyspark.sql import DataFrame

from etl.lakehouse import Lakehouse


def all_images(lake: Lakehouse) -> DataFrame:
    """image_id, product_id, kind, image, has_alpha; an image shared by products appears once."""
    return lake.spark.sql(
        """
        SELECT image_id, product_id, role AS kind, image, has_alpha FROM (
          SELECT *, row_number() OVER (PARTITION BY image_id ORDER BY product_id) AS n
          FROM product_images) WHERE n = 1
        """
    )


def scored_images(lake: Lakehouse) -> DataFrame:
    """image_id, product_id, kind, is_reference: every (image, product) pair that gets metrics."""
    return lake.spark.sql(
        "SELECT DISTINCT image_id, product_id, role AS kind, role = 'reference' AS is_reference FROM product_images"
    )
