import pytest

from core.settings import CHOICES, Settings
from etl.engine import embedded_url
from etl.lakehouse import Lakehouse


def test_spark_remote_connects_to_an_endpoint(tmp_path, monkeypatch):
    # Any Spark Connect endpoint will do; here a Sail server that is already running.
    monkeypatch.setenv("SPARK_REMOTE", embedded_url())
    settings = Settings.load(tmp_path)
    assert settings.spark_remote == embedded_url()
    lake = Lakehouse(settings)
    assert lake.spark.sql("SELECT count(*) AS n FROM products").collect()[0]["n"] == 0


def test_two_homes_in_one_process_do_not_share_tables(tmp_path):
    first, second = Lakehouse.open(tmp_path / "a"), Lakehouse.open(tmp_path / "b")
    row = first.spark.sql("SELECT 'p' AS product_id, 't' AS title, NULL AS product_type, "
                          "'{}' AS attributes, 'test' AS source, current_timestamp() AS ingested_at")
    assert first.upsert("products", row) == 1
    assert first.table("products").count() == 1
    assert second.table("products").count() == 0


def test_config_file_overrides_defaults(tmp_path):
    (tmp_path / "config.toml").write_text("arrow_batch_rows = 8\n[ingest]\nmax_side = 512\n")
    settings = Settings.load(tmp_path)
    assert settings.arrow_batch_rows == 8 and settings.ingest.max_side == 512
    assert settings.ingest.min_side == 64  # untouched defaults stay


def test_a_profile_presets_real_weight_settings_under_the_files_own(tmp_path):
    (tmp_path / "config.toml").write_text('profile = "sdxl"\n[training]\nsteps = 900\n')
    settings = Settings.load(tmp_path)
    assert settings.training.steps == 900  # the file wins
    assert (settings.training.resolution, settings.training.rank, settings.generation.resolution) == (1024, 64, 1024)
    assert settings.training.gradient_accumulation_steps == 4 and settings.training.max_grad_norm == 1.0
    (tmp_path / "config.toml").write_text('profile = "sd3"\n')
    with pytest.raises(ValueError, match="unknown profile 'sd3'"):
        Settings.load(tmp_path)


def test_unknown_config_key_is_an_error(tmp_path):
    (tmp_path / "config.toml").write_text("[ingest]\nmax_sides = 512\n")
    with pytest.raises(ValueError, match="unknown setting 'max_sides'"):
        Settings.load(tmp_path)


def test_a_misspelled_family_is_refused_at_load_naming_the_allowed_values(tmp_path):
    (tmp_path / "config.toml").write_text('[models]\ntiny_family = "sdxl1"\n')
    with pytest.raises(ValueError, match=r"models.tiny_family = 'sdxl1' in .*config.toml is not one of: sd, sdxl"):
        Settings.load(tmp_path)


@pytest.mark.parametrize("section, key", sorted(CHOICES))
def test_every_enumerated_setting_is_checked_at_load(tmp_path, section, key):
    assert getattr(getattr(Settings.load(tmp_path), section), key) in CHOICES[section, key]  # the default is allowed
    with pytest.raises(ValueError) as refused:
        Settings.load(tmp_path, **{section: {key: "nonesuch"}})
    assert f"{section}.{key} = 'nonesuch'" in str(refused.value)
    assert str(refused.value).endswith(", ".join(CHOICES[section, key]))


def test_devices_and_metric_weights_are_checked_at_load(tmp_path):
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert Settings.load(tmp_path, models={"device": device}).models.device == device
    with pytest.raises(ValueError, match="models.device = 'gpu' .* not one of: auto, cpu, mps, cuda, cuda:<index>"):
        Settings.load(tmp_path, models={"device": "gpu"})
    with pytest.raises(ValueError, match=r"generation.rank_weights names 'clipt' .*allowed keys: clip_i, dino_i"):
        Settings.load(tmp_path, generation={"rank_weights": {"clipt": 1.0}})
    (tmp_path / "config.toml").write_text("[generation]\nrank_weights = {clip_t = 2.0}\n")  # a dict setting, in TOML
    assert Settings.load(tmp_path).generation.rank_weights == {"clip_t": 2.0}


def test_the_scheduler_choices_are_diffusers_own():
    from diffusers.optimization import SchedulerType

    assert set(CHOICES["training", "lr_scheduler"]) == {s.value for s in SchedulerType}


def test_unknown_table_is_an_error(lake):
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        lake.table("nope")


def test_compact_cluster_and_vacuum_keep_rows(lake):
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    for i in (2, 0, 1):  # three commits, three small files, not in product order
        lake.upsert("products", lake.spark.sql(
            f"SELECT 'p{i}' AS product_id, 't' AS title, 'mug' AS product_type, '{{}}' AS attributes, "
            "'test' AS source, current_timestamp() AS ingested_at"))
    assert [h["operation"] for h in lake.history("products")][:3] == ["WRITE"] * 3  # new keys are appended
    metrics = lake.optimize("products")
    assert metrics["numFilesRemoved"] >= 3 and metrics["numFilesAdded"] == 1
    [file] = DeltaTable(lake.location("products")).file_uris()
    assert pq.read_table(file.removeprefix("file://")).column("product_id").to_pylist() == ["p0", "p1", "p2"]
    removed = lake.vacuum("products", retention_hours=0)
    assert len(removed) >= 3
    assert sorted(r.product_id for r in lake.table("products").collect()) == ["p0", "p1", "p2"]


def test_tables_checkpoint_and_every_version_reads_as_delta_rs_reads_it(lake):
    """Checkpoints are on (every 10 commits); the embedded engine cannot time travel to versions
    before the last one, so `at_version` reads those through delta-rs' file list: every version
    reads the rows delta-rs' own time travel reads, and the table still merges."""
    import pandas as pd

    from homes import delta_rows

    for n in range(23):
        lake.upsert_rows("products", pd.DataFrame([{"product_id": f"p{n:02d}", "title": f"mug {n}",
                                                    "product_type": "mug", "attributes": "{}", "source": "t"}]))
    log = lake.settings.lakehouse / "products" / "_delta_log"
    assert {p.name for p in log.glob("*.checkpoint.parquet")} == {f"{v:020d}.checkpoint.parquet" for v in (10, 20)}
    for version in range(24):
        got = sorted(r.product_id for r in lake.at_version("products", version).collect())
        expected = sorted(r["product_id"] for r in delta_rows(lake.settings.home, "products", ["product_id"], version))
        assert got == expected == [f"p{n:02d}" for n in range(version)], version
    changed = pd.DataFrame([{"product_id": "p03", "title": "retitled", "product_type": "mug", "attributes": "{}",
                             "source": "t"}])
    assert lake.upsert_rows("products", changed) == 1
    assert lake.history("products", 1)[0]["operation"] == "MERGE"
    titles = {r.product_id: r.title for r in lake.table("products").collect()}
    assert len(titles) == 23 and titles["p03"] == "retitled" and titles["p04"] == "mug 4"


def test_maintain_upgrades_a_home_made_with_checkpoints_off(tmp_path):
    """A home from before checkpoints were on: `recontext maintain` sets the checkpoint interval,
    writes a checkpoint, deletes the expired logs before it, and the home reads the same rows;
    later commits checkpoint on their own."""
    import json

    import pandas as pd
    from deltalake import DeltaTable

    from core.tables import TABLES
    from homes import delta_rows, home_made_before_checkpoints
    from sample_images import recontext

    home = tmp_path / "old"
    before = home_made_before_checkpoints(home)
    result = recontext("maintain", home=home)
    assert result.returncode == 0, result.stderr
    assert "products             set delta.checkpointInterval=10" in result.stdout
    for name in TABLES:
        delta = DeltaTable(str(home / "lakehouse" / name))
        assert delta.metadata().configuration["delta.checkpointInterval"] == "10", name
        log = home / "lakehouse" / name / "_delta_log"
        checkpoint = json.loads((log / "_last_checkpoint").read_text())["version"]
        assert (log / f"{checkpoint:020d}.checkpoint.parquet").exists(), name
    log = home / "lakehouse" / "products" / "_delta_log"
    checkpoint = json.loads((log / "_last_checkpoint").read_text())["version"]
    assert checkpoint == 27  # create, 25 appends, a MERGE, the property
    # The 40-day-old commits before the checkpoint are gone; what maintain wrote is not.
    kept = sorted(int(p.stem) for p in log.glob("*.json"))
    assert kept == list(range(27, DeltaTable(str(log.parent)).version() + 1))
    before = sorted(before, key=lambda r: r["product_id"])
    assert sorted(delta_rows(home, "products", ["product_id", "title"]), key=lambda r: r["product_id"]) == before
    lake = Lakehouse(Settings.load(home))
    stored = lake.spark.sql("SELECT product_id, title FROM products ORDER BY product_id").toPandas()
    assert stored.to_dict("records") == before and before[0]["title"] == "retitled mug"
    for n in range(10):  # the table checkpoints on its own now, and merges
        lake.upsert_rows("products", pd.DataFrame([{"product_id": "p00", "title": f"title {n}", "product_type": "mug",
                                                    "attributes": "{}", "source": "test"}]))
    assert json.loads((log / "_last_checkpoint").read_text())["version"] > checkpoint
    assert lake.spark.sql("SELECT title FROM products WHERE product_id = 'p00'").collect()[0]["title"] == "title 9"


def test_embedded_sessions_survive_idling():
    """Sail's own default stops sessions idle for minutes; the embedded engine must not."""
    import os

    from etl.engine import embedded_url

    embedded_url()
    assert int(os.environ["SAIL_SPARK__SESSION_TIMEOUT_SECS"]) >= 24 * 3600


def test_upsert_refuses_two_rows_for_one_declared_key(lake):
    import pandas as pd

    from etl.lakehouse import DuplicateKeyError

    rows = pd.DataFrame({"product_id": ["p1", "p1"], "title": ["a", "b"], "product_type": "mug",
                         "attributes": "{}", "source": "test"})
    with pytest.raises(DuplicateKeyError, match=r"refusing to write products: rows share its key "
                                                r"\(product_id\): product_id=p1 \(2 rows\)"):
        lake.upsert_rows("products", rows)
    assert lake.table("products").count() == 0  # nothing was written
    assert lake.key_violations("products") == []


def test_upsert_appends_new_keys_skips_equal_rows_and_merges_changed_ones(lake):
    """Each kind of batch as delta-rs reads the result: all new keys are appended without
    comparing; new keys beside unchanged stored rows are appended alone; a changed stored row is
    MERGEd; an unchanged re-upsert writes no version."""
    import pandas as pd

    from homes import delta_rows

    def rows(*pairs):
        return pd.DataFrame([{"product_id": p, "title": t, "product_type": "mug", "attributes": "{}", "source": "t"}
                             for p, t in pairs])

    def stored():
        return {r["product_id"]: r["title"] for r in delta_rows(lake.settings.home, "products", ["product_id", "title"])}

    assert lake.upsert_rows("products", rows(("p1", "a"), ("p2", "b"))) == 2
    assert lake.upsert_rows("products", rows(("p1", "a"), ("p3", "c"))) == 1  # p1 is unchanged
    assert [h["operation"] for h in lake.history("products", 2)] == ["WRITE", "WRITE"]
    version = len(lake.history("products"))
    assert lake.upsert_rows("products", rows(("p2", "b"), ("p3", "c"))) == 0
    assert len(lake.history("products")) == version  # nothing changed, no commit
    assert lake.upsert_rows("products", rows(("p2", "B"), ("p4", "d"))) == 2
    assert lake.history("products", 1)[0]["operation"] == "MERGE"
    assert stored() == {"p1": "a", "p2": "B", "p3": "c", "p4": "d"}
    assert lake.key_violations("products") == []


def test_a_home_from_an_older_version_gains_the_new_columns(tmp_path):
    """prompt_bank as an older version wrote it (no `source` column): opening the home adds the
    declared column, keeps the rows, and the jobs write through it."""
    import pandas as pd
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from core.settings import Settings
    from etl.lakehouse import Lakehouse
    from core.tables import TABLES

    old = [c for c in TABLES["prompt_bank"].column_names if c != "source"]
    row = {"prompt_id": "p1", "product_type": "mug", "purpose": "scene", "text": "on a marble counter",
           "status": "approved", "reason": None, "reviewed_by": "auto", "llm": "old-llm", "seed": 0,
           "created_at": pd.Timestamp("2026-01-01", tz="UTC")}
    location = tmp_path / "home" / "lakehouse" / "prompt_bank"
    types = {"seed": pa.int32(), "created_at": pa.timestamp("us", tz="UTC")}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in old])
    write_deltalake(str(location), pa.Table.from_pylist([{c: row[c] for c in old}], schema=schema))
    lake = Lakehouse(Settings.load(tmp_path / "home"))
    assert [f.name for f in DeltaTable(str(location)).schema().fields][-1] == "source"
    stored = lake.spark.sql("SELECT prompt_id, llm, source FROM prompt_bank").toPandas()
    assert list(stored.prompt_id) == ["p1"] and stored.llm[0] == "old-llm" and stored.source[0] is None
    new = pd.DataFrame([{**row, "prompt_id": "p2", "source": "seed"}])[TABLES["prompt_bank"].data_columns]
    assert lake.upsert_rows("prompt_bank", new) == 1
    assert sorted(lake.spark.sql("SELECT source FROM prompt_bank").toPandas().source.fillna("-")) == ["-", "seed"]


def test_the_embedded_engine_is_told_apart_as_sail(lake):
    from etl.engine import Engine

    assert lake.engine == Engine.of(lake.spark) and lake.engine.sail
    assert lake.spark.conf.get("spark.sql.session.timeZone") == "UTC"  # Sail's workaround, applied
