"""Entry script for Spark clusters: the `recontext` command, plus `--remote`.

    python jobs/spark_submit.py --home H run all                       # embedded Sail engine
    python jobs/spark_submit.py --remote sc://host:15002 --home H run all   # a Spark Connect server
    SPARK_REMOTE=sc://host:15002 spark-submit jobs/spark_submit.py --home H run all

`--remote URL` sets SPARK_REMOTE; every other argument is the `recontext` command's
(jobs/cli.py). Spark Connect needs nothing on the server beyond Delta support there.

Classic (JVM) spark-submit, no Spark Connect endpoint: the script starts the driver's own
Spark Connect server (SparkConnectPlugin, Spark 4) and runs the pipeline through it, so the
cluster needs the Delta jars and settings (`pip install recontext[classic]` for delta-spark):

    spark-submit --packages io.delta:delta-spark_2.13:4.0.0 \\
      --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension \\
      --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog \\
      jobs/spark_submit.py --home /shared/recontext run all
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--remote", help="Spark Connect URL, e.g. sc://host:15002 (sets SPARK_REMOTE)")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.remote:
        os.environ["SPARK_REMOTE"] = known.remote
    elif (os.environ.get("PYSPARK_GATEWAY_PORT") and not os.environ.get("SPARK_REMOTE")
          and not os.environ.get("DATABRICKS_RUNTIME_VERSION")):  # Databricks: its own session
        # Launched by classic spark-submit (a driver JVM and no endpoint): serve Spark Connect
        # from this driver so the pipeline's Connect-only code runs on the cluster, not on Sail.
        from pyspark.sql import SparkSession

        spark = SparkSession.builder.config("spark.plugins", "org.apache.spark.sql.connect.SparkConnectPlugin") \
            .getOrCreate()
        os.environ["SPARK_REMOTE"] = f"sc://localhost:{spark.conf.get('spark.connect.grpc.binding.port', '15002')}"

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # from a checkout, not installed
    from jobs.cli import main as recontext

    return recontext(rest)


if __name__ == "__main__":
    sys.exit(main())
