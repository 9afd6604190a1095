"""The Spark session: embedded Sail by default, any Spark Connect endpoint on request.

Pipeline code only uses the Spark Connect DataFrame API and SQL (no sparkContext, no RDDs), so
the same code runs on the embedded engine, on a Spark 4 Connect server with delta-spark, and on
Databricks.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading

from pyspark.sql import SparkSession

from etl.config import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_embedded_server = None
_sessions: list[SparkSession] = []


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
    for session in _sessions:
        try:
            session.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
    if _embedded_server is not None:
        _embedded_server.stop()


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
        spark = SparkSession.builder.remote(settings.spark_remote or embedded_url()).create()
        _sessions.append(spark)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(settings.arrow_batch_rows))
    # Delta stores timestamps in UTC; Sail compares the zone by name, and a session on a
    # machine whose zone is "Etc/UTC" would otherwise refuse to re-register its own tables.
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    return spark
