"""The Databricks Asset Bundle (databricks.yml, resources/*.yml) and jobs/spark_submit.py:
the job is jobs/pipeline.toml's stage graph, its tasks call the declared console script with
arguments the CLI accepts, and a task's command runs for real on the embedded engine."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable

from jobs import bundle
from jobs.cli import _parser, cmd_run
from jobs.graph import Stage, load_stages
from sample_images import cli_env, encode, product_shot, write_files

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = yaml.safe_load((ROOT / "databricks.yml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _resources() -> dict:
    """Every resource the bundle includes, merged (as `databricks bundle` does)."""
    merged: dict = {}
    for pattern in BUNDLE["include"]:
        files = sorted(glob.glob(str(ROOT / pattern)))
        assert files, f"include {pattern!r} matches no file"
        for file in files:
            for kind, items in yaml.safe_load(Path(file).read_text())["resources"].items():
                merged.setdefault(kind, {}).update(items)
    return merged


JOB = _resources()["jobs"][bundle.JOB_KEY]
TASKS = {task["task_key"]: task for task in JOB["tasks"]}


def _variables(target: str) -> dict:
    values = {name: spec.get("default") for name, spec in BUNDLE["variables"].items()}
    values.update(BUNDLE["targets"][target].get("variables", {}))
    return values


def _resolve(value: str, target: str) -> str:
    variables = _variables(target)
    return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(variables[m.group(1)]), value)


def test_job_yaml_is_generated_from_pipeline_toml():
    assert (ROOT / "resources" / "recontext.job.yml").read_text() == bundle.render(), (
        "resources/recontext.job.yml is out of date with jobs/pipeline.toml: run `python -m jobs.bundle` "
        "and commit the result")
    assert bundle.main(["--check"]) == 0


def test_bundle_builds_the_wheel_the_tasks_install():
    assert BUNDLE["bundle"]["name"] == "recontext"
    assert "resources/*.yml" in BUNDLE["include"]
    (artifact,) = BUNDLE["artifacts"].values()
    assert artifact["type"] == "whl" and artifact["path"] == "."
    assert "wheel" in artifact["build"]
    sources = {f["source"] for f in artifact["files"]}
    for task in JOB["tasks"]:
        wheels = {os.path.normpath(ROOT / "resources" / lib["whl"]) for lib in task["libraries"]}
        assert wheels == {os.path.normpath(ROOT / s) for s in sources}, task["task_key"]


def test_one_task_per_stage_with_the_stage_dependencies():
    stages = load_stages()
    assert list(TASKS) == list(stages)
    for name, stage in stages.items():
        assert [d["task_key"] for d in TASKS[name].get("depends_on", [])] == list(stage.depends_on), name


def test_tasks_call_the_declared_console_script_of_this_project():
    scripts = PYPROJECT["project"]["scripts"]
    clusters = {c["job_cluster_key"] for c in JOB["job_clusters"]}
    for name, task in TASKS.items():
        wheel_task = task["python_wheel_task"]
        assert wheel_task["package_name"] == PYPROJECT["project"]["name"], name
        assert wheel_task["entry_point"] in scripts, f"{name}: {wheel_task['entry_point']} not in [project.scripts]"
        assert task["job_cluster_key"] in clusters, name


def test_task_parameters_are_the_run_command_for_exactly_that_stage():
    for name, task in TASKS.items():
        args = _parser().parse_args(task["python_wheel_task"]["parameters"])
        assert args.run is cmd_run and args.group is None, name
        assert args.stages == [name], name
        assert args.home == "${var.home}" and args.products is None, name


def test_model_stages_on_gpu_the_others_on_cpu():
    assert TASKS["ingest"]["job_cluster_key"] == TASKS["report"]["job_cluster_key"] == "cpu"
    assert TASKS["references"]["job_cluster_key"] == TASKS["train"]["job_cluster_key"] == "gpu"
    gpu = next(c for c in JOB["job_clusters"] if c["job_cluster_key"] == "gpu")
    assert _resolve(gpu["new_cluster"]["node_type_id"], "prod").startswith("g5.")
    assert "gpu" in _resolve(gpu["new_cluster"]["spark_version"], "prod")


def test_stages_that_can_run_together_must_share_a_cluster():
    stages = {"a": Stage("a", ("ingest",), (), ""),
              "b": Stage("b", ("masks",), ("a",), ""),
              "c": Stage("c", ("report",), ("a",), "")}  # b (gpu) and c (cpu) are parallel
    with pytest.raises(ValueError, match="at the same time"):
        bundle.render(stages)


def test_targets_schedule_and_notifications():
    assert BUNDLE["targets"]["dev"]["mode"] == "development" and BUNDLE["targets"]["dev"]["default"] is True
    assert BUNDLE["targets"]["prod"]["mode"] == "production"
    schedule = JOB["schedule"]
    assert schedule["quartz_cron_expression"] and schedule["timezone_id"] == "UTC"
    assert _resolve(schedule["pause_status"], "prod") == "UNPAUSED"
    assert _resolve(schedule["pause_status"], "dev") == "PAUSED"
    homes = {t: _variables(t)["home"] for t in ("dev", "prod")}
    assert homes["dev"] != homes["prod"] and all(h.startswith("/Volumes/") for h in homes.values())
    assert JOB["max_concurrent_runs"] == 1
    assert JOB["email_notifications"]["on_failure"]
    used = set(re.findall(r"\$\{var\.(\w+)\}", (ROOT / "resources" / "recontext.job.yml").read_text()))
    assert used <= set(BUNDLE["variables"]), used - set(BUNDLE["variables"])


# --- the tasks' commands, for real, on the embedded engine ---

def _env() -> dict:
    env = cli_env()
    env.pop("RECONTEXT_HOME", None)
    return env


def _home_with_catalog(root: Path, tiny_models: Path) -> Path:
    catalog = root / "catalog"
    write_files(catalog / "mug", {"front.jpg": encode(product_shot(seed=1), "JPEG"),
                                  "side.png": encode(product_shot(seed=2), "PNG")})
    write_files(catalog / "lamp", {"lamp.jpg": encode(product_shot(seed=3), "JPEG")})
    home = root / "home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(f'[ingest]\nsources = ["{catalog}"]\n\n[models]\ntiny_dir = "{tiny_models}"\n')
    return home


def _run_task(name: str, home: Path) -> subprocess.CompletedProcess:
    """A task as Databricks runs a python_wheel_task: the entry point's function, called with
    sys.argv = [entry point, *parameters], ${var.home} replaced by `home`."""
    wheel_task = TASKS[name]["python_wheel_task"]
    target = PYPROJECT["project"]["scripts"][wheel_task["entry_point"]]
    parameters = [p.replace("${var.home}", str(home)) for p in wheel_task["parameters"]]
    module, function = target.split(":")
    # A script file, not `python -c`: pyspark's Connect client takes a __main__ without a file
    # for a doctest run and looks for a JVM Spark installation.
    script = home.parent / f"task_{name}.py"
    script.write_text(f"import importlib, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                      f"sys.argv = {[wheel_task['entry_point'], *parameters]!r}\n"
                      f"sys.exit(getattr(importlib.import_module({module!r}), {function!r})())\n")
    return subprocess.run([sys.executable, str(script)], cwd=home.parent, env=_env(), capture_output=True,
                          text=True, timeout=300)


def _job_runs(home: Path):
    return DeltaTable(str(home / "lakehouse" / "job_runs")).to_pandas()


def test_ingest_and_report_tasks_run_on_the_embedded_engine(tmp_path, tiny_models):
    home = _home_with_catalog(tmp_path, tiny_models)
    result = _run_task("ingest", home)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = _job_runs(home)
    assert runs[["stage", "status"]].values.tolist() == [["ingest", "succeeded"]]
    assert runs.rows_written.iloc[0] > 0
    products = DeltaTable(str(home / "lakehouse" / "products")).to_pandas()
    assert sorted(products.product_id) == ["lamp", "mug"]

    result = _run_task("report", home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (home / "report" / "index.html").is_file()
    runs = _job_runs(home)
    assert runs[runs.stage == "report"].status.tolist() == ["succeeded"]


def test_spark_submit_script_runs_ingest_on_the_embedded_engine(tmp_path, tiny_models):
    home = _home_with_catalog(tmp_path, tiny_models)
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "spark_submit.py"), "--home", str(home), "run",
                             "ingest"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = _job_runs(home)
    assert runs[["stage", "status"]].values.tolist() == [["ingest", "succeeded"]]


def test_spark_submit_remote_sets_spark_remote_and_passes_the_rest(monkeypatch):
    import jobs.cli
    from jobs import spark_submit

    # Recorded by monkeypatch (set, then deleted), so the variable spark_submit sets is removed
    # again afterwards: a leaked SPARK_REMOTE would point every later test at this fake server.
    monkeypatch.setenv("SPARK_REMOTE", "")
    monkeypatch.delenv("SPARK_REMOTE")
    seen = {}
    monkeypatch.setattr(jobs.cli, "main", lambda argv: seen.update(argv=argv, remote=os.environ.get("SPARK_REMOTE"))
                        or 0)
    assert spark_submit.main(["--remote", "sc://spark.example:15002", "--home", "/h", "run", "all"]) == 0
    assert seen == {"argv": ["--home", "/h", "run", "all"], "remote": "sc://spark.example:15002"}
