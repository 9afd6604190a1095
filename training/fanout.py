"""Per-product GPU work as Spark tasks: one row per product (its inputs packed into the row), a
round-robin repartition to `training.parallel_products` partitions, and a `mapInPandas` whose
function does one product per row and yields its result rows.

Round-robin (`repartition(n)`) spreads the products evenly over the tasks on Spark and on the
embedded engine alike (the embedded engine ignores hash and range repartitions; its tasks are
threads of the one server process, one GIL: torch releases it inside ops, Python code does not).
One Arrow batch per product row keeps a task's memory at one product's images.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession

from core.settings import Settings
from udfs.device import visible_gpus

BATCH_ROWS = "spark.sql.execution.arrow.maxRecordsPerBatch"


def parallelism(settings: Settings) -> int:
    """training.parallel_products, else one task per GPU this process sees (1 without GPUs)."""
    return settings.training.parallel_products or max(1, visible_gpus())


def with_slots(specs: pd.DataFrame) -> pd.DataFrame:
    """Number the products 0..n-1 in order: a task's slot picks its GPU when the engine assigns none."""
    return specs.reset_index(drop=True).assign(slot=lambda f: f.index.astype("int64"))


def fan_out(spark: SparkSession, rows: DataFrame, parallel: int,
            per_row: Callable[[object, dict], dict | list[dict]], schema: str) -> pd.DataFrame:
    """Run `per_row(row, state)` for every row of `rows` in `parallel` Spark tasks and return
    the result rows (`schema`: flat columns; a column a result leaves out is NULL). `state` is a
    dict per task, for what its products share (a loaded pipeline)."""
    columns = [part.split()[0] for part in schema.split(",")]

    def task(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        state: dict = {}
        for batch in batches:
            for row in batch.itertuples(index=False):
                result = per_row(row, state)
                yield pd.DataFrame(result if isinstance(result, list) else [result], columns=columns)

    with _one_row_per_batch(spark):
        return rows.repartition(parallel).mapInPandas(task, schema).toPandas()


@contextlib.contextmanager
def _one_row_per_batch(spark: SparkSession):
    before = spark.conf.get(BATCH_ROWS)
    spark.conf.set(BATCH_ROWS, "1")
    try:
        yield
    finally:
        spark.conf.set(BATCH_ROWS, before)
