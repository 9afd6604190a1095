"""Training job: `training_images` (a pinned Delta version) -> one LoRA adapter per product,
tracked and registered in MLflow, recorded in `adapters`.

Fan-out is a driver loop over products (one product at a time uses the whole machine or GPU;
on a cluster, run one job per product group, e.g. a Databricks for-each task). A product whose
adapter exists for the same training-set version and config is skipped; a failure on one
product is recorded in `quarantine` and the others go on; a killed run resumes from its last
checkpoint under `<home>/training/`.

The baseline arm (`run_baseline_training`) trains the same products with standard DreamBooth +
LoRA (its own [baseline] settings: rank 64, the prior-preservation loss) on the reference photos
only (no augmentation, no filtering, no captions, no token sweep), registered as
`recontext-<product_id>-baseline`, so evaluation compares the two arms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from deltalake import DeltaTable
from PIL import Image

from etl.image_sets import IMAGE_BYTES
from etl.config import TrainingSettings
from etl.lakehouse import Lakehouse
from etl.metrics import cosine
from etl.progress import Progress
from etl.prompt_bank import approved_prompts, resolved_types
from etl.prompt_bank import class_noun as noun_of
from etl.step import REGISTERED_MODELS, Step
from etl.tables import sql_literal
from etl import tracking
from training.lora import Example, instance_prompt, lora_alpha, train_lora
from training.tokens import by_association, rare_token_candidates
from udfs.diffusion import adapter_loaded
from udfs.imaging import decode_rgb
from udfs.zoo import ModelZoo

log = logging.getLogger(__name__)
STAGE, BASELINE_STAGE = "train", "train_baseline"


def arm_config(lake: Lakehouse, arm: str) -> TrainingSettings:
    """The training settings of an arm: [training] for ours; for the baseline its own rank,
    alpha, steps and learning rate from [baseline] (the rest follows [training])."""
    if arm == tracking.OURS:
        return lake.settings.training
    baseline = lake.settings.baseline
    return dataclasses.replace(lake.settings.training, rank=baseline.rank, alpha=baseline.alpha, steps=baseline.steps,
                               learning_rate=baseline.learning_rate, token_candidates=1)


def config_hash(lake: Lakehouse, zoo: ModelZoo, arm: str = tracking.OURS) -> str:
    fields = {**asdict(arm_config(lake, arm)), "base_model": zoo.name("text2img"),
              **({"baseline": asdict(lake.settings.baseline)} if arm == tracking.BASELINE else {})}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_training(lake: Lakehouse, zoo: ModelZoo, products: list[str] | None = None,
                 progress=print) -> dict[str, int]:
    """Train the products whose selected training rows or training settings changed since their
    last adapter (the digest covers both), on a pinned version of `training_images`."""
    zoo.check("text2img", "clip", "dino")
    version = DeltaTable(lake.location("training_images")).version()
    pinned = lake.spark.read.format("delta").option("versionAsOf", version).load(lake.location("training_images"))
    pinned.where("selected").createOrReplaceTempView("_training_set")
    selected = lake.spark.sql("SELECT product_id, image_id, is_positive, caption FROM _training_set").toPandas()
    digests = _digests(config_hash(lake, zoo), selected)
    done = _trained(lake, tracking.OURS)
    todo = sorted(p for p, d in digests.items() if (p, d) not in done)
    return _train_products(lake, zoo, _only(todo, products or lake.products),
                           lambda p: (*_examples(lake, p), version, digests[p]), tracking.OURS, progress)


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
    zoo.check("text2img", "clip", "dino")
    version = DeltaTable(lake.location("product_images")).version()
    references = lake.spark.sql(
        f"""SELECT i.product_id, i.image_id FROM product_images i
            WHERE i.product_id IN (SELECT product_id FROM adapters WHERE arm = '{tracking.OURS}')""").toPandas()
    digests = _digests(config_hash(lake, zoo, tracking.BASELINE), references)  # new photos retrain the baseline
    done = _trained(lake, tracking.BASELINE)
    todo = sorted(p for p, d in digests.items() if (p, d) not in done)
    return _train_products(lake, zoo, _only(todo, products or lake.products),
                           lambda p: (*_reference_examples(lake, p), version, digests[p]), tracking.BASELINE,
                           progress)


def _only(todo: list[str], products) -> list[str]:
    return [p for p in todo if p in set(products)] if products else todo


def _train_products(lake: Lakehouse, zoo: ModelZoo, todo: list[str], inputs, arm: str, progress) -> dict[str, int]:
    experiment = tracking.configure(lake.settings)
    written, failures = 0, []
    for product_id in Progress(len(todo), f"products ({arm})", progress).track(todo):
        try:
            rows, references, version, digest = inputs(product_id)
            with zoo.exclusive("text2img"):  # the worker's one base pipeline, one product at a time
                row = train_product(lake, zoo, product_id, rows, references, version, digest, experiment, arm,
                                    progress)
            written += lake.upsert_rows("adapters", pd.DataFrame([row]).astype({"images": "int32"}))
        except Exception as err:  # noqa: BLE001 - one product's failure never stops the others
            log.exception("training %s (%s) failed", product_id, arm)
            failures.append((product_id, f"{arm}:training", "training_failed",
                             f"training the {arm} adapter failed ({type(err).__name__}: {err}); "
                             "it is retried on the next run"))
    return {"adapters": written, "quarantine": lake.quarantine(STAGE if arm == tracking.OURS else BASELINE_STAGE,
                                                                failures)}


def _examples(lake: Lakehouse, product_id: str) -> tuple[pd.DataFrame, list[Image.Image]]:
    rows = lake.spark.sql(
        f"""SELECT t.image_id, t.kind, t.is_positive, t.caption, i.image FROM _training_set t
            JOIN ({IMAGE_BYTES}) i ON i.image_id = t.image_id
            WHERE t.product_id = {sql_literal(product_id)} ORDER BY t.image_id""").toPandas()
    references = [decode_rgb(b) for b in rows[rows.kind == "reference"].image]
    return rows, references


def _reference_examples(lake: Lakehouse, product_id: str) -> tuple[pd.DataFrame, list[Image.Image]]:
    """The baseline's training set: the product's reference photos, no captions."""
    rows = lake.spark.sql(
        f"""SELECT image_id, 'reference' AS kind, true AS is_positive, CAST(NULL AS STRING) AS caption, image
            FROM product_images WHERE product_id = {sql_literal(product_id)} ORDER BY image_id""").toPandas()
    return rows, [decode_rgb(b) for b in rows.image]


def train_product(lake: Lakehouse, zoo: ModelZoo, product_id: str, rows: pd.DataFrame, references: list[Image.Image],
                  version: int, digest: str, experiment: str, arm: str = tracking.OURS, progress=print) -> dict:
    """One adapter from `rows` (image, is_positive, caption): token sweep (ours only), training,
    validation, registration; returns the `adapters` row."""
    import mlflow

    config = arm_config(lake, arm)
    title, product_type = _title_and_type(lake, product_id)
    class_noun = noun_of(product_type)
    scenes = approved_prompts(lake, "scene").query("product_type == @product_type").text.head(
        config.validation_images).tolist()
    job = _ProductTraining(lake, zoo, product_id, class_noun, rows, _embed(zoo, references),
                           lake.settings.home / "training" / product_id / f"{arm}-v{version}-{digest}", scenes, config)
    row = {"product_id": product_id, "arm": arm, "training_set_version": version, "config_hash": digest,
           "model_name": tracking.registered_model_name(product_id, arm),
           "alias": tracking.CHAMPION if arm == tracking.BASELINE else tracking.CANDIDATE, "images": len(rows)}
    training_key = f"{product_id}|{arm}|{version}|{digest}"
    registered = tracking.registered_version(row["model_name"], training_key)
    if registered is not None:  # a killed run registered it but did not record it: record, don't retrain
        progress(f"  train {product_id} ({arm}): version {registered[0]} is already registered; recording it")
        return _recorded(row, *registered)
    candidates = _candidate_tokens(zoo, product_id, title, class_noun, config.token_candidates)  # 1 for the baseline
    params = {**{k: str(v) for k, v in asdict(config).items()}, "lora_alpha": lora_alpha(config),
              "product_id": product_id, "arm": arm,
              "training_set_version": version, "class_noun": class_noun, "base_model": zoo.name("text2img"),
              "examples": len(rows), "positives": int(rows.is_positive.sum()),
              **({f"baseline.{k}": str(v) for k, v in asdict(lake.settings.baseline).items()}
                 if arm == tracking.BASELINE else {})}
    run_name = product_id if arm == tracking.OURS else f"{product_id} {arm}"
    with mlflow.start_run(experiment_id=experiment, run_name=run_name, log_system_metrics=True,
                          tags={tracking.TRAINING_KEY: training_key}) as run:
        mlflow.log_params(params)
        token, token_scores = job.sweep(candidates, experiment)
        mlflow.log_params({"token": token, "tried_tokens": ",".join(candidates)})
        mlflow.set_tag("token_scores", json.dumps(token_scores, sort_keys=True))
        progress(f"  train {product_id} ({arm}): token '{token}', {len(rows)} examples, {config.steps} steps")
        prior = job.class_examples() if arm == tracking.BASELINE and lake.settings.baseline.prior_preservation else []
        result = train_lora(job.pipeline, job.examples_for(token), config, job.work / "final", prior=prior,
                            prior_loss_weight=lake.settings.baseline.prior_loss_weight,
                            on_step=lambda step, loss: mlflow.log_metric("loss", loss, step=step),
                            validate=job.validator(token, log_images=True))
        if result.validations:
            final = result.validations[-1]
        else:
            with adapter_loaded(job.pipeline, result.adapter_dir) as pipeline:
                final = job.validator(token, log_images=True)(pipeline, config.steps)
        final_loss = float(np.mean(result.losses[-10:]))
        mlflow.log_metrics({"final_loss": final_loss})
        for step, (lr, norm) in enumerate(zip(result.learning_rates, result.grad_norms), start=1):
            mlflow.log_metrics({"lr": lr, "grad_norm": norm}, step=step)
        model_version = tracking.register_adapter(result.adapter_dir, job.base, product_id, arm, config.auto_promote)
        # Registered: MLflow holds the adapter; the checkpoints (~150 MB each at rank 64) and
        # sweep runs go. A run killed before `adapters` records it finds the version by its key.
        shutil.rmtree(job.work, ignore_errors=True)
        return {**row, "token": token, "token_scores": json.dumps(token_scores, sort_keys=True),
                "run_id": run.info.run_id, "model_version": model_version, "final_loss": final_loss,
                "clip_i": float(final["clip_i"]), "dino_i": float(final["dino_i"])}


SHORTLIST = 8  # candidates drawn per token tried, before ranking them by association


def _candidate_tokens(zoo: ModelZoo, product_id: str, title: str, class_noun: str, count: int) -> list[str]:
    """The tokens the sweep tries: rare candidates, the `count` most associated with the title."""
    words = f"{title} {class_noun} {product_id}".replace("-", " ").split()
    if count <= 1:
        return rare_token_candidates(product_id, words, 1)
    shortlist = rare_token_candidates(product_id, words, count * SHORTLIST)
    return [t for t, _ in by_association(shortlist, class_noun, title, zoo.load("clip").embed_texts)[:count]]


def _title_and_type(lake: Lakehouse, product_id: str) -> tuple[str, str | None]:
    product = lake.spark.sql(f"SELECT title FROM products WHERE product_id = {sql_literal(product_id)}").collect()
    product_type = next((r["product_type"] for r in resolved_types(lake).where(
        f"product_id = {sql_literal(product_id)}").collect()), None)
    return (product[0]["title"] if product else product_id), product_type


def _recorded(row: dict, model_version: str, run) -> dict:
    """The adapters row of a version a killed run registered, from its MLflow run."""
    return {**row, "token": run.data.params["token"], "token_scores": run.data.tags.get("token_scores", "{}"),
            "run_id": run.info.run_id, "model_version": model_version,
            "final_loss": run.data.metrics["final_loss"], "clip_i": run.data.metrics["val_clip_i"],
            "dino_i": run.data.metrics["val_dino_i"]}


@dataclass
class _ProductTraining:
    """What one product's sweep and training share: its examples, references and work folder."""

    lake: Lakehouse
    zoo: ModelZoo
    product_id: str
    class_noun: str
    rows: pd.DataFrame
    reference_vectors: dict
    work: Path
    scenes: list[str]  # approved scene prompts of the product's type: the sweep checks CLIP-T on them
    config: TrainingSettings  # the arm's (arm_config)

    @property
    def base(self) -> str:
        return str(self.zoo.path("text2img"))

    @property
    def pipeline(self):
        """The worker's one loaded base pipeline (sweep, training, validation and class images)."""
        return self.zoo.load("text2img")

    def examples_for(self, token: str) -> list[Example]:
        return [Example(decode_rgb(r.image), instance_prompt(token, self.class_noun, r.caption) if r.is_positive
                        else (r.caption or self.class_noun)) for r in self.rows.itertuples()]

    def validator(self, token: str, log_images: bool):
        import mlflow

        config = self.config

        def validate(pipeline, step: int) -> dict:
            generator = torch.Generator("cpu").manual_seed(config.seed)
            images = pipeline([instance_prompt(token, self.class_noun)] * config.validation_images,
                              num_inference_steps=self.lake.settings.augment.steps, height=config.resolution,
                              width=config.resolution, generator=generator).images
            scores = _scores(self.zoo, images, self.reference_vectors)
            mlflow.log_metrics({f"val_{k}": v for k, v in scores.items()}, step=step)
            if log_images:
                for i, image in enumerate(images):
                    mlflow.log_image(image, artifact_file=f"validation/step_{step:06d}_{i}.png")
            return scores
        return validate

    def class_examples(self) -> list[Example]:
        """DreamBooth's prior-preservation images: what the base model makes of "a photo of a
        <class>" (baseline.class_images of them, seeded), captioned with that prompt."""
        count, prompt = self.lake.settings.baseline.class_images, f"a photo of a {self.class_noun}"
        pipeline = self.pipeline
        generator = torch.Generator("cpu").manual_seed(self.config.seed)
        images = pipeline([prompt] * count, num_inference_steps=self.lake.settings.augment.steps,
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
        images = pipeline([f"{instance_prompt(token, self.class_noun)}, {scene}" for scene in self.scenes],
                          num_inference_steps=self.lake.settings.augment.steps, height=config.resolution,
                          width=config.resolution, generator=generator).images
        clip = self.zoo.load("clip")
        texts = clip.embed_texts([f"a photo of a {self.class_noun}, {scene}" for scene in self.scenes])
        return float(np.mean(np.sum(clip.embed_images(images) * texts, axis=1)))

    def sweep(self, candidates: list[str], experiment: str) -> tuple[str, dict[str, float]]:
        """The rare-token sweep: a short run per candidate; the best validation CLIP-I + DINO on
        the instance prompt plus CLIP-T on scene prompts wins."""
        import mlflow

        if len(candidates) == 1:
            return candidates[0], {}
        config, scores_by_token = self.config, {}
        for token in candidates:
            with mlflow.start_run(experiment_id=experiment, run_name=f"{self.product_id} token {token}", nested=True):
                mlflow.log_params({"token": token, "steps": config.sweep_steps})
                result = train_lora(self.pipeline, self.examples_for(token), config, self.work / "sweep" / token,
                                    steps=config.sweep_steps)
                with adapter_loaded(self.pipeline, result.adapter_dir) as pipeline:
                    scores = self.validator(token, log_images=False)(pipeline, config.sweep_steps)
                    scene_clip_t = self.scene_clip_t(token, pipeline)
                scores_by_token[token] = scores["clip_i"] + scores["dino_i"] + (scene_clip_t or 0.0)
                mlflow.log_metrics({"sweep_score": scores_by_token[token],
                                    **({"sweep_scene_clip_t": scene_clip_t} if scene_clip_t is not None else {})})
        return max(candidates, key=lambda t: (scores_by_token[t], t)), scores_by_token


def _embed(zoo: ModelZoo, images: list[Image.Image]) -> dict[str, np.ndarray]:
    return {role: zoo.load(role).embed_images(images) for role in ("clip", "dino")}


def _scores(zoo: ModelZoo, images: list[Image.Image], references: dict[str, np.ndarray]) -> dict[str, float]:
    """DreamBooth CLIP-I and DINO of generated images against the product's references."""
    generated = _embed(zoo, images)
    return {f"{role}_i": float(cosine(generated[role], references[role]).mean()) for role in ("clip", "dino")}


TRAIN = Step("train", run_training,
             reads=("training_images", "product_images", "synthetic_images", "products", "product_classes"),
             writes=("adapters", "quarantine", REGISTERED_MODELS), roles=("text2img", "clip", "dino"),
             description="a DreamBooth-style LoRA per product (rare-token sweep), tracked and registered in MLflow")
TRAIN_BASELINE = Step("train_baseline", run_baseline_training,
                      reads=("adapters", "product_images", "products", "product_classes"),
                      writes=("adapters", "quarantine", REGISTERED_MODELS), roles=("text2img", "clip", "dino"),
                      description="the baseline arm: standard DreamBooth + LoRA (rank 64, prior preservation) "
                                  "on the references")
