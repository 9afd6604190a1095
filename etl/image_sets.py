"""The images every model stage processes: reference photos plus synthetic images.

Masks, captions, embeddings and metrics read these two functions, so every kind of image
(reference, novel view, outpaint, negative, counterfactual, generated) is covered by the
same code.
"""

from __future__ import annotations

from pyspark.sql import DataFrame

from etl.lakehouse import Lakehouse

_UNION = """
    SELECT image_id, product_id, role AS kind, NULL AS parent_image_id, NULL AS prompt, image, has_alpha
    FROM product_images
    UNION ALL
    SELECT image_id, product_id, kind, parent_image_id, prompt, image, false AS has_alpha
    FROM synthetic_images
    UNION ALL
    SELECT image_id, product_id, 'generated' AS kind, NULL AS parent_image_id, prompt, image, false AS has_alpha
    FROM generations
"""


def all_images(lake: Lakehouse) -> DataFrame:
    """image_id, product_id, kind, image, has_alpha; an image shared by products appears once."""
    return lake.spark.sql(
        f"""
        SELECT image_id, product_id, kind, image, has_alpha FROM (
          SELECT *, row_number() OVER (PARTITION BY image_id ORDER BY product_id) AS n FROM ({_UNION}))
        WHERE n = 1
        """
    )


def scored_images(lake: Lakehouse) -> DataFrame:
    """image_id, product_id, kind, is_reference, parent_image_id, prompt: every scored pair."""
    return lake.spark.sql(
        f"""
        SELECT DISTINCT image_id, product_id, kind, kind = 'reference' AS is_reference, parent_image_id, prompt
        FROM ({_UNION})
        """
    )
