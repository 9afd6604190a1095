"""The pipeline on a real Apache Spark 4 Connect server with delta-spark (`python -m jobs.spark_local`):
the same tables as the embedded engine, read back by delta-rs, and safe to SIGKILL there too.

Spark runs pandas UDFs in separate Python worker processes (the embedded engine runs them in its
own process), so these runs also show that no UDF leans on driver state.
"""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable

from core.tables import TABLES
from sample_images import recontext
from test_runner import ONE_THREAD, PRODUCTS, _run_until_killed, job_runs, make_home, tables

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
    from pyspark.sql import SparkSession

    from core.settings import Settings
    from etl.lakehouse import Lakehouse

    # The thread's first session is pyspark's active one: the homes' sessions are not (Engine.staged).
    decoy = SparkSession.builder.remote(spark_remote).create()
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
    decoy.stop()


@pytest.mark.skipif(os.environ.get("RECONTEXT_REAL_SPARK_DEMO") != "1",
                    reason="the whole demo on real Spark takes too long for CI on 2 cores; RECONTEXT_REAL_SPARK_DEMO=1 runs it")
def test_the_demo_on_real_spark_has_the_embedded_demos_tables(spark_remote, demo_home, tmp_path):
    """`recontext demo` (the sample catalog, `run all`, ratings, report) on real Spark writes every
    data table with the embedded demo's row counts (its images are not the same bytes: the
    embedded demo runs torch on every core, Spark's workers on one thread each); delta-rs reads
    them; `sql` and `tables` work there."""
    home = tmp_path / "spark-demo"
    home.mkdir()
    (home / "config.toml").write_text((demo_home / "config.toml").read_text())  # demo_home's settings
    result = recontext("demo", home=home, remote=spark_remote, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "products=4, product_images=5" in result.stdout
    rows = {name: len(frame) for name, frame in tables(home).items()}
    assert rows == {name: len(frame) for name, frame in tables(demo_home).items()}
    for name in TABLES:  # delta-rs reads every table Spark wrote, with its history
        assert DeltaTable(home / "lakehouse" / name).history(1)
    listed = recontext("tables", home=home, remote=spark_remote)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:2] == ["products", "4"] for line in listed.stdout.splitlines()), listed.stdout
    query = recontext("sql", "SELECT count(*) AS n FROM ranked_generations", "--format", "csv", home=home,
                      remote=spark_remote)
    assert query.returncode == 0 and query.stdout.split() == ["n", str(len(tables(demo_home)["ranked_generations"]))]


@pytest.fixture(scope="module")
def killed_on_spark(spark_remote, tmp_path_factory, tiny_models):
    """A home whose `run all` on real Spark was SIGKILLed in a UDF stage (references: masks,
    captions, embeddings in Spark's Python workers) and in training, then run again to the end."""
    home = make_home(tmp_path_factory.mktemp("killed-on-spark"), tiny_models, remote=spark_remote)
    for stage, delay in (("references", 5.0), ("train", 4.0)):
        _run_until_killed(home, stage, delay, remote=spark_remote)
    final = recontext("run", "all", home=home, remote=spark_remote, timeout=RUN_TIMEOUT, env=ONE_THREAD)
    assert final.returncode == 0, final.stdout + final.stderr
    return home


def test_runs_killed_on_real_spark_end_with_the_embedded_tables(killed_on_spark, reference_home):
    """The killed and re-run home's tables equal the embedded engine's uninterrupted run, its
    adapters (trained two at a time in Spark's Python workers) are the embedded run's to the bit,
    and no adapter version was registered twice."""
    home, (reference, expected) = killed_on_spark, reference_home
    runs = job_runs(home)
    assert "running" not in set(runs.status)
    assert {"references", "train"} <= set(runs[runs.status == "killed"].stage), runs[["stage", "status"]]
    assert_same_tables(tables(home), expected)
    names = [f"recontext-{product}{arm}" for product in PRODUCTS for arm in ("", "-baseline")]
    spark_runs, spark_weights = registered(home, names)
    _, embedded_weights = registered(reference, names)
    for name in names:
        assert list(spark_weights[name]) == list(embedded_weights[name]), name
        for layer, weights in spark_weights[name].items():
            np.testing.assert_array_equal(weights, embedded_weights[name][layer], err_msg=f"{name} {layer}")
    # The baseline stage was never killed: its two products trained at once, in two worker processes.
    tasks = [spark_runs[f"recontext-{product}-baseline"] for product in PRODUCTS]
    assert len({t.data.tags["task_pid"] for t in tasks}) == 2
    started = [float(t.data.tags["task_started"]) for t in tasks]
    ended = [s + t.data.metrics["task_seconds"] for s, t in zip(started, tasks)]
    assert max(started) < min(ended), "the two training tasks did not overlap"


def test_maintain_tables_and_sql_on_real_spark(killed_on_spark, reference_home, spark_remote):
    """`maintain` (delta-rs compacts and vacuums the tables Spark wrote, Spark checks the keys),
    then Spark reads the rewritten tables: `tables` and `sql` agree with delta-rs."""
    home, (_, expected) = killed_on_spark, reference_home
    maintained = recontext("maintain", "--retention-hours", "0", home=home, remote=spark_remote)
    assert maintained.returncode == 0 and "every declared key" in maintained.stdout, maintained.stdout + maintained.stderr
    after = tables(home)
    assert_same_tables(after, expected)
    listed = recontext("tables", home=home, remote=spark_remote)
    assert listed.returncode == 0, listed.stderr
    counts = {words[0]: words[1] for words in map(str.split, listed.stdout.splitlines()) if len(words) > 1}
    assert {name: counts.get(name) for name in after} == {name: str(len(frame)) for name, frame in after.items()}
    query = recontext("sql", "SELECT count(*) AS n FROM ranked_generations", "--format", "csv", home=home,
                      remote=spark_remote)
    assert query.returncode == 0 and query.stdout.split() == ["n", str(len(after["ranked_generations"]))]


@pytest.mark.parametrize("name", ["product_audit", "pipeline_health", "adapter_comparison"])
def test_notebooks_on_real_spark(name, killed_on_spark, spark_remote, monkeypatch):
    """The audit notebooks run top to bottom in a kernel whose session is on the Spark server."""
    from test_notebooks import execute, text

    nb = execute(name, killed_on_spark, monkeypatch, remote=spark_remote)
    assert "Traceback" not in text(nb)
    if name == "product_audit":
        assert f"product {PRODUCTS[0]} " in text(nb)


def registered(home, names):
    """Version 1 of each registered adapter (asserting it is the only one): its MLflow run, and its
    LoRA weights read from the store's files with safetensors."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from safetensors.numpy import load_file

    from etl import tracking
    from core.settings import Settings

    tracking.configure(Settings.load(home))
    client, runs, weights = MlflowClient(), {}, {}
    for name in names:
        versions = client.search_model_versions(f"name = '{name}'")
        assert [str(v.version) for v in versions] == ["1"], name
        runs[name] = client.get_run(versions[0].run_id)
        folder = Path(download_artifacts(f"models:/{name}/1", dst_path=str(home / "downloaded" / name)))
        [weights_file] = folder.rglob("*.safetensors")
        weights[name] = dict(sorted(load_file(weights_file).items()))
    return runs, weights


def test_maintain_on_spark_upgrades_a_home_made_with_checkpoints_off(spark_remote, tmp_path):
    """An older home (checkpoints off, made on the embedded engine), maintained on real Spark
    (OPTIMIZE ZORDER BY there): checkpointed, and Spark and delta-rs read the same rows."""
    import json

    from core.settings import Settings
    from etl.lakehouse import Lakehouse
    from homes import delta_rows, home_made_before_checkpoints

    home = tmp_path / "old"
    before = sorted(home_made_before_checkpoints(home), key=lambda r: r["product_id"])
    result = recontext("maintain", home=home, remote=spark_remote, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in TABLES:
        assert DeltaTable(home / "lakehouse" / name).metadata().configuration["delta.checkpointInterval"] == "10"
        assert (home / "lakehouse" / name / "_delta_log" / "_last_checkpoint").exists(), name
    assert sorted(delta_rows(home, "products", ["product_id", "title"]), key=lambda r: r["product_id"]) == before
    lake = Lakehouse(Settings.load(home, spark_remote=spark_remote))
    stored = lake.spark.sql("SELECT product_id, title FROM products ORDER BY product_id").toPandas()
    assert stored.to_dict("records") == before
    log = home / "lakehouse" / "products" / "_delta_log"
    assert json.loads((log / "_last_checkpoint").read_text())["version"] >= 27
