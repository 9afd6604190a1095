"""Training job: `training_images` (a pinned Delta version) -> one LoRA adapter per product,
tracked and registered in MLflow, recorded in `adapters`.

Fan-out: one Spark task per product (training/fanout.py), `training.parallel_products` at once,
each on its own device (udfs.device.task_device). A task trains one product from the rows packed
into its input row, logs its MLflow run (params, per-step losses, nested sweep runs, validation
images, the adapter as an mlflow.diffusers model) and returns a result row; the driver then
registers the logged adapters and MERGEs `adapters` once per batch, so its serial work per
product is a few registry calls (bench/bench_driver.py), on 1 GPU or 64. A product whose adapter exists for the same training-set version and config is skipped;
a failure on one product is recorded in `quarantine` and the others go on; a killed run resumes
from its last checkpoint under `<home>/training/`.

The baseline arm (`run_baseline_training`) trains the same products with standard DreamBooth +
LoRA (its own [baseline] settings: rank 64, the prior-preservation loss) on the reference photos
only (no augmentation, no filtering, no captions, no token sweep), registered as
`recontext-<product_id>-baseline`, so evaluation compares the two arms.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import resource
import socket
import shutil
import time
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from deltalake import DeltaTable
from PIL import Image

from etl.image_sets import IMAGE_BYTES
from core.settings import Settings, TrainingSettings
from etl.lakehouse import Lakehouse
from etl.metrics import cosine
from etl.progress import Progress
from etl.prompt_bank import approved_prompts, resolved_types
from etl.prompt_bank import class_noun as noun_of
from etl.step import REGISTERED_MODELS, Step
from core.tables import sql_list
from etl import tracking
from training.fanout import fan_out, parallelism, with_slots
from training.lora import Example, instance_prompt, lora_alpha, train_lora
from training.tokens import by_association, rare_token_candidates
from udfs.device import task_device
from udfs.diffusion import adapter_loaded
from udfs.imaging import decode_rgb
from udfs.zoo import ModelZoo

log = logging.getLogger(__name__)
STAGE, BASELINE_STAGE = "train", "train_baseline"


def arm_config(settings: Settings, arm: str) -> TrainingSettings:
    """The training settings of an arm: [training] for ours; for the baseline its own rank,
    alpha, steps and learning rate from [baseline] (the rest follows [training])."""
    if arm == tracking.OURS:
        return settings.training
    baseline = settings.baseline
    return dataclasses.replace(settings.training, rank=baseline.rank, alpha=baseline.alpha, steps=baseline.steps,
                               learning_rate=baseline.learning_rate, token_candidates=1)


# Training settings that never change an adapter's weights, left out of its identity so that
# changing them retrains nothing: bookkeeping (MLflow experiment, checkpoints, validation during
# training, promotion), how the work is split (products at once, VAE micro-batches, gradient
# checkpointing: the same arithmetic), and the training-set filter, whose effect is the selected
# rows that each product's digest hashes. A setting not named here is in the identity.
NOT_IN_ADAPTER_IDENTITY = frozenset({
    "experiment", "checkpoint_every", "checkpoints_keep", "validate_every", "auto_promote",
    "parallel_products", "vae_batch_size", "gradient_checkpointing",
    "iou_threshold", "min_score_vs_references", "min_score", "positives_per_kind", "score_weights"})


def config_hash(lake: Lakehouse, zoo: ModelZoo, arm: str = tracking.OURS) -> str:
    """The identity of an arm's adapters: the settings that change their weights, the base model."""
    fields = {k: v for k, v in asdict(arm_config(lake.settings, arm)).items() if k not in NOT_IN_ADAPTER_IDENTITY}
    fields = {**fields, "base_model": zoo.name("text2img"),
              **({"baseline": asdict(lake.settings.baseline)} if arm == tracking.BASELINE else {})}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_training(lake: Lakehouse, zoo: ModelZoo, products: list[str] | None = None,
                 progress=print) -> dict[str, int]:
    """Train the products whose selected training rows or training settings changed since their
    last adapter (the digest covers both), on a pinned version of `training_images`."""
    version = DeltaTable(lake.location("training_images")).version()
    pinned = lake.at_version("training_images", version)
    pinned.where("selected").createOrReplaceTempView("_training_set")
    selected = lake.spark.sql("SELECT product_id, image_id, is_positive, caption FROM _training_set").toPandas()
    digests = _digests(config_hash(lake, zoo), selected)
    done = _trained(lake, tracking.OURS)
    todo = sorted(p for p, d in digests.items() if (p, d) not in done)
    examples = lake.spark.sql(f"""
        SELECT t.product_id, array_sort(collect_list(named_struct('image_id', t.image_id, 'kind', t.kind,
               'is_positive', t.is_positive, 'caption', t.caption, 'image', i.image))) AS examples
        FROM _training_set t JOIN ({IMAGE_BYTES}) i ON i.image_id = t.image_id GROUP BY t.product_id""")
    return _train_products(lake, zoo, _only(todo, products or lake.products), examples, version, digests,
                           tracking.OURS, progress)


def _digests(base_digest: str, rows: pd.DataFrame) -> dict[str, str]:
    """Per product: hash of the training settings and the product's training rows, so a change
    to one product retrains that product only."""
    rows = rows.astype(str).sort_values(list(rows.columns))
    return {p: hashlib.sha256((base_digest + group.to_csv(index=False)).encode()).hexdigest()[:16]
            for p, group in rows.groupby("product_id")}


def _trained(lake: Lakehouse, arm: str) -> set[tuple[str, str]]:
    return {(r["product_id"], r["config_hash"]) for r in lake.spark.sql(
        f"SELECT product_id, config_hash FROM adapters WHERE arm = '{arm}'").collect()}


def run_baseline_training(lake: Lakehouse, zoo: ModelZoo, products: list[str] | None = None,
                          progress=print) -> dict[str, int]:
    """The baseline arm for every product that has an adapter of ours: references only."""
    if not lake.settings.evaluation.baseline:
        return {"adapters": 0}
    version = DeltaTable(lake.location("product_images")).version()
    references = lake.spark.sql(
        f"""SELECT i.product_id, i.image_id FROM product_images i
            WHERE i.product_id IN (SELECT product_id FROM adapters WHERE arm = '{tracking.OURS}')""").toPandas()
    digests = _digests(config_hash(lake, zoo, tracking.BASELINE), references)  # new photos retrain the baseline
    done = _trained(lake, tracking.BASELINE)
    todo = sorted(p for p, d in digests.items() if (p, d) not in done)
    # The baseline's training set: the product's reference photos, no captions.
    examples = lake.spark.sql("""
        SELECT product_id, array_sort(collect_list(named_struct('image_id', image_id, 'kind', 'reference',
               'is_positive', true, 'caption', CAST(NULL AS STRING), 'image', image))) AS examples
        FROM product_images GROUP BY product_id""")
    return _train_products(lake, zoo, _only(todo, products or lake.products), examples, version, digests,
                           tracking.BASELINE, progress)


def _only(todo: list[str], products) -> list[str]:
    return [p for p in todo if p in set(products)] if products else todo


RESULT_SCHEMA = "product_id STRING, arm STRING, device STRING, error STRING, result STRING"


def _train_products(lake: Lakehouse, zoo: ModelZoo, todo: list[str], examples, version: int,
                    digests: dict[str, str], arm: str, progress) -> dict[str, int]:
    """Driver: skip what a killed run registered, fan the rest out (one task per product), then
    log, register and record each result in product order."""
    written, specs = plan_products(lake, todo, version, digests, arm, progress)
    failures = []
    if specs:
        rows = lake.spark.createDataFrame(with_slots(pd.DataFrame(specs)), "product_id STRING, spec STRING, slot BIGINT")
        parallel = parallelism(lake.settings)
        progress(f"  training {len(specs)} product(s) ({arm}) in {min(parallel, len(specs))} parallel task(s)")
        results = fan_out(lake.spark, rows.join(examples, "product_id"), parallel,
                          functools.partial(_train_task, lake.settings, zoo, arm), RESULT_SCHEMA)
        recorded, failures = record_results(lake, arm, version, specs, results, progress)
        written += recorded
    return {"adapters": written, "quarantine": lake.quarantine(STAGE if arm == tracking.OURS else BASELINE_STAGE,
                                                                failures)}


def plan_products(lake: Lakehouse, todo: list[str], version: int, digests: dict[str, str], arm: str,
                  progress) -> tuple[int, list[dict]]:
    """Driver, before the tasks: record the adapters a killed run registered but did not record;
    returns how many, and the task spec of every other product (with the tracking store its task
    logs to: on Spark a task runs in a worker process that has not configured MLflow)."""
    import mlflow

    experiment = tracking.configure(lake.settings)
    store = {"tracking_uri": mlflow.get_tracking_uri(), "experiment": experiment}
    recorded, specs = [], []
    scenes = approved_prompts(lake, "scene")
    titles, types = _titles_and_types(lake, todo)
    rows = {p: _adapter_row(p, arm, version, digests[p]) for p in todo}
    registered = tracking.registered_versions({r["model_name"]: _training_key(r) for r in rows.values()})
    for product_id, row in rows.items():
        if row["model_name"] in registered:  # a killed run registered it but did not record it: record, don't retrain
            model_version, run = registered[row["model_name"]]
            progress(f"  train {product_id} ({arm}): version {model_version} is already registered; recording it")
            recorded.append(_recorded(row, model_version, run))
            continue
        product_type = types.get(product_id)
        specs.append({"product_id": product_id, "spec": json.dumps({
            "arm": arm, "version": version, "digest": digests[product_id], "title": titles.get(product_id, product_id),
            "class_noun": noun_of(product_type),
            "scenes": scenes[scenes.product_type == product_type].text.head(
                arm_config(lake.settings, arm).validation_images).tolist(),
            "training_key": _training_key(row), **store,
            "work": str(lake.settings.home / "training" / product_id / f"{arm}-v{version}-{digests[product_id]}")})})
    return _write(lake, recorded), specs


# Registry calls in flight at once against a tracking server, so round trips overlap instead of
# queueing; the embedded SQLite store has no round trips and one writer at a time.
REGISTERING_THREADS = 8


def record_results(lake: Lakehouse, arm: str, version: int, specs: list[dict], results: pd.DataFrame,
                   progress) -> tuple[int, list[tuple]]:
    """Driver, after the tasks (`results`: RESULT_SCHEMA rows, each task's run already logged):
    register each product's adapter (several at once: each is a few round trips to the
    registry), then record them all in `adapters` in one write (a run killed before it finds the
    registered versions by their training key); returns the rows written and the failures
    (quarantine tuples)."""
    from concurrent.futures import ThreadPoolExecutor

    config = arm_config(lake.settings, arm)
    spec_of = {s["product_id"]: json.loads(s["spec"]) for s in specs}

    def register(result) -> dict:
        if result.error is not None:
            raise TaskFailed(result.error)
        spec, outcome = spec_of[result.product_id], json.loads(result.result)
        model_version = tracking.register_adapter(outcome["model_uri"], result.product_id, arm,
                                                  spec["training_key"], config.auto_promote)
        return _registered_row(_adapter_row(result.product_id, arm, version, spec["digest"]), outcome,
                               model_version, result.device)

    def attempt(result):
        try:
            return register(result), None
        except Exception as err:  # noqa: BLE001 - one product's failure never stops the others
            return None, err

    rows, failures = [], []
    meter = Progress(len(results), f"products ({arm})", progress)
    ordered = list(results.sort_values("product_id").itertuples(index=False))
    with ThreadPoolExecutor(REGISTERING_THREADS if tracking.is_server() else 1) as pool:
        for result, (row, err) in meter.track(zip(ordered, pool.map(attempt, ordered)), lambda r: r[0].product_id):
            if err is None:
                progress(f"  train {result.product_id} ({arm}): token '{row['token']}', {row['images']} examples, "
                         f"{config.steps} steps on {result.device}, version {row['model_version']}")
                rows.append(row)
                continue
            log.error("training %s (%s) failed: %s", result.product_id, arm, err)
            failures.append((result.product_id, f"{arm}:training", "training_failed",
                             f"training the {arm} adapter failed ({err}); it is retried on the next run"))
    return _write(lake, rows), failures


class TaskFailed(RuntimeError):
    """A product's task failed; its message is the task's `Type: message`."""


def _write(lake: Lakehouse, rows: list[dict]) -> int:
    """`adapters` rows in one MERGE."""
    return lake.upsert_rows("adapters", pd.DataFrame(rows).astype({"images": "int32"})) if rows else 0


def _adapter_row(product_id: str, arm: str, version: int, digest: str) -> dict:
    return {"product_id": product_id, "arm": arm, "training_set_version": version, "config_hash": digest,
            "model_name": tracking.registered_model_name(product_id, arm),
            "alias": tracking.CHAMPION if arm == tracking.BASELINE else tracking.CANDIDATE}


def _training_key(row: dict) -> str:
    return f"{row['product_id']}|{row['arm']}|{row['training_set_version']}|{row['config_hash']}"


def _train_task(settings: Settings, zoo: ModelZoo, arm: str, row, _state: dict) -> dict:
    """Spark task: one product on this task's device; a failure becomes the row's `error`."""
    device = task_device(zoo.models.device, int(row.slot))
    try:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        on_device = zoo.on(device)
        # Where the task ran (MLflow tags): on Spark a Python worker process, on the embedded engine
        # a thread of its server process.
        process = {"task_host": socket.gethostname(), "task_pid": os.getpid(), "task_started": time.time()}
        started = time.perf_counter()
        with on_device.exclusive("text2img"):  # the worker's one base pipeline: one product at a time
            outcome = train_product(settings, on_device, row.product_id, pd.DataFrame(list(row.examples)),
                                    json.loads(row.spec))
        outcome["task_seconds"] = time.perf_counter() - started
        outcome["process"] = process
        outcome["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else
                                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        outcome.update(log_training_run(settings, zoo, row.product_id, json.loads(row.spec), outcome, device))
        return {"product_id": row.product_id, "arm": arm, "device": device, "error": None,
                "result": json.dumps(outcome)}
    except Exception as err:  # noqa: BLE001 - reported to the driver, which quarantines the product
        log.exception("training %s (%s) on %s failed", row.product_id, arm, device)
        return {"product_id": row.product_id, "arm": arm, "device": device,
                "error": f"{type(err).__name__}: {err}", "result": None}


def train_product(settings: Settings, zoo: ModelZoo, product_id: str, rows: pd.DataFrame, spec: dict) -> dict:
    """One adapter from `rows` (image, kind, is_positive, caption): token sweep (ours only),
    training with checkpoints and validation; writes under spec["work"], touches no table or
    tracking store, and returns what its task logs (`log_training_run`) and the driver records."""
    arm, class_noun = spec["arm"], spec["class_noun"]
    config = arm_config(settings, arm)
    references = [decode_rgb(b) for b in rows[rows.kind == "reference"].image]
    job = _ProductTraining(settings, zoo, product_id, class_noun, rows, _embed(zoo, references),
                           Path(spec["work"]), spec["scenes"], config)
    candidates = _candidate_tokens(zoo, product_id, spec["title"], class_noun, config.token_candidates)
    token, sweep = job.sweep(candidates)
    prior = job.class_examples() if arm == tracking.BASELINE and settings.baseline.prior_preservation else []
    result = train_lora(job.pipeline, job.examples_for(token), config, job.work / "final", prior=prior,
                        prior_loss_weight=settings.baseline.prior_loss_weight,
                        validate=job.validator(token, save_images=True))
    validations = result.validations
    if not validations:
        with adapter_loaded(job.pipeline, result.adapter_dir) as pipeline:
            validations = [{"step": config.steps, **job.validator(token, save_images=True)(pipeline, config.steps)}]
    return {"token": token, "tried_tokens": candidates, "sweep": sweep, "losses": result.losses,
            "learning_rates": result.learning_rates, "grad_norms": result.grad_norms,
            "validations": validations, "adapter_dir": str(result.adapter_dir), "examples": len(rows),
            "positives": int(rows.is_positive.sum())}


def log_training_run(settings: Settings, zoo: ModelZoo, product_id: str, spec: dict, outcome: dict,
                     device: str) -> dict:
    """Task, after training: the product's MLflow run (params, per-step loss, nested sweep runs,
    validation metrics and images) and its adapter logged as an mlflow.diffusers model, in the
    store the driver named (spec); then the work folder goes. Returns the run id, the logged
    model's URI (the driver registers it) and the final loss."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    arm, experiment = spec["arm"], spec["experiment"]
    config = arm_config(settings, arm)
    tracking.connect(spec["tracking_uri"])
    token_scores = {t: s["sweep_score"] for t, s in outcome["sweep"].items()}
    params = {**{k: str(v) for k, v in asdict(config).items()}, "lora_alpha": lora_alpha(config),
              "product_id": product_id, "arm": arm,
              "training_set_version": spec["version"], "class_noun": spec["class_noun"],
              "base_model": zoo.name("text2img"), "examples": outcome["examples"], "positives": outcome["positives"],
              "device": device,
              **({f"baseline.{k}": str(v) for k, v in asdict(settings.baseline).items()}
                 if arm == tracking.BASELINE else {})}
    run_name = product_id if arm == tracking.OURS else f"{product_id} {arm}"
    # Batched: a tracking server answers each call over the network.
    client, now = mlflow.MlflowClient(), int(time.time() * 1000)
    with mlflow.start_run(experiment_id=experiment, run_name=run_name,
                          tags={tracking.TRAINING_KEY: spec["training_key"]}) as run:
        for token, scores in outcome["sweep"].items():  # a nested run per token tried
            child = client.create_run(experiment, run_name=f"{product_id} token {token}",
                                      tags={MLFLOW_PARENT_RUN_ID: run.info.run_id})
            tracking.log_batch(client, child.info.run_id, params={"token": token, "steps": config.sweep_steps},
                               metrics=[Metric(f"val_{k}", scores[k], now, config.sweep_steps)
                                        for k in ("clip_i", "dino_i")]
                               + [Metric(k, v, now, 0) for k, v in scores.items()
                                  if k.startswith("sweep_") and v is not None])
            client.set_terminated(child.info.run_id)
        per_step = {"loss": outcome["losses"], "lr": outcome["learning_rates"], "grad_norm": outcome["grad_norms"]}
        final_loss = float(np.mean(outcome["losses"][-10:]))
        metrics = ([Metric(name, value, now, step) for name, values in per_step.items()
                    for step, value in enumerate(values, start=1)]
                   + [Metric(f"val_{k}", v, now, validation["step"]) for validation in outcome["validations"]
                      for k, v in validation.items() if k != "step"]
                   + [Metric(k, v, now, 0) for k, v in (("final_loss", final_loss),
                                                        ("task_seconds", outcome["task_seconds"]),
                                                        ("peak_memory_mb", outcome["peak_memory_mb"]))])
        tracking.log_batch(client, run.info.run_id, metrics=metrics,
                           params={**params, "token": outcome["token"],
                                   "tried_tokens": ",".join(outcome["tried_tokens"])},
                           tags={"token_scores": json.dumps(token_scores, sort_keys=True), **outcome["process"]})
        images = Path(spec["work"]) / "validation"
        if images.is_dir():
            mlflow.log_artifacts(str(images), artifact_path="validation")
        model_uri = tracking.log_adapter(outcome["adapter_dir"], str(zoo.path("text2img")))
    # Logged: MLflow holds the adapter; the checkpoints (~150 MB each at rank 64) and validation
    # images go. A run killed before registration trains again (its logged run stays unregistered).
    shutil.rmtree(spec["work"], ignore_errors=True)
    return {"run_id": run.info.run_id, "model_uri": model_uri, "final_loss": final_loss,
            "token_scores": json.dumps(token_scores, sort_keys=True)}


def _registered_row(row: dict, outcome: dict, model_version: str, device: str) -> dict:
    """The `adapters` row of a task's registered adapter."""
    final = outcome["validations"][-1]
    return {**row, "token": outcome["token"], "token_scores": outcome["token_scores"], "run_id": outcome["run_id"],
            "model_version": model_version, "final_loss": outcome["final_loss"], "clip_i": float(final["clip_i"]),
            "dino_i": float(final["dino_i"]), "images": outcome["examples"], "device": device}


SHORTLIST = 8  # candidates drawn per token tried, before ranking them by association


def _candidate_tokens(zoo: ModelZoo, product_id: str, title: str, class_noun: str, count: int) -> list[str]:
    """The tokens the sweep tries: rare candidates, the `count` most associated with the title."""
    words = f"{title} {class_noun} {product_id}".replace("-", " ").split()
    if count <= 1:
        return rare_token_candidates(product_id, words, 1)
    shortlist = rare_token_candidates(product_id, words, count * SHORTLIST)
    return [t for t, _ in by_association(shortlist, class_noun, title, zoo.load("clip").embed_texts)[:count]]


def _titles_and_types(lake: Lakehouse, products: list[str]) -> tuple[dict[str, str], dict[str, str | None]]:
    """Title and resolved type of each of `products`, in one query each."""
    if not products:
        return {}, {}
    listed = sql_list(products)
    titles = {r["product_id"]: r["title"] for r in lake.spark.sql(
        f"SELECT product_id, title FROM products WHERE product_id IN ({listed})").collect()}
    types = {r["product_id"]: r["product_type"] for r in resolved_types(lake).where(
        f"product_id IN ({listed})").collect()}
    return titles, types


def _recorded(row: dict, model_version: str, run) -> dict:
    """The adapters row of a version a killed run registered, from its MLflow run."""
    return {**row, "token": run.data.params["token"], "token_scores": run.data.tags.get("token_scores", "{}"),
            "run_id": run.info.run_id, "model_version": model_version,
            "final_loss": run.data.metrics["final_loss"], "clip_i": run.data.metrics["val_clip_i"],
            "dino_i": run.data.metrics["val_dino_i"], "images": int(run.data.params["examples"]),
            "device": run.data.params.get("device")}


@dataclass
class _ProductTraining:
    """What one product's sweep and training share: its examples, references and work folder."""

    settings: Settings
    zoo: ModelZoo
    product_id: str
    class_noun: str
    rows: pd.DataFrame
    reference_vectors: dict
    work: Path
    scenes: list[str]  # approved scene prompts of the product's type: the sweep checks CLIP-T on them
    config: TrainingSettings  # the arm's (arm_config)

    @property
    def pipeline(self):
        """The worker's one loaded base pipeline (sweep, training, validation, class images); the
        task holds zoo.exclusive("text2img") around the product."""
        return self.zoo.load("text2img")

    def examples_for(self, token: str) -> list[Example]:
        return [Example(decode_rgb(r.image), instance_prompt(token, self.class_noun, r.caption) if r.is_positive
                        else (r.caption or self.class_noun)) for r in self.rows.itertuples()]

    def validator(self, token: str, save_images: bool):
        config = self.config

        def validate(pipeline, step: int) -> dict:
            generator = torch.Generator("cpu").manual_seed(config.seed)
            images = pipeline(prompt=[instance_prompt(token, self.class_noun)] * config.validation_images,
                              num_inference_steps=self.settings.augment.steps, height=config.resolution,
                              width=config.resolution, generator=generator).images
            if save_images:  # the task logs them with the run
                (self.work / "validation").mkdir(parents=True, exist_ok=True)
                for i, image in enumerate(images):
                    image.save(self.work / "validation" / f"step_{step:06d}_{i}.png")
            return _scores(self.zoo, images, self.reference_vectors)
        return validate

    def class_examples(self) -> list[Example]:
        """DreamBooth's prior-preservation images: what the base model makes of "a photo of a
        <class>" (baseline.class_images of them, seeded), captioned with that prompt."""
        count, prompt = self.settings.baseline.class_images, f"a photo of a {self.class_noun}"
        pipeline = self.pipeline
        generator = torch.Generator("cpu").manual_seed(self.config.seed)
        images = pipeline(prompt=[prompt] * count, num_inference_steps=self.settings.augment.steps,
                          height=self.config.resolution, width=self.config.resolution, generator=generator).images
        return [Example(image, prompt) for image in images]

    def scene_clip_t(self, token: str, pipeline) -> float | None:
        """Mean CLIP-T of images made from "a photo of <token> <class>, <scene>" against the
        scene prompt without the token: does the token still follow a new scene, or has it
        memorized the references?"""
        if not self.scenes:
            return None
        config = self.config
        generator = torch.Generator("cpu").manual_seed(config.seed)
        images = pipeline(prompt=[f"{instance_prompt(token, self.class_noun)}, {scene}" for scene in self.scenes],
                          num_inference_steps=self.settings.augment.steps, height=config.resolution,
                          width=config.resolution, generator=generator).images
        clip = self.zoo.load("clip")
        texts = clip.embed_texts([f"a photo of a {self.class_noun}, {scene}" for scene in self.scenes])
        return float(np.mean(np.sum(clip.embed_images(images) * texts, axis=1)))

    def sweep(self, candidates: list[str]) -> tuple[str, dict[str, dict]]:
        """The rare-token sweep: a short run per candidate; the best validation CLIP-I + DINO on
        the instance prompt plus CLIP-T on scene prompts wins. Returns the token and, per token
        tried, its validation scores and `sweep_score` (none for a single candidate)."""
        if len(candidates) == 1:
            return candidates[0], {}
        config, tried = self.config, {}
        for token in candidates:
            result = train_lora(self.pipeline, self.examples_for(token), config, self.work / "sweep" / token,
                                steps=config.sweep_steps)
            with adapter_loaded(self.pipeline, result.adapter_dir) as pipeline:
                scores = self.validator(token, save_images=False)(pipeline, config.sweep_steps)
                scene_clip_t = self.scene_clip_t(token, pipeline)
            tried[token] = {**scores, "sweep_score": scores["clip_i"] + scores["dino_i"] + (scene_clip_t or 0.0),
                            "sweep_scene_clip_t": scene_clip_t}
        return max(candidates, key=lambda t: (tried[t]["sweep_score"], t)), tried


def _embed(zoo: ModelZoo, images: list[Image.Image]) -> dict[str, np.ndarray]:
    return {role: zoo.load(role).embed_images(images) for role in ("clip", "dino")}


def _scores(zoo: ModelZoo, images: list[Image.Image], references: dict[str, np.ndarray]) -> dict[str, float]:
    """DreamBooth CLIP-I and DINO of generated images against the product's references."""
    generated = _embed(zoo, images)
    return {f"{role}_i": float(cosine(generated[role], references[role]).mean()) for role in ("clip", "dino")}


TRAIN = Step("train", run_training,
             reads=("training_images", "product_images", "synthetic_images", "products", "product_classes",
                    "prompt_bank"),
             writes=("adapters", "quarantine", REGISTERED_MODELS), roles=("text2img", "clip", "dino"),
             description="a DreamBooth-style LoRA per product (rare-token sweep), tracked and registered in MLflow")
TRAIN_BASELINE = Step("train_baseline", run_baseline_training,
                      reads=("adapters", "product_images", "products", "product_classes", "prompt_bank"),
                      writes=("adapters", "quarantine", REGISTERED_MODELS), roles=("text2img", "clip", "dino"),
                      description="the baseline arm: standard DreamBooth + LoRA (rank 64, prior preservation) "
                                  "on the references")
