"""The training job through MLflow: adapters registered per product with aliases, loaded back
through mlflow.diffusers and pyfunc, skipped when already trained, failures isolated, and the
fan-out over Spark tasks training the same adapters as one task at a time."""

import json
import os

import mlflow
import pandas as pd
import pytest
import torch
from deltalake import DeltaTable
from mlflow import MlflowClient
from safetensors.torch import load_file

from core.settings import Settings
from core.errors import UserError
from etl.ingest import ingest
from etl.lakehouse import Lakehouse
from jobs.steps import SCORING, run_steps
from sample_images import encode, product_shot, write_files
from etl import tracking
from training.lora import ADAPTER_FILE
from training.train_job import config_hash, run_training
from udfs.zoo import ModelZoo

TRAINING = {"token_candidates": 2, "sweep_steps": 3, "steps": 6, "checkpoint_every": 3, "validate_every": 3,
            "validation_images": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    # Runs here last seconds: sample system metrics every half second instead of every 10.
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.5"
    home = tmp_path_factory.mktemp("train")
    lake = Lakehouse(Settings.load(home, models={"tiny_dir": str(tiny_models)}, training=TRAINING))
    for product_id, seeds in {"mug-a": [1, 2], "mug-b": [3]}.items():
        write_files(home / "catalog" / product_id, {f"{s}.png": encode(product_shot(seed=s), "PNG") for s in seeds})
        (home / "catalog" / product_id / "product.json").write_text(json.dumps({"product_type": "mug"}))
    ingest(lake, home / "catalog")
    zoo = ModelZoo.from_settings(lake.settings)
    run_steps(lake, [*SCORING, "training_set"], zoo, progress=lambda _: None)
    written = run_training(lake, zoo, progress=lambda _: None)
    yield lake, zoo, written
    os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", None)


def test_one_registered_adapter_per_product(trained):
    lake, _, written = trained
    assert written == {"adapters": 2, "quarantine": 0}
    adapters = DeltaTable(lake.location("adapters")).to_pandas().set_index("product_id")
    client = MlflowClient()
    for product_id, row in adapters.iterrows():
        assert row.model_name == f"recontext-{product_id}" and row.model_version == "1"
        assert str(client.get_model_version_by_alias(row.model_name, "candidate").version) == "1"
        assert row.training_set_version == DeltaTable(lake.location("training_images")).version()
        assert len(json.loads(row.token_scores)) == 2 and row.token in json.loads(row.token_scores)
        run = client.get_run(row.run_id)
        assert run.data.params["token"] == row.token and "loss" in run.data.metrics
        assert "val_clip_i" in run.data.metrics and run.data.metrics["task_seconds"] > 0
        assert row.device == "cpu" and run.data.params["device"] == "cpu"
        history = client.get_metric_history(row.run_id, "loss")
        assert [m.step for m in history] == list(range(1, 7))
        nested = client.search_runs([run.info.experiment_id],
                                    filter_string=f"tags.mlflow.parentRunId = '{row.run_id}'")
        assert sorted(r.data.params["token"] for r in nested) == sorted(json.loads(row.token_scores))
        artifacts = [a.path for a in client.list_artifacts(row.run_id, "validation")]
        assert artifacts and all(p.endswith(".png") for p in artifacts)


def registered_adapter(name: str, version: str) -> dict:
    """The adapter's tensors as MLflow's registry holds them (training deletes its own copy)."""
    path = mlflow.diffusers.load_model(f"models:/{name}/{version}").adapter_path
    return load_file(path if path.endswith(".safetensors") else f"{path}/{ADAPTER_FILE}")


def test_adapter_loads_back_through_mlflow(trained):
    lake = trained[0]
    row = DeltaTable(lake.location("adapters")).to_pandas().iloc[0]
    model = mlflow.diffusers.load_model(f"models:/{row.model_name}@candidate")
    # registered: the training folder (checkpoints, sweep runs, the adapter's first copy) is gone
    assert not (lake.settings.home / "training" / row.product_id).exists() or not any(
        (lake.settings.home / "training" / row.product_id).iterdir())
    logged = load_file(model.adapter_path if model.adapter_path.endswith(".safetensors")
                       else f"{model.adapter_path}/{ADAPTER_FILE}")
    assert any(k.startswith("unet.") for k in logged)
    run = MlflowClient().get_run(row.run_id)
    assert run.data.params["rank"] == run.data.params["lora_alpha"] == str(TRAINING.get("rank", 4))
    info = mlflow.models.get_model_info(f"models:/{row.model_name}@candidate")
    assert info.metadata["base_pipeline"] == "StableDiffusionPipeline" == run.data.tags["base_pipeline"]
    pipeline = model.load_pipeline(device="cpu")
    assert any("lora" in name for name, _ in pipeline.unet.named_parameters())
    assert mlflow.pyfunc.load_model(f"models:/{row.model_name}/1") is not None


def test_promote_sets_champion(trained):
    lake = trained[0]
    tracking.promote(lake.settings, "mug-a", "1")
    assert str(MlflowClient().get_model_version_by_alias("recontext-mug-a", "champion").version) == "1"
    with pytest.raises(UserError, match="no version 9"):
        tracking.promote(lake.settings, "mug-a", "9")


def test_same_version_and_config_is_skipped(trained):
    lake, zoo, _ = trained
    assert run_training(lake, zoo, progress=lambda _: None) == {"adapters": 0, "quarantine": 0}


def test_settings_that_do_not_change_the_weights_retrain_nothing(trained):
    lake, zoo, _ = trained
    cosmetic = {**TRAINING, "validate_every": 2, "checkpoint_every": 5, "checkpoints_keep": 3, "vae_batch_size": 1,
                "experiment": "recontext-renamed"}
    settings = Settings.load(lake.settings.home, models={"tiny_dir": str(lake.settings.models.tiny_dir)},
                             training=cosmetic)
    assert run_training(Lakehouse(settings, spark=lake.spark), zoo, progress=lambda _: None) == \
        {"adapters": 0, "quarantine": 0}
    weights = Settings.load(lake.settings.home, models={"tiny_dir": str(lake.settings.models.tiny_dir)},
                            training={**TRAINING, "alpha": 1})
    assert config_hash(Lakehouse(weights, spark=lake.spark), zoo) != config_hash(lake, zoo)  # alpha does


def fanned_out(lake: Lakehouse, tasks: int) -> Lakehouse:
    """The same home and engine session, training `tasks` products at once."""
    settings = Settings.load(lake.settings.home, models={"tiny_dir": str(lake.settings.models.tiny_dir)},
                             training={**TRAINING, "parallel_products": tasks})
    return Lakehouse(settings, spark=lake.spark)


def test_a_failing_product_in_a_fanned_out_batch_is_recorded_and_others_go_on(trained, monkeypatch):
    lake, zoo, _ = trained
    lake = fanned_out(lake, 2)
    import training.train_job as job

    real = job.train_product
    monkeypatch.setattr(job, "config_hash", lambda *_: "other-config")  # forces a retrain of both

    def flaky(settings, zoo, product_id, *args, **kwargs):  # runs inside the Spark task
        if product_id == "mug-a":
            raise RuntimeError("CUDA out of memory")
        return real(settings, zoo, product_id, *args, **kwargs)

    monkeypatch.setattr(job, "train_product", flaky)
    assert job.run_training(lake, zoo, progress=lambda _: None) == {"adapters": 1, "quarantine": 1}
    failure = DeltaTable(lake.location("quarantine")).to_pandas().query("stage == 'train'").iloc[0]
    assert failure.product_id == "mug-a" and "CUDA out of memory" in failure.reason
    assert str(MlflowClient().get_model_version_by_alias("recontext-mug-b", "candidate").version) == "2"


def test_two_tasks_train_the_same_adapters_as_one(trained, monkeypatch):
    lake, zoo, _ = trained
    import training.train_job as job

    monkeypatch.setattr(job, "config_hash", lambda *_: "fanned-out")  # a new config: both retrain
    messages = []
    assert job.run_training(fanned_out(lake, 2), zoo, progress=messages.append) == {"adapters": 2, "quarantine": 0}
    assert "  training 2 product(s) (ours) in 2 parallel task(s)" in messages
    adapters = DeltaTable(lake.location("adapters")).to_pandas().query("arm == 'ours'")
    for product_id, rows in adapters.groupby("product_id"):
        versions = rows.assign(v=rows.model_version.astype(int)).sort_values("v")
        one_task, two_tasks = versions.iloc[0], versions.iloc[-1]  # the fixture's loop, this fan-out
        assert one_task.model_version == "1" and two_tasks.device == "cpu"
        loop, fanned = (registered_adapter(r.model_name, r.model_version) for r in (one_task, two_tasks))
        assert loop.keys() == fanned.keys() and all(torch.equal(loop[k], fanned[k]) for k in loop)


def test_tasks_log_and_the_driver_registers_through_a_tracking_server(tmp_path, tiny_models, monkeypatch):
    """Training's MLflow side against a real `mlflow server` (SQLite backend, artifacts uploaded
    through it): each task's batched logging keeps every record (params, per-step losses, nested
    sweep runs, validation images), the driver registers the logged adapters with their alias and
    records them in one write, and a re-run finds them registered instead of training again."""
    from homes import mlflow_server, task_outcomes
    from training.train_job import _adapter_row, _recorded, log_training_run, plan_products, record_results

    with mlflow_server(tmp_path / "server") as url:
        monkeypatch.setattr(tracking, "_USER_TRACKING_URI", url)  # as MLFLOW_TRACKING_URI=url would
        lake = Lakehouse(Settings.load(tmp_path / "home", models={"tiny_dir": str(tiny_models)}, training=TRAINING))
        zoo = ModelZoo.from_settings(lake.settings)
        zoo.check("text2img")
        products = ["mug-a", "mug-b"]
        lake.upsert_rows("products", pd.DataFrame(
            {"product_id": products, "title": "a mug", "product_type": "mug", "attributes": "{}", "source": "t"}))
        outcomes = task_outcomes(zoo, lake.settings, products, tmp_path / "work")
        digests = {p: f"digest-{p}" for p in products}
        written, specs = plan_products(lake, products, 7, digests, tracking.OURS, lambda _: None)
        assert written == 0 and [s["product_id"] for s in specs] == products
        experiment = json.loads(specs[0]["spec"])["experiment"]
        for spec in specs:  # the adapters stand where the tasks would have left them; each task logs its run
            spec["spec"] = json.dumps({**json.loads(spec["spec"]), "work": str(tmp_path / "work" / spec["product_id"])})
            outcome = outcomes[spec["product_id"]]
            outcome.update(log_training_run(lake.settings, zoo, spec["product_id"], json.loads(spec["spec"]),
                                            outcome, "cpu"))
        assert json.loads(specs[0]["spec"])["tracking_uri"] == url  # what a task on a Spark worker connects to
        results = pd.DataFrame([{"product_id": p, "arm": tracking.OURS, "device": "cpu", "error": None,
                                 "result": json.dumps(outcomes[p])} for p in products])
        recorded, failures = record_results(lake, tracking.OURS, 7, specs, results, lambda _: None)
        assert (recorded, failures) == (2, [])
        assert [h["operation"] for h in lake.history("adapters")].count("WRITE") == 1  # one write for both

        client = MlflowClient(url)
        adapters = lake.table("adapters").toPandas().set_index("product_id")
        for product in products:
            row, outcome = adapters.loc[product], outcomes[product]
            assert row.model_version == "1" and row.training_set_version == 7
            registered = client.get_model_version_by_alias(row.model_name, "candidate")
            assert str(registered.version) == "1" and registered.run_id == row.run_id == outcome["run_id"]
            assert registered.tags[tracking.TRAINING_KEY] == f"{product}|ours|7|digest-{product}"
            run = client.get_run(row.run_id)
            assert run.data.params["token"] == "tok0" and run.data.params["steps"] == str(TRAINING["steps"])
            assert run.data.tags["task_host"] == "bench" and json.loads(run.data.tags["token_scores"])["tok1"] == 1.5
            assert [m.value for m in client.get_metric_history(row.run_id, "loss")] == outcome["losses"]
            assert [m.step for m in client.get_metric_history(row.run_id, "val_clip_i")] == [3, 6]
            nested = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{row.run_id}'")
            assert sorted(r.data.params["token"] for r in nested) == ["tok0", "tok1"]
            assert all(r.data.metrics["sweep_score"] == 1.5 and r.info.status == "FINISHED" for r in nested)
            assert [a.path for a in client.list_artifacts(row.run_id, "validation")] == ["validation/0.png"]
            assert not (tmp_path / "work" / product).exists()  # logged: the work folder went
            # What a run killed before `adapters` was written finds by the training key: the same row.
            version, found = tracking.registered_versions({row.model_name: f"{product}|ours|7|digest-{product}"})[
                row.model_name]
            again = _recorded(_adapter_row(product, tracking.OURS, 7, f"digest-{product}"), version, found)
            assert (again["run_id"], again["token"], again["final_loss"]) == (row.run_id, row.token, row.final_loss)
        # A re-run plans no training: both versions are registered (and already recorded).
        assert plan_products(lake, products, 7, digests, tracking.OURS, lambda _: None) == (0, [])
