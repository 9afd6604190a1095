"""Ingest job: a catalog source -> `products`, `product_images`, `quarantine`.

The driver lists the source (metadata only); a mapInPandas UDF reads, validates and normalizes
each image where the data lives, so the same job scales out on a cluster. A bad file becomes a
quarantine row with its reason; the good files of the same product are kept.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.settings import IngestSettings
from etl.lakehouse import Lakehouse
from etl.sources import Listing, list_source
from etl.step import CATALOG_FILES, Step
from core.tables import TABLES

log = logging.getLogger(__name__)

STAGE = "ingest"
DECODED_COLUMNS = {
    "product_id": "string", "source_uri": "string", "image_id": "string", "image": "binary",
    "format": "string", "width": "int", "height": "int", "has_alpha": "boolean",
    "original_format": "string", "normalization": "string", "reason_code": "string", "reason": "string",
}


@dataclass(frozen=True)
class IngestSummary:
    source: str
    products: int  # products listed in the source
    images_ok: int  # image files that decoded (before de-duplication)
    rejected: int  # quarantine rows from this run (files and listing problems)
    rows_written: dict[str, int]  # per table: rows new or changed by this run


def ingest(lake: Lakehouse, source: str | Path | Listing, fmt: str | None = None,
           products: set[str] | None = None) -> IngestSummary:
    """Ingest `source` (only `products`, when given); a Listing is one list_source made already."""
    listing = source if isinstance(source, Listing) else list_source(source, fmt)
    if products is not None:
        listing.products = {p: v for p, v in listing.products.items() if p in products}
        listing.images = [i for i in listing.images if i.product_id in products]
        listing.rejected = [r for r in listing.rejected if r.product_id in products]
    spark = lake.spark
    written = {"products": lake.upsert("products", _products_frame(lake, listing))}

    refs = pd.DataFrame(
        [(r.product_id, r.source_uri) for r in dict.fromkeys(listing.images)],
        columns=["product_id", "source_uri"],
    )
    decoded = spark.createDataFrame(refs, "product_id string, source_uri string").mapInPandas(
        decode_batches(lake.settings.ingest), ", ".join(f"{k} {v}" for k, v in DECODED_COLUMNS.items())
    )
    with lake.staged(decoded) as staged:
        staged.createOrReplaceTempView("_ingest_decoded")
        # The same picture twice under one product is stored once (first file name wins).
        images = spark.sql(
            """
            SELECT *, 'reference' AS role FROM (
              SELECT *, row_number() OVER (PARTITION BY product_id, image_id ORDER BY source_uri) AS n
              FROM _ingest_decoded WHERE reason_code IS NULL) WHERE n = 1
            """
        )
        written["product_images"] = lake.upsert("product_images", images)
        counts = {r["ok"]: r["n"] for r in spark.sql(
            "SELECT reason_code IS NULL AS ok, count(*) AS n FROM _ingest_decoded GROUP BY 1").collect()}
        file_rejects = [tuple(r) for r in staged.where("reason_code IS NOT NULL").select(
            "product_id", "source_uri", "reason_code", "reason").collect()]
    written["quarantine"] = lake.quarantine(
        STAGE, file_rejects + [(r.product_id, r.source_uri, r.reason_code, r.reason) for r in listing.rejected],
        source=listing.source)

    summary = IngestSummary(
        source=listing.source,
        products=len(listing.products),
        images_ok=counts.get(True, 0),
        rejected=counts.get(False, 0) + len(listing.rejected),
        rows_written=written,
    )
    log.info("ingest %s: %s", listing.source, summary)
    return summary


def _products_frame(lake: Lakehouse, listing: Listing):
    rows = pd.DataFrame(
        [
            (p.product_id, p.title or p.product_id, p.product_type,
             json.dumps(p.attributes, sort_keys=True, ensure_ascii=False, default=str), listing.source)
            for p in listing.products.values()
        ],
        columns=TABLES["products"].data_columns,
    )
    return lake.spark.createDataFrame(rows, TABLES["products"].data_schema())


def decode_batches(limits: IngestSettings):
    """The mapInPandas function: (product_id, source_uri) batches -> decoded rows."""

    def run(batches):
        for batch in batches:
            rows = [decode_file(pid, uri, limits) for pid, uri in zip(batch["product_id"], batch["source_uri"])]
            yield pd.DataFrame(rows, columns=list(DECODED_COLUMNS)).astype(
                {"width": "Int32", "height": "Int32", "has_alpha": "boolean"})

    return run


def decode_file(product_id: str, source_uri: str, limits: IngestSettings) -> tuple:
    """One row of DECODED_COLUMNS; never raises, so one bad file cannot fail the task."""
    from etl.images import RejectedImage, normalize_image

    failed = (product_id, source_uri) + (None,) * 8
    try:
        image = normalize_image(read_bytes(source_uri, limits.max_file_bytes), limits)
    except RejectedImage as err:
        return failed + (err.code, err.reason)
    except FileNotFoundError:
        return failed + ("missing_file", "the file does not exist; fix the path or add the file")
    except OSError as err:
        return failed + ("unreadable", f"the file cannot be read ({err}); check its permissions")
    except Exception as err:  # noqa: BLE001 - recorded, never fatal
        log.exception("unexpected error decoding %s", source_uri)
        return failed + ("internal_error", f"unexpected {type(err).__name__}: {err}; please report it")
    return (product_id, source_uri, image.image_id, image.data, image.format, image.width, image.height,
            image.has_alpha, image.original_format, image.normalization, None, None)


def read_bytes(uri: str, max_bytes: int) -> bytes:
    """Read a local path or a filesystem URI (s3://, gs://, abfss://, ...) through pyarrow."""
    if "://" in uri and not uri.startswith("file://"):
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(path) as stream:
            return stream.read(max_bytes + 1)
    path = Path(uri.removeprefix("file://"))
    with path.open("rb") as fh:
        return fh.read(max_bytes + 1)  # one byte over the limit is enough to reject it


def run_ingest(lake: Lakehouse, zoo=None) -> dict[str, int]:
    """Every configured source (ingest.sources), limited to lake.products when set."""
    written: dict[str, int] = {}
    with lake.unscoped():
        for source in lake.settings.ingest.sources:
            for table, n in ingest(lake, source, products=lake.products).rows_written.items():
                written[table] = written.get(table, 0) + n
    return written


INGEST = Step("ingest", run_ingest, reads=(CATALOG_FILES,), writes=("products", "product_images", "quarantine"),
              description="catalog sources (ingest.sources) -> normalized, deduplicated product photos")
