"""Training job: `training_images` (a pinned Delta version) -> one LoRA adapter per product,
tracked and registered in MLflow, recorded in `adapters`.

Fan-out is a driver loop over products (one product at a time uses the whole machine or GPU;
on a cluster, run one job per product group, e.g. a Databricks for-each task). A product whose
adapter exists for the same training-set version and config is skipped; a failure on one
product is recorded in `quarantine` and the others go on; a killed run resumes from its last
checkpoint under `<home>/training/`.

The baseline arm (`run_baseline_training`) trains the same products with plain DreamBooth +
LoRA on the reference photos only (no augmentation, no filtering, no captions, no token sweep),
registered as `recontext-<product_id>-baseline`, so evaluation compares the two arms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
from deltalake import DeltaTable
from PIL import Image

from etl.lakehouse import Lakehouse
from etl.metrics import cosine
from etl.progress import Progress
from etl.prompt_bank import resolved_types
from etl.tables import sql_literal
from training import tracking
from training.lora import Example, TrainResult, instance_prompt, train_lora
from training.tokens import rare_token_candidates
from udfs.imaging import decode_rgb
from udfs.zoo import ModelZoo

log = logging.getLogger(__name__)
STAGE, BASELINE_STAGE = "train", "train_baseline"


def config_hash(lake: Lakehouse, zoo: ModelZoo) -> str:
    fields = {**asdict(lake.settings.training), "base_model": zoo.name("text2img")}
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
    zoo.check("text2img", "clip", "dino")
    version = DeltaTable(lake.location("product_images")).version()
    references = lake.spark.sql(
        f"""SELECT i.product_id, i.image_id FROM product_images i
            WHERE i.product_id IN (SELECT product_id FROM adapters WHERE arm = '{tracking.OURS}')""").toPandas()
    digests = _digests(config_hash(lake, zoo), references)  # new photos retrain the baseline
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
            row = train_product(lake, zoo, product_id, rows, references, version, digest, experiment, arm, progress)
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
            JOIN (SELECT image_id, first(image) AS image FROM (
                    SELECT image_id, image FROM product_images UNION ALL SELECT image_id, image FROM synthetic_images)
                  GROUP BY image_id) i ON i.image_id = t.image_id
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

    config = lake.settings.training
    product = lake.spark.sql(f"SELECT title FROM products WHERE product_id = {sql_literal(product_id)}").collect()
    class_noun = next((r["product_type"] for r in resolved_types(lake).where(
        f"product_id = {sql_literal(product_id)}").collect()), None) or "product"
    title = product[0]["title"] if product else product_id
    candidates = rare_token_candidates(product_id, f"{title} {class_noun} {product_id}".replace("-", " ").split(),
                                       max(1, config.token_candidates) if arm == tracking.OURS else 1)
    reference_vectors = _embed(zoo, references)
    work = lake.settings.home / "training" / product_id / f"{arm}-v{version}-{digest}"

    def examples_for(token: str) -> list[Example]:
        return [Example(decode_rgb(r.image),
                        instance_prompt(token, class_noun, r.caption) if r.is_positive else (r.caption or class_noun))
                for r in rows.itertuples()]

    def validator(token: str, log_images: bool):
        def validate(pipeline, step: int) -> dict:
            generator = torch.Generator("cpu").manual_seed(config.seed)
            images = pipeline([instance_prompt(token, class_noun)] * config.validation_images,
                              num_inference_steps=lake.settings.augment.steps, height=config.resolution,
                              width=config.resolution, generator=generator).images
            scores = _scores(zoo, images, reference_vectors)
            mlflow.log_metrics({f"val_{k}": v for k, v in scores.items()}, step=step)
            if log_images:
                for i, image in enumerate(images):
                    mlflow.log_image(image, artifact_file=f"validation/step_{step:06d}_{i}.png")
            return scores
        return validate

    base = str(zoo.path("text2img"))
    params = {**{k: str(v) for k, v in asdict(config).items()}, "product_id": product_id, "arm": arm,
              "training_set_version": version, "class_noun": class_noun, "base_model": zoo.name("text2img"),
              "examples": len(rows), "positives": int(rows.is_positive.sum())}
    row = {"product_id": product_id, "arm": arm, "training_set_version": version, "config_hash": digest,
           "model_name": tracking.registered_model_name(product_id, arm),
           "alias": tracking.CHAMPION if arm == tracking.BASELINE else tracking.CANDIDATE, "images": len(rows)}
    training_key = f"{product_id}|{arm}|{version}|{digest}"
    registered = tracking.registered_version(row["model_name"], training_key)
    if registered is not None:  # a killed run registered it but did not record it: record, don't retrain
        model_version, run = registered
        progress(f"  train {product_id} ({arm}): version {model_version} is already registered; recording it")
        return {**row, "token": run.data.params["token"], "token_scores": run.data.tags.get("token_scores", "{}"),
                "run_id": run.info.run_id, "model_version": model_version,
                "final_loss": run.data.metrics["final_loss"], "clip_i": run.data.metrics["val_clip_i"],
                "dino_i": run.data.metrics["val_dino_i"]}
    run_name = product_id if arm == tracking.OURS else f"{product_id} {arm}"
    with mlflow.start_run(experiment_id=experiment, run_name=run_name, log_system_metrics=True,
                          tags={tracking.TRAINING_KEY: training_key}) as run:
        mlflow.log_params(params)
        token_scores = {}
        if len(candidates) > 1:  # the rare-token sweep: short runs, best validation CLIP-I + DINO
            for token in candidates:
                with mlflow.start_run(experiment_id=experiment, run_name=f"{product_id} token {token}", nested=True):
                    mlflow.log_params({"token": token, "steps": config.sweep_steps})
                    result = train_lora(base, examples_for(token), config, work / "sweep" / token,
                                        steps=config.sweep_steps, device=zoo.models.device)
                    scores = validator(token, log_images=False)(_pipeline_with(base, result, zoo), config.sweep_steps)
                    token_scores[token] = scores["clip_i"] + scores["dino_i"]
                    mlflow.log_metric("sweep_score", token_scores[token])
            token = max(candidates, key=lambda t: (token_scores[t], t))
        else:
            token = candidates[0]
        mlflow.log_params({"token": token, "tried_tokens": ",".join(candidates)})
        mlflow.set_tag("token_scores", json.dumps(token_scores, sort_keys=True))
        progress(f"  train {product_id} ({arm}): token '{token}', {len(rows)} examples, {config.steps} steps")
        result = train_lora(base, examples_for(token), config, work / "final", device=zoo.models.device,
                            on_step=lambda step, loss: mlflow.log_metric("loss", loss, step=step),
                            validate=validator(token, log_images=True))
        final = result.validations[-1] if result.validations else \
            validator(token, log_images=True)(_pipeline_with(base, result, zoo), config.steps)
        mlflow.log_metrics({"final_loss": float(np.mean(result.losses[-10:]))})
        model_version = tracking.register_adapter(result.adapter_dir, base, product_id, arm,
                                                  config.auto_promote)
        shutil.rmtree(work / "sweep", ignore_errors=True)
        return {**row, "token": token, "token_scores": json.dumps(token_scores, sort_keys=True),
                "run_id": run.info.run_id, "model_version": model_version,
                "final_loss": float(np.mean(result.losses[-10:])), "clip_i": float(final["clip_i"]),
                "dino_i": float(final["dino_i"])}


def _pipeline_with(base: str, result: TrainResult, zoo: ModelZoo):
    from udfs.diffusion import load_pipeline

    pipeline = load_pipeline("text2img", base, zoo.models.device)
    pipeline.load_lora_weights(str(result.adapter_dir))
    return pipeline


def _embed(zoo: ModelZoo, images: list[Image.Image]) -> dict[str, np.ndarray]:
    return {role: zoo.load(role).embed_images(images) for role in ("clip", "dino")}


def _scores(zoo: ModelZoo, images: list[Image.Image], references: dict[str, np.ndarray]) -> dict[str, float]:
    """DreamBooth CLIP-I and DINO of generated images against the product's references."""
    generated = _embed(zoo, images)
    return {f"{role}_i": float(cosine(generated[role], references[role]).mean()) for role in ("clip", "dino")}

