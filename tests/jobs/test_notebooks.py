"""The audit notebooks (notebooks/*.ipynb) run top to bottom, as a user runs them, and show real content.

Each notebook is executed in a fresh Jupyter kernel (the venv's python, cwd = the repo root) with
RECONTEXT_HOME pointing at a home: the shared demo home, and an empty one where every section must
say "no rows yet" instead of failing. The kernel opens its own Spark Connect session on its own
embedded engine. Expected values are read independently of the notebooks, with delta-rs.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from deltalake import DeltaTable
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
# Appended to the executed copy only: which python the kernel runs and where it imports the project from.
PROBE = 'import sys, etl; sys.stdout.write(f"KERNEL-PROBE {sys.executable} | {etl.__file__}\\n")'


def execute(name: str, home: Path, monkeypatch, remote: str | None = None, **parameters) -> nbformat.NotebookNode:
    """Run notebooks/<name>.ipynb on `home` (parameters injected after its parameters cell, the way
    papermill does; on the Spark Connect server `remote`, else the kernel's embedded engine) and
    return the executed notebook; a cell that raises fails the test."""
    for key, value in {"RECONTEXT_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
                       }.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    if remote:
        monkeypatch.setenv("SPARK_REMOTE", remote)
    else:
        monkeypatch.delenv("SPARK_REMOTE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged, f"{name}: no cell tagged 'parameters'"
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    assert tagged[0] == first_code, f"{name}: the parameters cell must be the first code cell"
    if parameters:
        injected = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(injected))
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))

    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    # One write, but a busy kernel may still deliver it in pieces that text() joins with newlines.
    probe = re.search(r"KERNEL-PROBE\s+(\S+)\s+\|\s+(\S+)", text(nb.cells[-1]))
    assert probe, text(nb.cells[-1])
    # The kernel is this venv's python (jupyter_client runs the "python3" spec with sys.executable)
    # and imports the project from this checkout.
    assert os.path.realpath(probe.group(1).strip()) == os.path.realpath(sys.executable)
    assert Path(probe.group(2).strip()).resolve().is_relative_to(ROOT)
    nb.cells.pop()  # the probe
    return nb


def assert_labelled(nb, home: Path) -> None:
    """The notebook says, before any figure, which of the home's models are tiny random-weight
    stand-ins (every one the zoo builds tiny) and that its ratings are synthetic."""
    from core.settings import Settings
    from udfs.zoo import ModelZoo

    first = text(nb.cells[2])
    tiny = ModelZoo.from_settings(Settings.load(home)).tiny_roles()
    assert tiny and "tiny random-weight stand-ins" in first and all(role in first for role in tiny), first
    assert "SYNTHETIC" in first


def text(cell_or_nb) -> str:
    """All text a cell (or a whole notebook) printed or displayed: streams, plain text and HTML."""
    cells = cell_or_nb.cells if hasattr(cell_or_nb, "cells") else [cell_or_nb]
    parts = []
    for cell in cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                parts.extend(out.data.get(mime, "") for mime in ("text/plain", "text/html"))
    return "\n".join(parts)


def images(cell_or_nb) -> int:
    cells = cell_or_nb.cells if hasattr(cell_or_nb, "cells") else [cell_or_nb]
    return sum("image/png" in out.get("data", {}) for cell in cells for out in cell.get("outputs", []))


def cell_with(nb, snippet: str):
    """The executed code cell whose source contains `snippet`."""
    found = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
    assert len(found) == 1, f"{len(found)} cells contain {snippet!r}"
    return found[0]


def table(home: Path, name: str, columns: list[str] | None = None):
    """A table of `home` read with delta-rs, independently of the notebooks' engine."""
    return DeltaTable(str(home / "lakehouse" / name)).to_pandas(columns=columns)


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"
    assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} >= {"product_audit", "pipeline_health", "adapter_comparison"}


def test_product_audit(demo_home, monkeypatch):
    products = sorted(table(demo_home, "products").product_id)
    nb = execute("product_audit", demo_home, monkeypatch)  # PRODUCT_ID = None: the first product
    assert f"product {products[0]} " in text(nb)
    assert_labelled(nb, demo_home)
    refs = cell_with(nb, "references and masks")  # each reference photo next to its masks
    assert images(refs) == 1 and "u2netp" in text(refs)

    # The parameter picks a product the demo took all the way: generated, ranked, rated.
    generations = table(demo_home, "generations", ["product_id", "arm"])
    complete = (set(table(demo_home, "ranked_generations", ["product_id"]).product_id)
                & set(generations[generations.arm == "baseline"].product_id)
                & set(table(demo_home, "rated_images", ["product_id"]).product_id))
    assert complete, "the demo generated, ranked and rated no product"
    pid = sorted(complete)[-1]
    nb = execute("product_audit", demo_home, monkeypatch, PRODUCT_ID=pid)
    out = text(nb)
    assert f"product {pid} " in out
    assert "no rows yet" not in out  # every section has rows for this product
    refs = cell_with(nb, "references and masks")
    assert images(refs) == 1 and "u2netp" in text(refs)
    assert "mean per kind" in text(cell_with(nb, "FROM image_metrics WHERE"))
    summary = text(cell_with(nb, "GROUP BY kind, is_positive, selected"))
    assert "reference" in summary and "outpaint" in summary
    filtered = cell_with(nb, "selected synthetic images")
    assert images(filtered) >= 1 and re.search(r"\d+ synthetic images selected, \d+ rejected", text(filtered))
    adapters = text(cell_with(nb, "FROM adapters WHERE"))
    assert f"recontext-{pid}" in adapters and f"recontext-{pid}-baseline" in adapters
    assert images(cell_with(nb, "ranked generations (ours)")) == 1
    assert images(cell_with(nb, "baseline generations")) == 1
    evaluation = text(cell_with(nb, "FROM evaluation_metrics WHERE"))
    assert "ours" in evaluation and "baseline" in evaluation and "(all)" in evaluation
    verdicts = cell_with(nb, "FROM rated_images v")
    assert "verdicts per arm" in text(verdicts) and images(verdicts) == 1


def test_pipeline_health(demo_home, monkeypatch):
    runs = table(demo_home, "job_runs")
    latest = runs.loc[runs.started_at.idxmax(), "run_id"]
    nb = execute("pipeline_health", demo_home, monkeypatch)
    out = text(nb)
    assert_labelled(nb, demo_home)
    last = cell_with(nb, "latest run {latest}")
    assert f"latest run {latest}" in text(last) and images(last) == 1  # seconds per stage
    for stage in runs[runs.run_id == latest].stage:
        assert stage in text(last)
    recent = text(cell_with(nb, 'groupby("stage").tail(1)'))
    for stage in set(runs.stage):  # every stage of the demo, in any of its runs
        assert stage in recent
    assert images(cell_with(nb, "image metrics by kind")) == 1
    sizes = cell_with(nb, "lake.stats()")
    assert images(sizes) == 1
    for name in ("products", "product_images", "training_images", "generations", "job_runs"):
        assert name in text(sizes)
    failed = runs[runs.status.isin(["failed", "killed"])]
    if failed.empty:
        assert "no failed or killed stages" in out
    for row in failed.itertuples():
        assert f"--- {row.run_id} {row.stage} ({row.status})" in out


def test_adapter_comparison(demo_home, monkeypatch):
    products = sorted(table(demo_home, "products").product_id)
    nb = execute("adapter_comparison", demo_home, monkeypatch)
    assert_labelled(nb, demo_home)
    listed = text(cell_with(nb, "def registered_versions"))
    for pid in products:  # the demo trains both arms of every product and promotes each arm's first version
        ours = re.search(rf"^recontext-{re.escape(pid)}: (.+)$", listed, re.M)
        baseline = re.search(rf"^recontext-{re.escape(pid)}-baseline: (.+)$", listed, re.M)
        assert ours and re.match(r"v\d+", ours.group(1)) and "champion" in ours.group(1), listed
        assert baseline and "champion" in baseline.group(1), listed  # promoted like ours
    for column in ("aliases", "token", "steps", "training_set_version", "final_loss", "val_clip_i", "val_dino_i"):
        assert column in listed
    assert images(cell_with(nb, "get_metric_history")) == 1  # the loss curves
    side = text(cell_with(nb, "values=[\"model_version\""))
    assert "final_loss (ours)" in side and "final_loss (baseline)" in side
    per_version = text(cell_with(nb, "FROM generations) g"))
    assert "adapter_version" in per_version and "baseline" in per_version


@pytest.fixture(scope="module")
def empty_home(tmp_path_factory):
    return tmp_path_factory.mktemp("empty-home")


@pytest.mark.parametrize("name", ["product_audit", "pipeline_health", "adapter_comparison"])
def test_notebooks_on_an_empty_home(name, empty_home, monkeypatch):
    nb = execute(name, empty_home, monkeypatch)
    assert "no rows yet" in text(nb)


def test_the_notebooks_import_their_shared_helpers_from_the_package():
    import inspect

    from jobs import notebook

    shared = {name for name, f in vars(notebook).items() if inspect.isfunction(f) and f.__module__ == notebook.__name__}
    assert {"open_home", "show", "thumbnails"} <= shared
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert "from jobs.notebook import" in code, path.name
        assert not set(re.findall(r"^def (\w+)", code, re.MULTILINE)) & shared, f"{path.name} pastes a shared helper"
