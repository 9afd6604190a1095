"""The pipeline on a real Apache Spark 4 Connect server with delta-spark (`python -m jobs.spark_local`):
the same tables as the embedded engine, read back by delta-rs, and safe to SIGKILL there too.

Spark runs pandas UDFs in separate Python worker processes (the embedded engine runs them in its
own process), so these runs also show that no UDF leans on driver state.
"""

import os

import pandas as pd
import pytest
from deltalake import DeltaTable

from etl.tables import TABLES
from sample_images import recontext
from test_runner import PRODUCTS, _run_until_killed, job_runs, make_home, tables

pytestmark = pytest.mark.real_spark

# Columns left out of the comparison are listed in test_runner.tables().
FLOAT_TOLERANCE = 1e-5
# A whole run on a JVM and Python workers sharing 2 cores: far slower than the embedded engine.
RUN_TIMEOUT = 3600


def assert_same_tables(got: dict[str, pd.DataFrame], expected: dict[str, pd.DataFrame]) -> None:
    assert set(got) == set(expected)
    for name, frame in expected.items():
        key = [k for k in TABLES[name].key if k in frame]
        assert len(got[name]) == len(got[name].drop_duplicates(key)), f"duplicate keys in {name}"
        pd.testing.assert_frame_equal(got[name], frame, check_dtype=False, rtol=FLOAT_TOLERANCE,
                                      atol=FLOAT_TOLERANCE, obj=name)


def test_two_homes_on_one_spark_server_keep_their_own_tables(spark_remote, tmp_path):
    """Spark shares one catalog among a server's sessions: each home gets its own database."""
    from etl.config import Settings
    from etl.lakehouse import Lakehouse

    first = Lakehouse(Settings.load(tmp_path / "a", spark_remote=spark_remote))
    second = Lakehouse(Settings.load(tmp_path / "b", spark_remote=spark_remote))
    assert first.engine.name == "spark" and first.engine.version.startswith("4.")
    frame = pd.DataFrame({"product_id": ["p"], "title": ["t"], "product_type": ["mug"], "attributes": ["{}"],
                          "source": ["test"]})
    assert first.upsert_rows("products", frame) == 1
    assert first.table("products").count() == 1 and second.table("products").count() == 0
    assert DeltaTable(tmp_path / "a" / "lakehouse" / "products").version() >= 1  # MERGE landed in a's folder
    again = Lakehouse(Settings.load(tmp_path / "a", spark_remote=spark_remote))  # a new session, same home
    assert again.table("products").count() == 1


@pytest.mark.skipif(os.environ.get("RECONTEXT_REAL_SPARK_DEMO") != "1",
                    reason="the whole demo on real Spark takes too long for CI on 2 cores; RECONTEXT_REAL_SPARK_DEMO=1 runs it")
def test_the_demo_on_real_spark_has_the_embedded_demos_tables(spark_remote, demo_home, tmp_path):
    """`recontext demo` (the sample catalog, `run all`, ratings, report) on real Spark writes every
    data table as the embedded engine does; delta-rs reads them; `sql` and `tables` work there."""
    home = tmp_path / "spark-demo"
    home.mkdir()
    (home / "config.toml").write_text((demo_home / "config.toml").read_text())  # demo_home's settings
    result = recontext("demo", home=home, remote=spark_remote, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "products=4, product_images=5" in result.stdout
    assert_same_tables(tables(home), tables(demo_home))
    for name in TABLES:  # delta-rs reads every table Spark wrote, with its history
        assert DeltaTable(home / "lakehouse" / name).history(1)
    listed = recontext("tables", home=home, remote=spark_remote)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:2] == ["products", "4"] for line in listed.stdout.splitlines()), listed.stdout
    query = recontext("sql", "SELECT count(*) AS n FROM ranked_generations", "--format", "csv", home=home,
                      remote=spark_remote)
    assert query.returncode == 0 and query.stdout.split() == ["n", str(len(tables(demo_home)["ranked_generations"]))]


def test_runs_killed_on_real_spark_end_with_the_embedded_tables(spark_remote, reference_home, tmp_path, tiny_models):
    """SIGKILL `run all` on real Spark in a UDF stage (references: masks, captions, embeddings in
    Spark's Python workers) and in training, run again: the tables equal the embedded engine's
    uninterrupted run."""
    _, expected = reference_home
    home = make_home(tmp_path, tiny_models, remote=spark_remote)
    for stage, delay in (("references", 5.0), ("train", 4.0)):
        _run_until_killed(home, stage, delay, remote=spark_remote)
    final = recontext("run", "all", home=home, remote=spark_remote, timeout=RUN_TIMEOUT)
    assert final.returncode == 0, final.stdout + final.stderr
    runs = job_runs(home)
    assert "running" not in set(runs.status)
    assert {"references", "train"} <= set(runs[runs.status == "killed"].stage), runs[["stage", "status"]]
    assert_same_tables(tables(home), expected)
    from mlflow import MlflowClient

    from etl import tracking
    from etl.config import Settings

    tracking.configure(Settings.load(home))
    for product in PRODUCTS:  # no half-written or duplicate adapter versions were registered
        for name in (f"recontext-{product}", f"recontext-{product}-baseline"):
            assert [str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'")] == ["1"]
