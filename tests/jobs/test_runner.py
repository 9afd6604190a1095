"""`recontext run`: the stage graph, incremental re-runs, --products, the home lock, and real
SIGKILLs at several points of several stages (training and generation fanned out over 2 tasks)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from deltalake import DeltaTable

from core.tables import TABLES
from jobs.graph import check_declarations, load_stages
from jobs.recovery import home_lock
from sample_images import cli_env, encode, product_shot, recontext, write_files

PRODUCTS = ("mug-a", "mug-b")
# Image ids are sha256 of pixels, and torch's CPU kernels may round differently on another number
# of threads (a novel view did: measured). Spark's Python workers run one thread per task
# (OMP_NUM_THREADS = spark.task.cpus), the embedded engine all cores: runs whose tables are
# compared byte for byte, on either engine, run on one thread.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Small but complete: every stage runs (prompts come from a CSV, so no LLM), tiny models;
# training and generation run the two products as two parallel Spark tasks.
CONFIG = """
[ingest]
sources = ["{catalog}"]
[models]
tiny_dir = "{tiny}"
[augment]
novel_views_per_image = 1
outpaints_per_image = 1
[training]
auto_promote = true
token_candidates = 1
steps = 4
checkpoint_every = 2
validate_every = 100
validation_images = 1
parallel_products = 2
[generation]
prompts_per_product = 1
seeds_per_prompt = 2
steps = 2
[evaluation]
ranker_min_images = 1000
"""


def make_home(root: Path, tiny_models: Path, remote: str | None = None) -> Path:
    home = root
    catalog = home / "catalog"
    for n, product in enumerate(PRODUCTS):
        write_files(catalog / product, {"1.png": encode(product_shot(seed=n), "PNG")})
        (catalog / product / "product.json").write_text(json.dumps({"product_type": "mug", "title": product}))
    (home / "config.toml").write_text(CONFIG.format(catalog=catalog, tiny=tiny_models))
    pd.DataFrame({"product_type": ["mug"] * 3, "purpose": ["scene", "scene", "target"],
                  "text": ["a marble kitchen counter", "a wooden desk by a window", "on a cafe table"],
                  "status": ["approved"] * 3}).to_csv(home / "prompts.csv", index=False)
    result = recontext("prompts", "import", str(home / "prompts.csv"), home=home, remote=remote)
    assert result.returncode == 0, result.stderr
    return home


def tables(home: Path) -> dict[str, pd.DataFrame]:
    """Every table's rows (keys and data columns; not timestamps, run ids, local paths, or raw
    embedding vectors, whose last bits depend on batch composition: the metrics computed from them
    are compared, with float tolerance), sorted."""
    skip = {"run_id", "source_uri", "source", "dataset", "vector"}
    out = {}
    for name, table in TABLES.items():
        if name == "job_runs":
            continue
        columns = [c for c in table.data_columns if c not in skip]
        frame = DeltaTable(home / "lakehouse" / name).to_pandas(columns=columns)
        if "image" in frame:
            frame["image"] = frame["image"].map(len)
        if "training" in frame:  # a run's training device seconds are measured: equal runs differ there
            frame["training"] = frame["training"].map(without_measured_seconds)
        for column in frame.columns:  # arrays (e.g. mask boxes) compare as tuples
            if frame[column].map(lambda v: hasattr(v, "__len__") and not isinstance(v, (str, bytes))).any():
                frame[column] = frame[column].map(lambda v: None if v is None else tuple(v))
        sortable = [c for c in frame.columns if not frame[c].map(lambda v: isinstance(v, bytes)).any()]
        out[name] = frame.sort_values(sortable).reset_index(drop=True) if len(frame) else frame
    return out


def without_measured_seconds(training: str | None) -> str | None:
    """An arm's training description (evaluation_plans' JSON or evaluation_metrics' text) without
    the training run's wall time."""
    if training is None:
        return None
    if training.startswith("{"):
        return json.dumps({k: v for k, v in json.loads(training).items() if k != "train_seconds"}, sort_keys=True)
    return re.sub(r"[0-9.]+(-[0-9.]+)? device s per product", "(measured) device s per product", training)


def job_runs(home: Path) -> pd.DataFrame:
    return DeltaTable(home / "lakehouse" / "job_runs").to_pandas()


def test_the_stage_graph_is_checked(tmp_path):
    stages = load_stages()
    names = list(stages)
    assert names[0] == "ingest" and names.index("outpaint") > names.index("prompt_bank")
    assert all(names.index(d) < names.index(s.name) for s in stages.values() for d in s.depends_on)
    (tmp_path / "cycle.toml").write_text(
        '[stages.a]\nsteps = ["masks"]\ndepends_on = ["b"]\n'
        '[stages.b]\nsteps = ["masks"]\ndepends_on = ["a"]\n')
    with pytest.raises(ValueError, match="cycle"):
        load_stages(tmp_path / "cycle.toml")
    (tmp_path / "unknown.toml").write_text('[stages.a]\nsteps = ["paint"]\ndepends_on = []\nreads = ["nope"]\n')
    with pytest.raises(ValueError, match=r"unknown step 'paint'; unknown key\(s\) reads"):
        load_stages(tmp_path / "unknown.toml")
    check_declarations()  # every step declares only known tables


def test_a_step_writing_an_undeclared_table_fails_its_stage(lake, tmp_path, monkeypatch):
    from etl.step import Step
    from jobs import steps
    from jobs.runner import run

    def rogue(lake, zoo):  # declares products, writes quarantine
        return {"quarantine": lake.quarantine("rogue", [("p", "x", "test", "written without declaring it")])}

    monkeypatch.setitem(steps.STEPS, "rogue", Step("rogue", rogue, reads=("products",), writes=("products",)))
    pipeline = tmp_path / "rogue.toml"
    pipeline.write_text('[stages.rogue]\nsteps = ["rogue"]\ndepends_on = []\n')
    [result] = run(lake, ["all"], pipeline=pipeline, progress=lambda _: None)
    assert result.status == "failed"
    assert "step 'rogue' wrote table(s) quarantine" in result.error


def _run_rogue(lake, tmp_path, monkeypatch, step):
    from jobs import steps
    from jobs.runner import run

    monkeypatch.setitem(steps.STEPS, step.name, step)
    pipeline = tmp_path / f"{step.name}.toml"
    pipeline.write_text(f'[stages.{step.name}]\nsteps = ["{step.name}"]\ndepends_on = []\n')
    [result] = run(lake, ["all"], pipeline=pipeline, progress=lambda _: None)
    return result


def test_a_step_reading_an_undeclared_table_fails_naming_it(lake, tmp_path, monkeypatch):
    from etl.step import Step

    def nosy(lake, zoo):  # declares products; its own writes (quarantine) it may consult
        lake.spark.sql("SELECT count(*) FROM quarantine").collect()
        lake.spark.sql("SELECT p.product_id FROM products p LEFT JOIN masks m ON m.product_id = p.product_id "
                       "WHERE p.title <> 'FROM rated_images'").collect()
        return {}

    result = _run_rogue(lake, tmp_path, monkeypatch,
                        Step("nosy", nosy, reads=("products",), writes=("quarantine",)))
    assert result.status == "failed"
    assert result.error.startswith("UndeclaredRead: step 'nosy' read table(s) masks that")  # not the quoted one

    def by_name(lake, zoo):
        lake.table("image_metrics").count()
        return {}

    result = _run_rogue(lake, tmp_path, monkeypatch, Step("by_name", by_name, reads=("products",), writes=()))
    assert "step 'by_name' read table(s) image_metrics" in result.error


def test_a_step_loading_an_undeclared_role_fails_even_if_it_catches_the_error(lake, tmp_path, monkeypatch):
    from etl.step import Step

    def greedy(lake, zoo):
        try:  # as a fanned-out task does: its errors become quarantine rows
            zoo.load("captioner")
        except Exception:  # noqa: BLE001
            pass
        return {}

    result = _run_rogue(lake, tmp_path, monkeypatch, Step("greedy", greedy, reads=("products",), writes=()))
    assert result.status == "failed"
    assert result.error.startswith("UndeclaredRole: step 'greedy' loaded model role(s) captioner")
    assert not (lake.settings.home / "models" / "tiny" / "captioner").exists()  # refused before any build


def test_another_writers_commits_during_a_step_are_not_the_steps(lake, tmp_path, monkeypatch):
    """The write check counts only commits tagged as the step's: a commit by another writer
    (here a second lakehouse on the same home, as `recontext imagine` in another process)
    to a table the step does not declare leaves the step succeeding; the same write by the
    step itself fails it."""
    from etl.lakehouse import Lakehouse, commit_writer
    from etl.step import Step

    other = Lakehouse(lake.settings)

    def quiet(lake, zoo):
        other.quarantine("imagine", [("p", "request-1", "test", "an on-demand request's row")])
        return {}

    result = _run_rogue(lake, tmp_path, monkeypatch, Step("quiet", quiet, reads=("products",), writes=()))
    assert result.status == "succeeded", result.error
    [last] = other.history("quarantine", 1)
    assert commit_writer(last) == other.writer != lake.writer
    assert other.spark.sql("SELECT count(*) AS n FROM quarantine").first()["n"] == 1

    def loud(lake, zoo):
        other.quarantine("imagine", [("p", "request-2", "test", "an on-demand request's row")])
        lake.quarantine("loud", [("p", "x", "test", "the step's own")])  # a MERGE-free append
        lake.delete("quarantine", "source_uri = 'x'")  # and a DELETE: both carry the step's tag
        return {}

    result = _run_rogue(lake, tmp_path, monkeypatch, Step("loud", loud, reads=("products",), writes=()))
    assert result.status == "failed" and "step 'loud' wrote table(s) quarantine" in result.error
    tags = [commit_writer(c) for c in lake.history("quarantine", 3)]
    assert tags[0] == tags[1] != other.writer and tags[0].startswith("step:loud:")


def test_stages_describe_reads_writes_roles_and_device(tmp_path):
    listed = recontext("stages", "--format", "json", home=tmp_path / "home")
    assert listed.returncode == 0, listed.stderr
    stages = json.loads(listed.stdout)
    assert [s["stage"] for s in stages] == list(load_stages())
    for stage in stages:
        assert stage["reads"] and stage["writes"] and isinstance(stage["roles"], list)
        assert stage["device"] == ("gpu" if stage["roles"] else "cpu")
    by_name = {s["stage"]: s for s in stages}
    assert {"products", "product_classes"} <= set(by_name["outpaint"]["reads"])  # once missing by hand
    assert by_name["rank"]["writes"] == ["ranked_generations"] and by_name["rank"]["device"] == "cpu"
    assert "u2netp" in by_name["references"]["roles"]  # the configured segmenter, resolved


def test_run_all_then_nothing_new_skips_every_stage(reference_home):
    home, _ = reference_home
    before = {name: DeltaTable(home / "lakehouse" / name).version() for name in TABLES if name != "job_runs"}
    again = recontext("run", "all", home=home)
    assert again.returncode == 0, again.stderr
    after = {name: DeltaTable(home / "lakehouse" / name).version() for name in TABLES if name != "job_runs"}
    assert after == before  # no table got a new version
    runs = job_runs(home)
    last = runs[runs.run_id == runs.run_id.max()]
    assert len(last) == len(load_stages()) and last.rows_written.sum() == 0
    # Stages reading a table that a later stage also writes (masks, captions, embeddings and
    # metrics of the generated images) run once more and find nothing new; the others skip.
    stages = list(load_stages().values())
    rereaders = {s.name for i, s in enumerate(stages) if set(s.reads) & {t for later in stages[i + 1:]
                                                                         for t in later.writes}}
    assert set(last[last.status != "skipped"].stage) <= rereaders
    # (generate is one of them: it reads the plans that evaluate pins after it.)
    assert "generate" in rereaders
    assert {"ingest", "train", "train_baseline"} <= set(last[last.status == "skipped"].stage)
    third = recontext("run", "all", home=home)
    runs = job_runs(home)
    assert third.returncode == 0 and set(runs[runs.run_id == runs.run_id.max()].status) == {"skipped"}
    first = runs[runs.run_id == runs.run_id.min()].set_index("stage")
    assert (first.status == "succeeded").all() and first.loc["ingest", "rows_written"] > 0
    assert json.loads(first.loc["generate", "tables_written"])["generations"] == 8  # 2 products x 2 arms x 2 seeds
    # one load per diffusion role (text2img, inpaint, image2video) in the run's process, however
    # many products, sweeps and arms, counted in the stage that loaded it
    assert first.base_model_loads.sum() == 3 and first.loc["train", "base_model_loads"] <= 1
    assert "run summary" in again.stdout


def test_products_limit_the_run_and_new_files_rerun_only_what_changed(reference_home, tmp_path):
    home, _ = reference_home
    images_before = DeltaTable(home / "lakehouse" / "product_images").to_pandas()
    write_files(home / "catalog" / "mug-b", {"2.png": encode(product_shot(seed=7), "PNG")})
    write_files(home / "catalog" / "mug-c", {"1.png": encode(product_shot(seed=8), "PNG")})
    result = recontext("run", "ingest", "references", "--products", "mug-b", home=home)
    assert result.returncode == 0, result.stderr
    images = DeltaTable(home / "lakehouse" / "product_images").to_pandas()
    assert len(images) == len(images_before) + 1 and set(images.product_id) == {"mug-a", "mug-b"}  # not mug-c
    masks = DeltaTable(home / "lakehouse" / "masks").to_pandas()
    assert set(images.image_id) <= set(masks.image_id)
    runs = job_runs(home)
    last = runs[runs.run_id == runs.run_id.max()].set_index("stage")
    assert list(last.products) == [1, 1] and (last.status == "succeeded").all()


def test_a_second_run_on_the_same_home_fails_clearly_or_waits(tmp_path):
    home = tmp_path
    with home_lock(home, "test-holder"):
        busy = recontext("run", "report", home=home, timeout=120)
        assert busy.returncode == 3
        assert "another recontext run is using" in busy.stderr and "test-holder" in busy.stderr
        waiting = subprocess.Popen([sys.executable, "-m", "jobs.cli", "--home", str(home), "run", "report", "--wait"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert waiting.poll() is None  # still waiting for the lock
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    assert job_runs(home).status.tolist() == ["succeeded"]


def _run_until_killed(home: Path, marker: str, delay: float, remote: str | None = None) -> str:
    """Start `run all` (on the Spark Connect server `remote`, else embedded); SIGKILL it `delay`
    seconds after it prints a line holding `marker` (a stage name alone means "] <stage>:"; on a
    Spark server, after job_runs records that stage running: a slower engine must not be killed
    before the stage has begun to write)."""
    stage = marker if " " not in marker and ":" not in marker else None
    marker = f"] {marker}:" if stage else marker
    process = subprocess.Popen([sys.executable, "-m", "jobs.cli", "--home", str(home), "run", "all"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=cli_env(remote, {"PYTHONUNBUFFERED": "1", **ONE_THREAD}),
                               start_new_session=True)
    seen, announced = [], threading.Event()

    def read():
        for line in process.stdout:
            seen.append(line)
            if marker in line:
                announced.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert announced.wait(timeout=1800), "".join(seen)  # a loaded 2-core box: stages run minutes
    deadline = time.monotonic() + 600
    while remote and stage and time.monotonic() < deadline and process.poll() is None:
        runs = job_runs(home)
        if ((runs.stage == stage) & (runs.status == "running")).any():
            break
        time.sleep(1)
    time.sleep(delay)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the whole process group: the engine dies with it
    except ProcessLookupError:
        pass  # it finished first: the next kill point still interrupts a later run
    process.wait()
    reader.join(timeout=10)
    return "".join(seen)


def test_killed_runs_end_with_the_same_tables_as_an_uninterrupted_run(reference_home, tmp_path, tiny_models):
    _, expected = reference_home
    home = make_home(tmp_path, tiny_models)
    # The training kill lands while the two products train in two parallel tasks (or, on a slow
    # machine, while the driver registers their results).
    for marker, delay in (("] references:", 1.0), ("] outpaint:", 2.0),
                          ("training 2 product(s) (ours) in 2 parallel task(s)", 2.0), ("] generate:", 3.0)):
        _run_until_killed(home, marker, delay)
    final = recontext("run", "all", home=home, env=ONE_THREAD)
    assert final.returncode == 0, final.stdout + final.stderr
    runs = job_runs(home)
    assert "running" not in set(runs.status)
    killed = set(runs[runs.status == "killed"].stage)
    assert len(killed) >= 3, f"the kills landed in too few stages: {killed}"
    got = tables(home)
    for name, frame in expected.items():
        key = [k for k in TABLES[name].key if k in frame]
        assert len(got[name]) == len(got[name].drop_duplicates(key)), f"duplicate keys in {name}"
        pd.testing.assert_frame_equal(got[name], frame, check_dtype=False, obj=name)
    from mlflow import MlflowClient

    from core.settings import Settings
    from etl import tracking

    tracking.configure(Settings.load(home))
    for product in PRODUCTS:  # no half-written or duplicate adapter versions were registered
        for name in (f"recontext-{product}", f"recontext-{product}-baseline"):
            assert [str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'")] == ["1"]
    assert set(got["adapters"].device) == {"cpu"}


def test_maintain_compacts_vacuums_and_prunes_only_orphans(reference_home):
    import mlflow
    from mlflow import MlflowClient

    from core.settings import Settings
    from etl import tracking

    home, _ = reference_home
    counts = {name: len(DeltaTable(home / "lakehouse" / name).to_pandas()) for name in TABLES}
    orphan = home / "mlflow" / "artifacts" / "0123456789abcdef0123456789abcdef"
    (orphan / "artifacts").mkdir(parents=True)
    (orphan / "artifacts" / "leftover.bin").write_bytes(b"x" * 100)
    assert not any((home / "training").glob("**/checkpoint-*"))  # deleted once each adapter was registered
    # what a run killed between registering and cleaning up leaves: maintain removes it
    adapter = DeltaTable(home / "lakehouse" / "adapters").to_pandas().iloc[0]
    leftover = (home / "training" / adapter.product_id /
                f"{adapter.arm}-v{adapter.training_set_version}-{adapter.config_hash}" / "final" / "checkpoints")
    (leftover / "checkpoint-000002").mkdir(parents=True)
    result = recontext("maintain", "--retention-hours", "0", home=home)
    assert result.returncode == 0, result.stderr
    assert "removed 1 orphaned MLflow artifact folder(s)" in result.stdout
    assert not orphan.exists() and not any((home / "training").glob("*/*"))
    assert {name: len(DeltaTable(home / "lakehouse" / name).to_pandas()) for name in TABLES} == counts
    files = DeltaTable(home / "lakehouse" / "masks").file_uris()
    on_disk = [p for p in (home / "lakehouse" / "masks").glob("**/*.parquet") if "_delta_log" not in p.parts]
    assert len(on_disk) == len(files)  # vacuum left only the live files
    tracking.configure(Settings.load(home))
    client = MlflowClient()
    for product in PRODUCTS:  # every registered adapter's files are still there
        for version in client.search_model_versions(f"name = 'recontext-{product}'"):
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}"))
            assert any(local.rglob("*.safetensors")), local
