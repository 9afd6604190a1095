"""The Spark session: embedded Sail by default, any Spark Connect endpoint on request.

Pipeline code only uses the Spark Connect DataFrame API and SQL (no sparkContext, no RDDs), so
the same code runs on the embedded engine, on a Spark 4 Connect server with delta-spark, and on
Databricks. Where Sail and Spark need different code, the difference lives here, in `Engine`,
with the engine and version it is for.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession

from core.settings import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_embedded_server = None
_sessions: list[tuple[str, SparkSession]] = []  # (Spark Connect URL, session) made by this process


def embedded_url() -> str:
    """Start (once per process) a Sail Spark Connect server on a free loopback port."""
    global _embedded_server
    with _lock:
        if _embedded_server is None:
            os.environ.setdefault("RUST_LOG", "error")  # Sail logs sessions and shutdown otherwise
            # Sail stops a session that has been idle for a few minutes ("session ... is not
            # running"): a notebook left open, or a long test elsewhere in the process, then fails
            # on its next query. The embedded server's sessions live as long as the process.
            os.environ.setdefault("SAIL_SPARK__SESSION_TIMEOUT_SECS", str(7 * 24 * 3600))
            from pysail.spark import SparkConnectServer

            server = SparkConnectServer("127.0.0.1", 0)
            server.start(background=True)
            _embedded_server = server
            atexit.register(_shutdown)
        host, port = _embedded_server.listening_address
        return f"sc://{host}:{port}"


def _shutdown() -> None:
    # Close client sessions first: a client left open retries against a stopped server.
    stop_sessions()
    if _embedded_server is not None:
        _embedded_server.stop()


def stop_sessions(url: str | None = None) -> None:
    """Stop this process's sessions (on the server `url`, else all). Before a Spark Connect server
    stops: pyspark's own exit handler would otherwise call each open session's server, retrying
    for minutes against one that is gone."""
    for entry in [e for e in _sessions if url is None or e[0] == url]:
        _sessions.remove(entry)
        try:
            entry[1].stop()
        except Exception:  # noqa: BLE001 - best effort: the server may be gone already
            pass


def spark_session(settings: Settings) -> SparkSession:
    """A Spark session for this settings' engine.

    - On Databricks the ambient session is used.
    - With `spark_remote` (or SPARK_REMOTE) set, a new session on that Spark Connect endpoint.
    - Otherwise a new session on the embedded Sail server. Sail keeps one catalog per session,
      so two lakehouse homes in one process never collide.
    """
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        spark = SparkSession.builder.getOrCreate()
    else:
        # A new session per lakehouse: getOrCreate would hand back a session registered for
        # another home (pyspark remembers the first one).
        url = settings.spark_remote or embedded_url()
        spark = SparkSession.builder.remote(url).create()
        _sessions.append((url, spark))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(settings.arrow_batch_rows))
    return spark


@dataclass(frozen=True)
class Engine:
    """The engine behind a session, told once from the server's `version()`, and every piece of
    code that differs between Sail and Apache Spark."""

    name: str  # "sail" or "spark" (Apache Spark, Databricks)
    version: str

    @classmethod
    def of(cls, spark: SparkSession) -> "Engine":
        # Spark answers "4.2.0 <git revision>"; Sail answers its own version alone ("0.7.2").
        answer = spark.sql("SELECT version() AS v").collect()[0]["v"]
        return cls("spark" if " " in answer.strip() else "sail", answer.split()[0])

    @property
    def sail(self) -> bool:
        return self.name == "sail"

    def prepare(self, spark: SparkSession, home: Path) -> None:
        """Session settings this engine needs before the lakehouse registers its tables."""
        if self.sail:
            # Sail 0.7.2: Delta stores timestamps in UTC and Sail compares the session zone by
            # name, so a session on a machine whose zone is "Etc/UTC" would refuse to re-register
            # its own tables. (Spark converts zones by offset: it keeps the server's zone.)
            spark.conf.set("spark.sql.session.timeZone", "UTC")
        else:
            # Spark shares one catalog among all sessions of a server (Sail 0.7.2 keeps one per
            # session): each home registers its tables in a database of its own, so two homes on
            # one server never resolve `products` to each other's table.
            database = "recontext_" + hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]
            spark.sql(f"CREATE DATABASE IF NOT EXISTS {database}")
            spark.sql(f"USE {database}")

    def parse_error(self, err: Exception) -> str | None:
        """The engine's own text of a SQL syntax error (with its position), or None when `err` is
        another error. Spark raises ParseException ("... (line 1, pos 0)"); Sail 0.7.2 an
        IllegalArgumentException "invalid argument: found SELEC at 0:5 expected ..." (character
        offsets, start:end; none at the end of the input)."""
        from pyspark.errors import ParseException

        text = str(err).strip()
        if isinstance(err, ParseException):
            return text.splitlines()[0] if text else type(err).__name__
        if self.sail and (found := re.match(r"invalid argument: (found .* expected .*)", text)):
            return found.group(1)
        return None

    def forget_table(self, spark: SparkSession, name: str) -> None:
        """Before creating table `name` at a location that holds no table yet: a Spark server
        outlives homes, so its catalog may still list a table of a deleted home at that path.
        (Sail's catalog lives and dies with the session.) An external table's files stay."""
        if not self.sail:
            spark.sql(f"DROP TABLE IF EXISTS {name}")

    @contextlib.contextmanager
    def staged(self, spark: SparkSession, rows: DataFrame, scratch: Path):
        """`rows` computed once, for several reads (a model or a file read runs once)."""
        if self.sail:
            # Sail 0.7.2 has no cache or checkpoint: write the rows to a scratch Delta folder.
            path = scratch / uuid.uuid4().hex
            try:
                rows.write.format("delta").mode("overwrite").save(str(path))
                yield spark.read.format("delta").load(str(path))
            finally:
                shutil.rmtree(path, ignore_errors=True)
        else:
            checkpointed = rows.localCheckpoint(eager=True)
            # pyspark 4.2's Connect client binds a checkpoint to SparkSession.active() (the thread's
            # first session: pyspark/sql/connect/conversion.py), not to the session that made it. In a
            # process with a session per home its queries would go to a session that lacks it
            # ("remote checkpoint relation does not exist"): bind it, and its release, to `spark`.
            checkpointed._session = checkpointed._plan._spark_session = spark
            try:
                yield checkpointed
            finally:
                with contextlib.suppress(Exception):  # best effort: the session frees it anyway
                    checkpointed.unpersist()
