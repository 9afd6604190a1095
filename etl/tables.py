"""Every Delta table of the lakehouse, declared once: name, columns, key, partitioning, comment.

Nothing else in the project spells a schema: jobs select `TABLES[name].column_names` and the
lakehouse creates, registers and merges from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # Spark SQL type
    comment: str


@dataclass(frozen=True)
class Table:
    name: str
    comment: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # MERGE keys: a re-run updates rows with these keys instead of adding
    partition_by: tuple[str, ...] = ()
    # Columns that record when a row was written; a change in them alone is not a change.
    audit: tuple[str, ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def compared(self) -> list[str]:
        """Columns whose change makes a re-run update a row."""
        return [c for c in self.column_names if c not in self.key and c not in self.audit]

    def ddl_columns(self) -> str:
        # All columns nullable: Sail drops appended columns after NOT NULL ones (NOTES.md 1).
        return ", ".join(f"{c.name} {c.type} COMMENT '{_sql_quote(c.comment)}'" for c in self.columns)

    def spark_schema(self) -> str:
        return ", ".join(f"{c.name} {c.type}" for c in self.columns)


def _sql_quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _table(name, comment, columns, key, **kw) -> Table:
    return Table(name, comment, tuple(Column(*c) for c in columns), tuple(key), **kw)


TABLES: dict[str, Table] = {
    t.name: t
    for t in [
        _table(
            "products",
            "One row per catalog product.",
            [
                ("product_id", "STRING", "catalog id; safe to use in paths"),
                ("title", "STRING", "product title (English when the source has several)"),
                ("product_type", "STRING", "product type or class noun; NULL until classified"),
                ("attributes", "STRING", "free attributes as a JSON object"),
                ("source", "STRING", "where the product came from: format and location"),
                ("ingested_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["product_id"],
            audit=("ingested_at",),
        ),
        _table(
            "product_images",
            "Reference photos of each product, normalized and deduplicated.",
            [
                ("image_id", "STRING", "sha256 of the normalized pixels (mode, size, bytes)"),
                ("product_id", "STRING", "products.product_id"),
                ("role", "STRING", "'reference' for catalog photos"),
                ("image", "BINARY", "encoded image: the original bytes when kept as-is, else PNG"),
                ("format", "STRING", "encoding of `image`: JPEG, PNG or WEBP"),
                ("width", "INT", "pixels, after orientation and downscaling"),
                ("height", "INT", "pixels, after orientation and downscaling"),
                ("has_alpha", "BOOLEAN", "image is RGBA with a real alpha channel (a mask hint)"),
                ("original_format", "STRING", "format of the source file"),
                ("normalization", "STRING", "what was changed, comma separated; '' when kept as-is"),
                ("source_uri", "STRING", "the file it was read from"),
                ("ingested_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["image_id", "product_id"],
            audit=("ingested_at",),
        ),
        _table(
            "quarantine",
            "Inputs that could not be used, with a reason a person can act on.",
            [
                ("stage", "STRING", "pipeline stage that rejected the input"),
                ("product_id", "STRING", "product it belongs to, as given by the source"),
                ("source_uri", "STRING", "file, manifest line or record that was rejected"),
                ("reason_code", "STRING", "short category, e.g. truncated, too_small"),
                ("reason", "STRING", "what is wrong and what to do about it"),
                ("source", "STRING", "the source being processed"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["stage", "product_id", "source_uri"],
            audit=("created_at",),
        ),
    ]
}
