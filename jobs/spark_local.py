"""A real Apache Spark 4 Connect server with Delta Lake on loopback, for development and tests.

    jobs/spark_jars.sh                  # once: Spark (full pyspark) and the Delta jars, see below
    python -m jobs.spark_local          # prints sc://127.0.0.1:PORT, serves until SIGTERM/SIGINT
    SPARK_REMOTE=sc://127.0.0.1:PORT recontext --home H demo

The server is the full `pyspark` package's Spark (its jars and Connect server), installed by
`jobs/spark_jars.sh` into its own virtual environment under `spark-local/venv` so it never
replaces the lightweight `pyspark-client` of the project's environment; Delta's jars, fetched
with Maven, lie in `spark-local/jars`. (`SPARK_LOCAL_DIR` moves that folder; `SPARK_HOME`
points at another Spark 4 instead.)

Spark runs pandas UDFs in Python worker processes: they run this process's Python (the
project's environment, which has the models' libraries and pyspark's worker), with the project
on their PYTHONPATH and HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set (default 1: nothing downloads).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONNECT_SERVER = "org.apache.spark.sql.connect.service.SparkConnectServer"


def local_dir() -> Path:
    return Path(os.environ.get("SPARK_LOCAL_DIR") or ROOT / "spark-local")


def spark_home() -> Path:
    """The Spark installation: $SPARK_HOME, else the full pyspark in spark-local/venv."""
    if os.environ.get("SPARK_HOME"):
        return Path(os.environ["SPARK_HOME"])
    found = sorted(local_dir().glob("venv/lib/python*/site-packages/pyspark/bin/spark-submit"))
    if not found:
        raise SystemExit(f"no Spark under {local_dir()}/venv: run jobs/spark_jars.sh first (or set SPARK_HOME)")
    return found[0].parent.parent


def delta_jars() -> list[Path]:
    jars = sorted((local_dir() / "jars").glob("*.jar"))
    if not any(j.name.startswith("delta-spark") for j in jars):
        raise SystemExit(f"no Delta jars in {local_dir()}/jars: run jobs/spark_jars.sh first")
    return jars


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(port: int, scratch: Path, cores: int = 2) -> list[str]:
    conf = {
        "spark.master": f"local[{cores}]",
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.driver.host": "127.0.0.1",  # loopback only, whatever the host name resolves to
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.connect.grpc.binding.port": str(port),
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        # A catalog in memory, like the embedded engine's: no Hive metastore folder appears in the
        # working directory. Tables are re-registered by every lakehouse session anyway.
        "spark.sql.catalogImplementation": "in-memory",
        "spark.sql.warehouse.dir": str(scratch / "warehouse"),
        "spark.local.dir": str(scratch / "tmp"),
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        # A handful of rows per query here: 200 shuffle partitions would mean 200 tiny tasks.
        "spark.sql.shuffle.partitions": str(cores),
        "spark.databricks.delta.snapshotPartitions": str(cores),  # Delta's log replay, likewise (default 50)
        "spark.ui.enabled": "false",
        "spark.log.level": "WARN",
        # A client killed mid-query (Ctrl-C, SIGKILL) leaves its query running on the server until
        # it counts as abandoned: seconds, not the default 5 minutes, so it cannot race the re-run.
        "spark.connect.execute.manager.detachedTimeout": "10s",
        "spark.connect.execute.manager.maintenanceInterval": "2s",
        "spark.driver.memory": "2g",
        # Small data on few cores: the C1 JIT alone warms up in a fraction of the CPU time.
        "spark.driver.extraJavaOptions": f"-XX:TieredStopAtLevel=1 -Dderby.system.home={scratch / 'derby'}",
    }
    jars = ",".join(str(j) for j in delta_jars())
    return [str(spark_home() / "bin" / "spark-submit"), "--class", CONNECT_SERVER, "--name", "recontext-spark-local",
            "--jars", jars, *(a for k, v in conf.items() for a in ("--conf", f"{k}={v}")), "spark-internal"]


def worker_environment() -> dict[str, str]:
    """What Spark's Python workers inherit: the project importable, nothing downloaded."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYSPARK_PYTHON"] = sys.executable
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.pop("SPARK_REMOTE", None)  # the workers must not connect anywhere
    return env


def _die_with_parent() -> None:
    """Linux: the JVM gets SIGTERM when this process dies, even by SIGKILL (no orphaned servers)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def wait_listening(server: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the Spark Connect server exited with code {server.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the Spark Connect server did not listen on port {port} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.spark_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--cores", type=int, default=2, help="local[N] (default 2)")
    parser.add_argument("--log", type=Path, help="write Spark's log here (default: this process's stderr)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    port = args.port or free_port()
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with tempfile.TemporaryDirectory(prefix="recontext-spark-") as scratch:
        log = open(args.log, "ab") if args.log else None
        server = subprocess.Popen(command(port, Path(scratch), args.cores), env=worker_environment(),
                                  stdin=subprocess.DEVNULL, stdout=log or sys.stderr, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=_die_with_parent)
        try:
            wait_listening(server, port, args.start_timeout)
            print(f"sc://127.0.0.1:{port}", flush=True)
            while stop["signal"] is None and server.poll() is None:
                time.sleep(0.2)
        finally:
            if server.poll() is None:
                server.terminate()  # the JVM's shutdown hooks stop Spark cleanly
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
            if log:
                log.close()
    if stop["signal"] is None:
        print(f"the Spark Connect server exited with code {server.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
