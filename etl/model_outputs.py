"""Writing what a model UDF produced: good rows to their table, failures to quarantine."""

from __future__ import annotations

from pyspark.sql import DataFrame

from etl.lakehouse import Lakehouse
from core.tables import TABLES


def write_model_outputs(lake: Lakehouse, stage: str, table: str, pending: DataFrame,
                        rows: DataFrame) -> dict[str, int]:
    """Write `rows`, the UDF's output over `pending` (the inputs not processed yet).

    `rows` holds the table's columns plus `product_id` and `error` (NULL when it worked). The UDF
    runs once: its output is staged, then both writes read the staged copy. With nothing
    pending, nothing runs (not even a model load).
    """
    if pending.isEmpty():
        return {table: 0, "quarantine": 0}
    with lake.staged(rows) as staged:
        written = lake.upsert(table, staged.where("error IS NULL").select(*TABLES[table].data_columns))
        failures = staged.where("error IS NOT NULL").selectExpr(
            f"'{stage}' AS stage", "product_id", "concat('image:', image_id) AS source_uri",
            "'model_error' AS reason_code",
            "concat('the model could not process this image (', error, '); check the image or the model')"
            " AS reason",
            f"'{stage}' AS source")
        quarantined = lake.upsert("quarantine", failures)
    return {table: written, "quarantine": quarantined}
