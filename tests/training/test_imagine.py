"""On-demand requests: `recontext imagine`, and recontext-service served over HTTP by MLflow.

Run on a copy of the demo home (the shared `demo_home` stays as the demo left it). The copy's
batch generation size is set to 32 px, so images at the adapters' 64 px training size show that
requests use the training resolution. Tables are read back with delta-rs in a child process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from homes import copy_home, delta_rows
from sample_images import recontext

SCENE = "on a marble kitchen counter, morning light"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def request_home(demo_home, tmp_path_factory):
    home = copy_home(demo_home, tmp_path_factory.mktemp("imagine") / "home")
    with open(home / "config.toml", "a") as config:
        config.write("\n[generation]\nresolution = 32\n")
    return home


def champion(home: Path, product_id: str):
    from mlflow import MlflowClient

    store = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)  # earlier tests set another registry
    version = client.get_model_version_by_alias(f"recontext-{product_id}", "champion")
    return str(version.version), int(client.get_run(version.run_id).data.params["resolution"])


def test_imagine_writes_on_demand_lineage_and_returns_the_kept_images(request_home):
    before = delta_rows(request_home, "generations", ["task_key"])
    result = recontext("imagine", "coffee-cup", SCENE, "-n", "4", "--keep", "2", "--format", "json",
                       home=request_home)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    kept = answer["kept"]
    assert answer["generated"] == 4 and len(kept) == 2 and [k["rank"] for k in kept] == [1, 2]
    # Which weights made these figures, per role it ran (the demo home: tiny models, the packaged U2-Net-p).
    assert answer["model_weights"] == {"text2img": "tiny random weights", "clip": "tiny random weights",
                                       "dino": "tiny random weights", "u2netp": "packaged"}
    version, resolution = champion(request_home, "coffee-cup")
    assert resolution == 64  # trained at 64 px; the home's batch generation size is 32

    rows = [r for r in delta_rows(request_home, "generations", ["task_key", "image_id", "product_id", "origin",
                                                                "scene", "seed", "adapter_version", "prompt",
                                                                "generation_prompt", "width", "image"])
            if r["origin"] == "on_demand"]
    assert len(rows) == 4 and len(before) + 4 == len(delta_rows(request_home, "generations", ["task_key"]))
    assert {(r["product_id"], r["scene"], r["adapter_version"], r["width"]) for r in rows} == {
        ("coffee-cup", SCENE, version, 64)}
    assert sorted(r["seed"] for r in rows) == [0, 1, 2, 3] and len({r["task_key"] for r in rows}) == 4
    assert all(r["prompt"] == f"a photo of a coffee cup, {SCENE}" and r["generation_prompt"].endswith(
        f" coffee cup, {SCENE}") for r in rows)
    stored = {r["image_id"]: base64.b64decode(r["image"]) for r in rows}
    for image in kept:  # the printed files are the stored images
        assert Path(image["path"]).read_bytes() == stored[image["image_id"]]
        assert Image.open(image["path"]).size == (64, 64)

    # The ranking: the sum of the stored metrics, best first, only the request's images compete.
    ranked = {r["image_id"]: r for r in delta_rows(request_home, "ranked_generations",
                                                   ["image_id", "origin", "kept", "rank", "score"])
              if r["origin"] == "on_demand"}
    metrics = {r["image_id"]: r for r in delta_rows(request_home, "image_metrics",
                                                    ["image_id", "clip_t", "clip_i", "dino_i"])}
    assert set(ranked) == set(stored) and {i for i, r in ranked.items() if r["kept"]} == {k["image_id"] for k in kept}
    for image_id, row in ranked.items():
        m = metrics[image_id]
        assert row["score"] == pytest.approx(m["clip_t"] + m["clip_i"] + m["dino_i"])
    scores = sorted((r["score"] for r in ranked.values()), reverse=True)
    assert [k["score"] for k in kept] == pytest.approx(scores[:2], abs=1e-4)

    # The same request again writes nothing new (no table gets a new Delta version); as text, it
    # says the scores come from tiny models.
    from deltalake import DeltaTable

    tables = ("generations", "image_metrics", "ranked_generations", "masks", "embeddings")
    versions = {t: DeltaTable(str(request_home / "lakehouse" / t)).version() for t in tables}
    again = recontext("imagine", "coffee-cup", SCENE, "-n", "4", "--keep", "2", home=request_home)
    assert again.returncode == 0, again.stderr
    assert {t: DeltaTable(str(request_home / "lakehouse" / t)).version() for t in tables} == versions
    printed = " ".join(again.stdout.split())  # the note is wrapped at 100 columns
    assert "NOTE: Models " in printed and "tiny random-weight stand-ins" in printed
    assert len(delta_rows(request_home, "generations", ["task_key"])) == len(before) + 4


def test_batch_ranking_and_evaluation_leave_on_demand_images_out(request_home):
    from core.settings import Settings
    from etl.evaluation import evaluated_images
    from etl.lakehouse import Lakehouse
    from training.imagine import imagine
    from etl.ranking import run_ranking

    lake = Lakehouse(Settings.load(request_home))
    images = imagine(lake, "motorcycle", "parked on a city street at dusk", n=2, keep=1, seed=7)
    assert len(images) == 2 and images.kept.sum() == 1 and images.iloc[0].kept
    assert images.iloc[0].score >= images.iloc[1].score
    on_demand = set(images.image_id)
    assert not on_demand & set(evaluated_images(lake).image_id)
    run_ranking(lake)  # the batch ranking rewrites only the bank's rows
    ranked = lake.spark.sql("SELECT image_id, origin, kept, rank FROM ranked_generations "
                            "WHERE product_id = 'motorcycle'").toPandas()
    mine = ranked[ranked.image_id.isin(on_demand)]
    assert set(mine.origin) == {"on_demand"} and mine.kept.sum() == 1
    assert ranked[~ranked.image_id.isin(on_demand)].kept.sum() <= lake.settings.generation.keep_top


def test_a_request_scores_its_images_as_the_metrics_stage_does(request_home):
    """Every metric of a request's images (each row of core.vocabulary.METRICS, computed inside the
    request) equals what the batch masks, embeddings and metrics stages then compute for the same
    images from stored vectors: one compute function per metric, two paths to its inputs."""
    from core.settings import Settings
    from core.vocabulary import METRIC_COLUMNS
    from etl.embeddings import run_embeddings
    from etl.lakehouse import Lakehouse
    from etl.masks import run_masks
    from etl.metrics import run_metrics
    from training.imagine import imagine
    from udfs.zoo import ModelZoo

    lake = Lakehouse(Settings.load(request_home))
    asked = imagine(lake, "motorcycle", "parked on a wooden pier by the sea", n=2, seed=11).set_index("image_id")
    assert asked.clip_i.notna().all() and asked.bg_clip_t.notna().any()
    zoo = ModelZoo.from_settings(lake.settings)
    for run in (run_masks, run_embeddings, run_metrics):
        run(lake, zoo)
    batch = lake.spark.sql("SELECT * FROM image_metrics WHERE product_id = 'motorcycle'").toPandas().set_index("image_id")
    for column in METRIC_COLUMNS:
        np.testing.assert_allclose(batch.loc[asked.index, column].astype(float), asked[column].astype(float),
                                   atol=1e-5, err_msg=column)


@pytest.mark.parametrize("arguments, reason", [
    (["coffee-cup", "next to a Nike shoe", "-n", "2"], "Nike"),
    (["coffee-cup", "on a table next to a motorcycle", "-n", "2"], "another product type (motorcycle)"),
    (["coffee-cup", "table", "-n", "2"], "too short"),
    (["no-such-product", SCENE], "unknown product 'no-such-product'"),
    (["coffee-cup", SCENE, "-n", "0"], "n must be between 1 and 64"),
    (["coffee-cup", SCENE, "-n", "2", "--keep", "3"], "keep must be between 1 and n"),
])
def test_refused_requests_exit_2_naming_the_reason(request_home, capsys, arguments, reason):
    before = len(delta_rows(request_home, "generations", ["task_key"]))
    assert main(["--home", str(request_home), "imagine", *arguments]) == 2
    err = capsys.readouterr().err
    assert reason in err and len(err.strip().splitlines()) == 1
    assert len(delta_rows(request_home, "generations", ["task_key"])) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, records: list[dict]):
    body = json.dumps({"dataframe_records": records}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_service_serves_ranked_images_over_http_and_keeps_the_base_model_loaded(request_home, tmp_path):
    from core.settings import Settings
    from jobs.service import SERVICE_NAME, register_service

    version = register_service(Settings.load(request_home))
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{request_home / 'mlflow' / 'mlflow.db'}",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # the server execs `uvicorn` from PATH: this environment's, as an activated virtualenv has it
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{SERVICE_NAME}/{version}",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1", "-t", "600"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the server did not answer /ping in 180 s"
                time.sleep(1)
        status, first = _post(port, [{"product_id": "coffee-cup", "scene": SCENE, "n": 3, "keep": 2, "seed": 11}])
        assert status == 200, first
        images = first["predictions"]
        assert [i["rank"] for i in images] == [1, 2] and images[0]["score"] >= images[1]["score"]
        assert {i["adapter_version"] for i in images} == {champion(request_home, "coffee-cup")[0]}
        for image in images:
            pixels = Image.open(io.BytesIO(base64.b64decode(image["image_png_base64"])))
            assert pixels.size == (64, 64) and np.asarray(pixels).std() > 0
            assert image["prompt"] == f"a photo of a coffee cup, {SCENE}"
        assert {i["base_model_loads"] for i in images} == {1}
        assert json.loads(images[0]["model_weights"])["text2img"] == "tiny random weights"

        status, second = _post(port, [{"product_id": "motorcycle", "scene": "parked on a city street at dusk",
                                       "n": 2, "keep": 1}])
        assert status == 200, second
        assert [i["product_id"] for i in second["predictions"]] == ["motorcycle"]
        assert second["predictions"][0]["base_model_loads"] == 1  # the second request reused the base model

        status, refused = _post(port, [{"product_id": "coffee-cup", "scene": "next to a nike shoe", "n": 2}])
        assert status == 400 and "names a brand (nike)" in refused["message"]  # lower case too
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    served = [r for r in delta_rows(request_home, "generations", ["origin", "seed", "product_id"])
              if r["origin"] == "on_demand" and r["product_id"] == "coffee-cup" and r["seed"] in (11, 12, 13)]
    assert len(served) == 3  # the service records its lineage like the command


def test_on_demand_requests_during_a_scheduled_run_fail_neither(demo_home, tmp_path):
    """Two `recontext imagine` processes while `recontext run generate rank` has new work (a third
    seed per prompt): the requests commit to generations, image_metrics and ranked_generations
    while the generate stage runs, and the runner's write check counts only the stage's own
    commits, so the run exits 0 and every row of both is stored."""
    import pandas as pd
    from deltalake import DeltaTable

    from etl.lakehouse import commit_writer
    from sample_images import cli_env

    home = copy_home(demo_home, tmp_path / "home")
    with open(home / "config.toml", "a") as config:
        config.write("\n[generation]\nseeds_per_prompt = 3\n")
    bank = [r for r in delta_rows(home, "generations", ["origin"]) if r["origin"] == "bank"]
    command = [sys.executable, "-m", "jobs.cli", "--home", str(home)]
    run = subprocess.Popen([*command, "run", "generate", "rank"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=cli_env())
    printed = []
    for line in run.stdout:  # the requests start once the generate stage has
        printed.append(line)
        if "generate:" in line:
            break
    requests = [subprocess.Popen([*command, "imagine", product, scene, "-n", "2", "--keep", "1", "--format", "json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
                for product, scene in (("coffee-cup", SCENE), ("motorcycle", "parked on a city street at dusk"))]
    answers = [request.communicate(timeout=900) for request in requests]
    printed.append(run.communicate(timeout=1200)[0])
    assert run.returncode == 0, "".join(printed)
    for request, (out, err) in zip(requests, answers):
        assert request.returncode == 0, err
    kept = [k["image_id"] for out, _ in answers for k in json.loads(out)["kept"]]

    runs = pd.DataFrame(delta_rows(home, "job_runs", ["run_id", "stage", "status", "started_at", "finished_at",
                                                      "tables_written"]))
    runs = runs[runs.run_id == runs.run_id.max()].set_index("stage")
    assert list(runs.status) == ["succeeded", "succeeded"]
    generations = pd.DataFrame(delta_rows(home, "generations", ["image_id", "origin", "arm"]))
    on_demand = set(generations[generations.origin == "on_demand"].image_id)
    assert len(on_demand) == 4 and set(kept) <= on_demand  # every image of both requests
    # A third seed per prompt: half as many images as the two seeds made; the stage counted its own rows only.
    assert json.loads(runs.loc["generate", "tables_written"])["generations"] == len(bank) // 2 > 0
    assert (generations.origin == "bank").sum() == len(bank) * 3 // 2
    # Every image of both is scored, and every image of ours ranked (the baseline arm is not ranked).
    assert set(generations.image_id) <= {r["image_id"] for r in delta_rows(home, "image_metrics", ["image_id"])}
    ours = set(generations[generations.arm == "ours"].image_id)
    assert on_demand <= ours <= {r["image_id"] for r in delta_rows(home, "ranked_generations", ["image_id"])}
    # The requests did commit while the generate stage ran, as writers of their own.
    started, finished = (pd.Timestamp(runs.loc["generate", c], unit="ms", tz="UTC")
                         for c in ("started_at", "finished_at"))
    theirs = [c for c in DeltaTable(str(home / "lakehouse" / "generations")).history()
              if not (commit_writer(c) or "step:").startswith("step:")
              and started <= pd.Timestamp(c["timestamp"], unit="ms", tz="UTC") <= finished]
    assert theirs, "no request committed during the generate stage"
