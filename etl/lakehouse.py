"""The lakehouse: declared Delta tables under `<home>/lakehouse/<name>`, registered in a session.

Writes are keyed upserts, preceded by an anti-join that drops rows identical to what is stored,
so a re-run with nothing new commits nothing: rows whose key is new are appended, rows whose key
is stored are MERGEd. History and row counts that the
engine lacks come from delta-rs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from deltalake import DeltaTable
from pyspark.sql import DataFrame, SparkSession

from core.settings import Settings
from etl.engine import Engine, spark_session
from core.errors import UndeclaredRead
from core.tables import TABLES, Table, sql_list, sql_literal

# A checkpoint every 10 commits (Spark's and Sail's default; delta-rs' is 100): a read replays at
# most 10 JSON commits after the checkpoint, however long the table's history. Homes made before
# these properties (checkpoints off, 'delta.checkpointInterval'='1000000') get them from
# `recontext maintain`. Sail 0.7.2 cannot time travel to versions before the last checkpoint:
# `at_version` reads those through delta-rs' file list.
TABLE_PROPERTIES = {"delta.checkpointInterval": "10"}

# Every commit names its writer: appends in the commit's userMetadata, MERGE and DELETE (which
# Sail 0.7.2 commits without userMetadata) in a no-op term of their predicate, which the engine
# records. The runner counts as a step's writes only the commits that carry its own tag, so an
# on-demand request or another process writing the same table never counts as the step's.
WRITER_MARK = "recontext-writer="
_WRITER = re.compile(re.escape(WRITER_MARK) + r"([\w:.@/-]+)")


def commit_writer(commit: dict) -> str | None:
    """The writer tag a Delta commit (a delta-rs history entry) carries, if any."""
    parameters = commit.get("operationParameters") or {}
    found = _WRITER.search(" ".join(str(v) for v in (commit.get("userMetadata"), *parameters.values()) if v))
    return found.group(1) if found else None


@dataclass(frozen=True)
class TableStats:
    name: str
    rows: int
    version: int
    last_operation: str


class Lakehouse:
    def __init__(self, settings: Settings, spark: SparkSession | None = None):
        self.settings = settings
        self._spark = spark or spark_session(settings)
        self.engine = Engine.of(self._spark)
        self.engine.prepare(self._spark, settings.home)
        self.products: set[str] | None = None  # see limit_to
        # The tag its commits carry (WRITER_MARK): this process and this lakehouse in it.
        self.writer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._scope: _StepScope | None = None  # see step_scope
        settings.lakehouse.mkdir(parents=True, exist_ok=True)
        self.register_tables()

    @property
    def spark(self) -> SparkSession:
        """The session; inside step_scope, one whose queries may name only the step's tables."""
        return self._spark if self._scope is None else _CheckedSession(self._spark, self._scope)

    @contextlib.contextmanager
    def step_scope(self, step: str, reads, writes):
        """Run a step's code: its commits carry a writer tag of their own (yielded, for
        `commits_by`), and a query naming a table outside its reads and writes raises
        UndeclaredRead. The lakehouse's own writes (upsert) query their target unchecked: a
        write is checked by its commits."""
        tag = f"step:{step}:{uuid.uuid4().hex[:12]}"
        previous = self.writer, self._scope
        self.writer, self._scope = tag, _StepScope(step, frozenset(reads) | frozenset(writes))
        try:
            yield tag
        finally:
            self.writer, self._scope = previous

    def commits_by(self, name: str, since: int, tag: str) -> list[int]:
        """Versions of table `name` after `since` whose commit carries writer `tag`."""
        delta = DeltaTable(self.location(_declared(name).name))
        newer = delta.version() - since
        return [c["version"] for c in (delta.history(newer) if newer > 0 else []) if c["version"] > since
                and commit_writer(c) == tag]

    def limit_to(self, products: set[str]) -> None:
        """Make every stage of this session see only `products`: reference photos are the root of
        every image, so a temp view over `product_images` (it shadows the table in queries; only
        ingest writes the table, through its own path) scopes all image stages, and the driver
        loops (training, generation) read `self.products`."""
        self.products = set(products)
        listed = sql_list(sorted(self.products))
        self._spark.sql(f"CREATE OR REPLACE TEMP VIEW product_images AS SELECT * FROM "
                        f"delta.`{self.location('product_images')}` WHERE product_id IN ({listed})")

    @contextlib.contextmanager
    def unscoped(self):
        """Lift limit_to's view while writing `product_images` itself (ingest)."""
        if self.products is None:
            yield
            return
        self._spark.sql("DROP VIEW IF EXISTS product_images")
        try:
            yield
        finally:
            self.limit_to(self.products)

    @classmethod
    def open(cls, home=None, **overrides) -> "Lakehouse":
        return cls(Settings.load(home, **overrides))

    def location(self, name: str) -> str:
        return str(self.settings.lakehouse / name)

    def register_tables(self) -> None:
        """Create missing tables and register all of them in this session's catalog.

        The catalog of the embedded engine lives in memory, so this runs at every start.
        """
        properties = ", ".join(f"{sql_literal(k)}={sql_literal(v)}" for k, v in TABLE_PROPERTIES.items())
        for table in TABLES.values():
            location = self.location(table.name)
            if (Path(location) / "_delta_log").is_dir():
                _add_missing_columns(table, location)
                # Existing tables register from their own log: Sail 0.7.2 compares a declared
                # ARRAY column's element name with the stored one and refuses the match. (On Spark
                # this is the ordinary way to register an existing Delta table.)
                self._spark.sql(f"CREATE TABLE IF NOT EXISTS {table.name} USING delta LOCATION '{location}'")
                continue
            self.engine.forget_table(self._spark, table.name)
            partitioned = f"PARTITIONED BY ({', '.join(table.partition_by)})" if table.partition_by else ""
            self._spark.sql(
                f"CREATE TABLE IF NOT EXISTS {table.name} ({table.ddl_columns()}) USING delta "
                f"{partitioned} LOCATION '{location}' "
                f"COMMENT {sql_literal(table.comment)} TBLPROPERTIES ({properties})"
            )

    def table(self, name: str) -> DataFrame:
        return self.spark.table(_declared(name).name)

    def at_version(self, name: str, version: int) -> DataFrame:
        """Table `name` as of Delta `version` (time travel)."""
        table, location = _declared(name), self.location(name)
        if self._scope:
            self._scope.check({name})
        if self.engine.sail and version < _last_checkpoint(location):
            # Sail 0.7.2 fails time travel to most versions before the table's last checkpoint
            # ("Missing commit file: expected version 0"; at or after it, it works). delta-rs lists
            # that version's data files; tables here are unpartitioned, without deletion vectors
            # or column mapping (checked), so those files hold exactly the version's rows.
            snapshot = DeltaTable(location, version=version)
            features = set(snapshot.protocol().reader_features or ())
            if features & {"deletionVectors", "columnMapping"} or table.partition_by:
                raise NotImplementedError(f"{name} v{version}: time travel before the last checkpoint on the "
                                          f"embedded engine needs a plain table (has {sorted(features)})")
            schema = ", ".join(f"{c.name} {c.type}" for c in table.columns)
            files = snapshot.file_uris()
            return (self._spark.read.schema(schema).parquet(*files) if files
                    else self._spark.createDataFrame([], schema))
        return self._spark.read.format("delta").option("versionAsOf", version).load(location)

    def upsert(self, name: str, rows: DataFrame) -> int:
        """MERGE `rows` into table `name` on its key; returns how many rows were written.

        Rows equal to the stored row in every compared column are left out first, so an
        unchanged re-run writes no new table version. `rows` is read more than once: pass a staged
        or cheap DataFrame, not one that runs a model.
        """
        table = _declared(name)
        # The audit timestamps are stamped here, now, unless the rows carry them.
        stamped = [c for c in table.audit if c not in rows.columns]
        rows = rows.selectExpr("*", *(f"current_timestamp() AS {c}" for c in stamped)) if stamped else rows
        # Cast to the declared types: an untyped NULL literal cannot be written to Delta.
        source = _view(rows.selectExpr(*(f"CAST({c.name} AS {c.type}) AS {c.name}" for c in table.columns)))
        on_key = " AND ".join(f"t.{k} = s.{k}" for k in table.key)
        keys = f"(SELECT {', '.join(table.key)} FROM {table.name})"
        # Only a row whose key is stored can equal a stored row. Rows that are all new keys (a
        # stage's new images, the common case) are written without comparing: the comparison reads
        # every stored row's data (vectors, image bytes, masks), a cost that follows the table, not
        # the new work (bench/bench_growth.py); the key check reads the key columns alone.
        all_new = self._spark.sql(f"SELECT s.* FROM {source} s LEFT SEMI JOIN {keys} t ON {on_key}").isEmpty()
        if all_new:
            changed = self._spark.table(source)
        else:
            unchanged = " AND ".join(f"t.{c} <=> s.{c}" for c in table.compared) or "TRUE"
            changed = self._spark.sql(
                f"SELECT s.* FROM {source} s LEFT ANTI JOIN {table.name} t ON {on_key} AND {unchanged}")
        # Staging the changed rows decouples the writes from a source that reads its own target.
        with self.staged(changed) as staged:
            count = staged.count()
            if count:
                _refuse_duplicate_keys(table, staged)
                # One commit per upsert (a person's action in the console is one transaction). Rows
                # that are all new keys are appended: a MERGE reads (and the engine rewrites) every
                # target file, since random sha256 keys let no file be skipped, so its cost grows
                # with the table, not with the new rows (bench/bench_growth.py). Only a batch that
                # changes a stored key pays for a MERGE, which inserts its new keys too.
                staged_view = _view(staged)
                updates = (not all_new and not self._spark.sql(
                    f"SELECT s.* FROM {staged_view} s LEFT SEMI JOIN {keys} t ON {on_key}").isEmpty())
                if updates:
                    self._spark.sql(
                        f"MERGE INTO {table.name} t USING {staged_view} s ON {on_key} AND {self._mark()} "
                        "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *"
                    )
                else:
                    (staged.write.format("delta").mode("append").option("userMetadata", WRITER_MARK + self.writer)
                     .save(self.location(table.name)))
        return count

    def delete(self, name: str, where: str) -> None:
        """DELETE FROM table `name` WHERE `where` (a SQL condition), as this writer."""
        self._spark.sql(f"DELETE FROM {_declared(name).name} WHERE ({where}) AND {self._mark()}")

    def _mark(self) -> str:
        """A no-op predicate term naming the writer (WRITER_MARK)."""
        return f"{sql_literal(WRITER_MARK + self.writer)} IS NOT NULL"

    def upsert_rows(self, name: str, rows: pd.DataFrame) -> int:
        """upsert() a pandas frame holding `name`'s data columns (NaN becomes NULL)."""
        table = _declared(name)
        rows = rows[table.data_columns]
        frame = self._spark.createDataFrame(rows.astype(object).where(rows.notna(), None), table.data_schema())
        return self.upsert(name, frame)

    def quarantine(self, stage: str, rows: list[tuple], source: str | None = None) -> int:
        """Record rejected inputs: (product_id, source_uri, reason_code, reason) tuples."""
        if not rows:
            return 0
        unique = list({(r[0], r[1]): r for r in rows}.values())  # one row per key, as MERGE needs
        frame = pd.DataFrame(unique, columns=["product_id", "source_uri", "reason_code", "reason"])
        return self.upsert_rows("quarantine", frame.assign(stage=stage, source=source or stage))

    def staged(self, rows: DataFrame):
        """Materialize `rows` once (a context manager yielding the materialized DataFrame).

        Used where a DataFrame that runs a model or reads files must feed several writes.
        """
        return self.engine.staged(self._spark, rows, self.settings.lakehouse / "_staging")

    def history(self, name: str, limit: int | None = None) -> list[dict]:
        """Delta commits, newest first (the engine lacks DESCRIBE HISTORY)."""
        return DeltaTable(self.location(_declared(name).name)).history(limit)

    def optimize(self, name: str) -> dict:
        """Rewrite small files into larger ones (OPTIMIZE: delta-rs on the embedded engine, the
        engine's own on Spark); rows are unchanged. Tables
        with a `product_id` are also clustered by it (Z-order), so a product's rows sit in few
        files and per-product reads skip the others, whatever the ids look like. Returns the
        numbers of files removed and added."""
        table, location = _declared(name), self.location(name)
        clustered = "product_id" in table.column_names
        delta = DeltaTable(location)
        if len(delta.file_uris()) < 2:  # one file is compact and clustered already; no engine job
            return {"numFilesRemoved": 0, "numFilesAdded": 0}
        if not self.engine.sail:  # Spark and Databricks: their own OPTIMIZE (Z-order by Delta's curve)
            metrics = self._spark.sql(f"OPTIMIZE delta.`{location}`"
                                     + (" ZORDER BY (product_id)" if clustered else "")).collect()[0]["metrics"]
            return {"numFilesRemoved": metrics["numFilesRemoved"], "numFilesAdded": metrics["numFilesAdded"]}
        return delta.optimize.z_order(["product_id"]) if clustered else delta.optimize.compact()

    def checkpoint(self, name: str) -> dict[str, str]:
        """Bring a table's log up to date: the table properties of TABLE_PROPERTIES (an older home's
        tables never checkpoint), a checkpoint at the current version, and expired log files
        (older than the table's delta.logRetentionDuration, 30 days by default, and before the
        checkpoint) deleted. Returns the properties that were changed."""
        delta = DeltaTable(self.location(_declared(name).name))
        stored = delta.metadata().configuration
        changed = {k: v for k, v in TABLE_PROPERTIES.items() if stored.get(k) != v}
        if changed:
            delta.alter.set_table_properties(changed)
        delta.create_checkpoint()
        delta.cleanup_metadata()
        return changed

    def vacuum(self, name: str, retention_hours: int = 168) -> list[str]:
        """Delete files no longer referenced by versions newer than the retention."""
        return DeltaTable(self.location(_declared(name).name)).vacuum(
            retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False)

    def key_violations(self, name: str, limit: int = 5) -> list[dict]:
        """Key values that more than one row of table `name` holds (at most `limit`), with counts."""
        if not DeltaTable(self.location(name)).file_uris():  # an empty table: no engine job
            return []
        key = ", ".join(_declared(name).key)
        return [r.asDict() for r in self._spark.sql(
            f"SELECT {key}, count(*) AS rows FROM {name} GROUP BY {key} HAVING count(*) > 1 "
            f"ORDER BY {key} LIMIT {int(limit)}").collect()]

    def stats(self) -> list[TableStats]:
        out = []
        for name in TABLES:
            delta = DeltaTable(self.location(name))
            last = self.history(name, 1)[0].get("operation", "")
            rows = self._spark.sql(f"SELECT count(*) AS n FROM {name}").collect()[0]["n"]
            out.append(TableStats(name, rows, delta.version(), last))
        return out


DELTA_TYPES = {"STRING": "string", "DOUBLE": "double", "FLOAT": "float", "INT": "integer", "BIGINT": "long",
               "BOOLEAN": "boolean", "BINARY": "binary", "TIMESTAMP": "timestamp"}


def _delta_type(sql_type: str):
    from deltalake.schema import ArrayType, PrimitiveType

    if sql_type.startswith("ARRAY<"):
        return ArrayType(_delta_type(sql_type[len("ARRAY<"):-1]), contains_null=True)
    return PrimitiveType(DELTA_TYPES[sql_type])


def _last_checkpoint(location: str) -> int:
    """Version of the table's last checkpoint (-1: none), from `_delta_log/_last_checkpoint`."""
    marker = Path(location) / "_delta_log" / "_last_checkpoint"
    return json.loads(marker.read_text())["version"] if marker.exists() else -1


def _add_missing_columns(table: Table, location: str) -> None:
    """A home made by an older version lacks columns declared since: add them, nullable, with
    delta-rs (the embedded engine cannot ALTER TABLE ADD COLUMNS). Rows keep their values; the
    new columns read NULL until a job writes them (rows missing a model fingerprint are
    recomputed by the next run, as they should be). MERGE matches columns by name, so the new
    columns' place at the end of the stored schema does not matter."""
    from deltalake.schema import Field

    delta = DeltaTable(location)
    stored = {f.name for f in delta.schema().fields}
    missing = [c for c in table.columns if c.name not in stored]
    if missing:
        delta.alter.add_columns([Field(c.name, _delta_type(c.type), nullable=True) for c in missing])


class DuplicateKeyError(ValueError):
    """A batch holds two rows for one declared key: MERGE would insert both."""


def _refuse_duplicate_keys(table: Table, rows: DataFrame) -> None:
    key = ", ".join(table.key)
    found = rows.groupBy(*table.key).count().where("count > 1").limit(3).collect()
    if found:
        examples = "; ".join(", ".join(f"{k}={r[k]}" for k in table.key) + f" ({r['count']} rows)" for r in found)
        raise DuplicateKeyError(f"refusing to write {table.name}: rows share its key ({key}): {examples}. "
                                "A job must produce one row per key; this is a bug in the job that wrote it")


# A table a query reads or writes: the name after FROM, JOIN, INTO, UPDATE or TABLE (quoted
# text and `delta.`path`` reads left out). The pipeline's queries join with JOIN, not commas.
_RELATION = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+([A-Za-z_]\w*)", re.IGNORECASE)
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|`[^`]*`")


def tables_named(query: str) -> set[str]:
    """The declared tables a SQL statement reads or writes."""
    return {name for name in _RELATION.findall(_QUOTED.sub("''", query)) if name in TABLES}


@dataclass(frozen=True)
class _StepScope:
    step: str
    allowed: frozenset

    def check(self, names) -> None:
        undeclared = sorted(set(names) - self.allowed)
        if undeclared:
            raise UndeclaredRead(f"step {self.step!r} read table(s) {', '.join(undeclared)} that its declaration "
                                 "lists in neither `reads` nor `writes`; declare them where the step is defined")


class _CheckedSession:
    """A step's view of the session: `sql` and `table` check the tables they name."""

    def __init__(self, spark: SparkSession, scope: _StepScope):
        self._spark, self._scope = spark, scope

    def sql(self, query: str, *args, **kwargs) -> DataFrame:
        self._scope.check(tables_named(query))
        return self._spark.sql(query, *args, **kwargs)

    def table(self, name: str) -> DataFrame:
        self._scope.check({name} & set(TABLES))
        return self._spark.table(name)

    def __getattr__(self, name):
        return getattr(self._spark, name)


def _declared(name: str) -> Table:
    if name not in TABLES:
        raise KeyError(f"unknown table '{name}'; declared tables: {', '.join(TABLES)}")
    return TABLES[name]


def _view(df: DataFrame) -> str:
    name = f"_v_{uuid.uuid4().hex[:12]}"
    df.createOrReplaceTempView(name)
    return name
