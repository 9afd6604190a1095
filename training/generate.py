"""Generation with the champion adapters -> `generations`; post-finetuning ranking ->
`ranked_generations` (paper 2.5).

Generation is a driver loop over products and arms (each loads its adapter from the MLflow
registry by the `champion` alias onto one base pipeline; the baseline arm, when trained, gets the
same prompts and seeds): approved target prompts of the product's type
x seeds. A task key hashes adapter version, prompt, seed and parameters, so a re-run generates
nothing twice and promoting another version makes the next run generate with it.

Ranking (our arm only: the baseline has none) scores every generation with the metrics job's
columns, aggregates them (sum of CLIP-T + CLIP-I + DINO by default, `generation.rank_weights`;
or the learned ranker's pass probability with `generation.rank_aggregate = "learned"`), drops
those below the threshold and keeps the top `generation.keep_top` per product.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pandas as pd
import torch

from etl.config import GenerationSettings
from etl.errors import UserError
from etl.evaluation import METRICS, aggregate_score
from etl.lakehouse import Lakehouse
from etl.progress import Progress
from etl.prompt_bank import approved_prompts, resolved_types
from etl.tables import TABLES
from etl.training_set import keep_first
from training import tracking
from training.ranker import MODEL_NAME, features
from udfs.imaging import encode_png, pixel_hash
from udfs.zoo import ModelZoo

log = logging.getLogger(__name__)
STAGE = "generate"


def champion(product_id: str, arm: str = tracking.OURS) -> tuple[str, str, str] | None:
    """(model name, version, run id) of the product's champion adapter in `arm`, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = tracking.registered_model_name(product_id, arm)
    try:
        version = MlflowClient().get_model_version_by_alias(name, tracking.CHAMPION)
    except MlflowException:
        return None
    return name, str(version.version), version.run_id


def run_generation(lake: Lakehouse, zoo: ModelZoo, progress=print) -> dict[str, int]:
    import mlflow

    from udfs.diffusion import load_pipeline

    settings = lake.settings.generation
    tracking.configure(lake.settings)
    adapters = lake.spark.sql("SELECT product_id, arm, model_version, token FROM adapters").toPandas()
    tokens = {(r.product_id, r.arm, str(r.model_version)): r.token for r in adapters.itertuples()}
    types = dict(resolved_types(lake).toPandas().itertuples(index=False))
    targets = approved_prompts(lake, "target")
    done = {r["task_key"] for r in lake.spark.sql("SELECT DISTINCT task_key FROM generations").collect()}
    pipeline, rows, failures = None, [], []
    pairs = [(p, a) for p, a in sorted(set(zip(adapters.product_id, adapters.arm)))
             if lake.products is None or p in lake.products]
    meter = Progress(len(pairs), "adapters", progress)
    for product_id, arm in meter.track(pairs, lambda pair: f"{pair[0]} ({pair[1]})"):
        found = champion(product_id, arm)
        if found is None:
            continue  # only products with a champion adapter are generated
        name, version, run_id = found
        token, class_noun = tokens.get((product_id, arm, version)), types.get(product_id) or "product"
        prompts = targets[targets.product_type == class_noun].head(settings.prompts_per_product)
        if prompts.empty:
            failures.append((product_id, f"type:{class_noun}", "no_approved_targets",
                             f"no approved target prompts for product type '{class_noun}'; approve some "
                             "(recontext prompts ...) or import them from a CSV"))
            continue
        tasks = [_task(product_id, arm, name, version, run_id, token, class_noun, p, seed, settings)
                 for p in prompts.itertuples() for seed in range(settings.seed, settings.seed + settings.seeds_per_prompt)]
        tasks = [t for t in tasks if t["task_key"] not in done]
        if not tasks:
            continue
        try:
            if token is None:
                raise ValueError(f"version {version} of {name} is not in the adapters table")
            if pipeline is None:
                pipeline = load_pipeline("text2img", zoo.path("text2img"), zoo.models.device)
            adapter = mlflow.diffusers.load_model(f"models:/{name}@{tracking.CHAMPION}")
            pipeline.unload_lora_weights()
            pipeline.load_lora_weights(adapter.adapter_path)
            for task in tasks:
                generator = torch.Generator("cpu").manual_seed(task["seed"])
                image = pipeline(task["generation_prompt"], num_inference_steps=settings.steps,
                                 guidance_scale=settings.guidance_scale, height=settings.resolution,
                                 width=settings.resolution, generator=generator).images[0]
                rows.append({**task, "image_id": pixel_hash(image), "image": encode_png(image),
                             "width": image.width, "height": image.height,
                             "scheduler": type(pipeline.scheduler).__name__})
        except Exception as err:  # noqa: BLE001 - one product's failure never stops the others
            log.exception("generation for %s failed", product_id)
            failures.append((product_id, f"adapter:{name}/{version}", "generation_failed",
                             f"generation failed ({type(err).__name__}: {err}); it is retried on the next run"))
    written = 0
    if rows:
        written = lake.upsert_rows("generations", pd.DataFrame(rows).astype({"seed": "int32", "steps": "int32"}))
    return {"generations": written, "quarantine": lake.quarantine(STAGE, failures)}


def _task(product_id, arm, name, version, run_id, token, class_noun, prompt, seed, settings: GenerationSettings) -> dict:
    scene = prompt.text
    identity = json.dumps([name, version, prompt.prompt_id, seed, settings.steps, settings.guidance_scale,
                           settings.resolution])
    return {"task_key": hashlib.sha256(identity.encode()).hexdigest(), "product_id": product_id, "arm": arm,
            "adapter_model": name, "adapter_version": version, "run_id": run_id, "token": token,
            "prompt_id": prompt.prompt_id, "prompt": f"a photo of a {class_noun}, {scene}",
            "generation_prompt": f"a photo of {token} {class_noun}, {scene}", "seed": seed,
            "steps": settings.steps, "guidance": float(settings.guidance_scale)}


def rank_generations(scores: pd.DataFrame, settings: GenerationSettings, ranker=None) -> pd.DataFrame:
    """Per product: aggregate, threshold, rank, keep the top N. `scores` has product_id,
    image_id, adapter_version and the metric columns. The aggregate is the weighted sum, or with
    a learned `ranker` (model, version) its pass probability (threshold `min_pass_probability`)."""
    scores = scores.copy()
    if ranker is None:
        scores["score"], threshold = aggregate_score(scores, settings.rank_weights), settings.min_score
        scores["ranked_by"] = "sum"
    else:
        model, version = ranker
        scores["score"], threshold = model.predict_proba(features(scores))[:, 1], settings.min_pass_probability
        scores["ranked_by"] = f"{MODEL_NAME} v{version}"
    scores["rank"], scores["kept"], scores["reason"] = None, False, None
    below = scores.score < threshold
    scores.loc[below, "reason"] = [f"score {s:.3f} below {threshold}" for s in scores.score[below]]
    for _, group in scores[~below].groupby("product_id"):
        ordered = group.sort_values(["score", "image_id"], ascending=[False, True])
        keep_first(scores, list(ordered.index), settings.keep_top, "kept",
                   lambda rank: f"over the top {settings.keep_top} (rank {rank})")
    scores["rank"] = scores["rank"].astype("Int32")
    return scores[TABLES["ranked_generations"].data_columns]


def run_ranking(lake: Lakehouse, zoo: ModelZoo) -> dict[str, int]:
    settings = lake.settings.generation
    if settings.rank_aggregate not in ("sum", "learned"):
        raise UserError(f"generation.rank_aggregate must be 'sum' or 'learned', not {settings.rank_aggregate!r}")
    ranker = None
    if settings.rank_aggregate == "learned":
        from training.ranker import load_champion

        tracking.configure(lake.settings)
        ranker = load_champion()
    metrics = ", ".join(f"m.{c}" for c in METRICS)
    scores = lake.spark.sql(
        f"""SELECT g.product_id, g.image_id, g.adapter_version, {metrics}
           FROM generations g JOIN image_metrics m ON m.image_id = g.image_id AND m.product_id = g.product_id
           WHERE g.arm = 'ours'"""
    ).toPandas()
    if scores.empty:
        return {"ranked_generations": 0}
    return {"ranked_generations": lake.upsert_rows("ranked_generations", rank_generations(scores, settings, ranker))}
