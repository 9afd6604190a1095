"""Generation with the champion adapters -> `generations` (paper 2.5; the ranking that follows
is training/ranking.py).

The driver picks, per product and arm, the champion adapter from the MLflow registry (the
baseline arm, when trained, gets the same prompts and seeds): approved target prompts of the
product's type x seeds, minus the tasks already done, and downloads the adapter under the home.
Then one Spark task per product and arm (training/fanout.py, `training.parallel_products` at
once, each on its own device) loads the base pipeline once per task, applies the adapter and
returns the image rows; the driver MERGEs them. A task key hashes adapter version, prompt, seed
and parameters, so a re-run generates nothing twice and promoting another version makes the
next run generate with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging

import pandas as pd
import torch

from etl.config import GenerationSettings, Settings
from etl.lakehouse import Lakehouse
from etl.prompt_bank import approved_prompts, class_noun, resolved_types
from etl.step import CHAMPIONS, Step
from etl.tables import TABLES
from etl import tracking
from training.fanout import fan_out, parallelism, with_slots
from udfs.device import BUILDING, task_device
from udfs.imaging import encode_png, pixel_hash
from udfs.zoo import ModelZoo

log = logging.getLogger(__name__)
STAGE = "generate"
RESULT_SCHEMA = f"{TABLES['generations'].data_schema()}, error STRING"


def run_generation(lake: Lakehouse, zoo: ModelZoo, progress=print) -> dict[str, int]:
    import mlflow

    settings = lake.settings.generation
    tracking.configure(lake.settings)
    adapters = lake.spark.sql("SELECT product_id, arm, model_version, token FROM adapters").toPandas()
    tokens = {(r.product_id, r.arm, str(r.model_version)): r.token for r in adapters.itertuples()}
    types = dict(resolved_types(lake).toPandas().itertuples(index=False))
    targets = approved_prompts(lake, "target")
    done = {r["task_key"] for r in lake.spark.sql("SELECT DISTINCT task_key FROM generations").collect()}
    specs, failures = [], []
    pairs = [(p, a) for p, a in sorted(set(zip(adapters.product_id, adapters.arm)))
             if lake.products is None or p in lake.products]
    for product_id, arm in pairs:
        found = tracking.champion(product_id, arm)
        if found is None:
            continue  # only products with a champion adapter are generated
        name, version, run_id = found
        token, product_type = tokens.get((product_id, arm, version)), types.get(product_id)
        prompts = targets[targets.product_type == product_type].head(settings.prompts_per_product)
        if prompts.empty:
            failures.append((product_id, f"type:{product_type}", "no_approved_targets",
                             f"no approved target prompts for product type '{product_type}'; approve some "
                             "(recontext prompts ...) or import them from a CSV"))
            continue
        tasks = [_task(product_id, arm, name, version, run_id, token, class_noun(product_type), p, seed, settings)
                 for p in prompts.itertuples() for seed in range(settings.seed, settings.seed + settings.seeds_per_prompt)]
        tasks = [t for t in tasks if t["task_key"] not in done]
        if not tasks:
            continue
        source = f"adapter:{name}/{version}"
        try:
            if token is None:
                raise ValueError(f"version {version} of {name} is not in the adapters table")
            local = lake.settings.home / "generation" / "adapters" / name / version  # the home: every worker sees it
            local.mkdir(parents=True, exist_ok=True)
            adapter = mlflow.diffusers.load_model(f"models:/{name}/{version}", dst_path=str(local))
        except Exception as err:  # noqa: BLE001 - one product's failure never stops the others
            failures.append((product_id, source, "generation_failed",
                             f"generation failed ({type(err).__name__}: {err}); it is retried on the next run"))
            continue
        specs.append({"product_id": product_id, "arm": arm, "adapter": adapter.adapter_path, "source": source,
                      "tasks": json.dumps(tasks)})
    rows = []
    if specs:
        parallel = parallelism(lake.settings)
        progress(f"  generating for {len(specs)} adapter(s) in {min(parallel, len(specs))} parallel task(s)")
        frame = lake.spark.createDataFrame(with_slots(pd.DataFrame(specs)),
                                           "product_id STRING, arm STRING, adapter STRING, source STRING, "
                                           "tasks STRING, slot BIGINT")
        results = fan_out(lake.spark, frame, parallel, functools.partial(_generate_task, lake.settings, zoo),
                          RESULT_SCHEMA)
        for failed in results[results.error.notna()].itertuples():
            failures.append((failed.product_id, failed.adapter_model, "generation_failed",
                             f"generation failed ({failed.error}); it is retried on the next run"))
        rows = results[results.error.isna()]
        progress(f"    {len(rows)} image(s) from {len(specs) - len(results[results.error.notna()])} adapter(s)")
    written = 0
    if len(rows):
        written = lake.upsert_rows("generations", rows.drop(columns="error").astype({"seed": "int32", "steps": "int32"}))
    return {"generations": written, "quarantine": lake.quarantine(STAGE, failures)}


def _generate_task(settings: Settings, zoo: ModelZoo, spec, state: dict) -> list[dict] | dict:
    """Spark task: one product's (and arm's) images with its adapter, on this task's device; a
    failure becomes one row carrying `error` (its `adapter_model` says which adapter). The base
    pipeline is loaded once per task and reused for the task's next products."""
    from udfs.diffusion import load_pipeline

    device = task_device(zoo.models.device, int(spec.slot))
    generation = settings.generation
    try:
        if "pipeline" not in state:
            state["pipeline"] = load_pipeline("text2img", zoo.path("text2img"), device)
        pipeline = state["pipeline"]
        with BUILDING:
            pipeline.unload_lora_weights()
            pipeline.load_lora_weights(spec.adapter)
        rows = []
        for task in json.loads(spec.tasks):
            generator = torch.Generator("cpu").manual_seed(task["seed"])
            image = pipeline(task["generation_prompt"], num_inference_steps=generation.steps,
                             guidance_scale=generation.guidance_scale, height=generation.resolution,
                             width=generation.resolution, generator=generator).images[0]
            rows.append({**task, "image_id": pixel_hash(image), "image": encode_png(image), "width": image.width,
                         "height": image.height, "scheduler": type(pipeline.scheduler).__name__, "error": None})
        return rows
    except Exception as err:  # noqa: BLE001 - reported to the driver, which quarantines the product
        log.exception("generation for %s (%s) on %s failed", spec.product_id, spec.arm, device)
        return {"product_id": spec.product_id, "arm": spec.arm, "adapter_model": spec.source,
                "error": f"{type(err).__name__}: {err}"}


def _task(product_id, arm, name, version, run_id, token, class_noun, prompt, seed, settings: GenerationSettings) -> dict:
    scene = prompt.text
    identity = json.dumps([name, version, prompt.prompt_id, seed, settings.steps, settings.guidance_scale,
                           settings.resolution])
    return {"task_key": hashlib.sha256(identity.encode()).hexdigest(), "product_id": product_id, "arm": arm,
            "adapter_model": name, "adapter_version": version, "run_id": run_id, "token": token,
            "prompt_id": prompt.prompt_id, "prompt": f"a photo of a {class_noun}, {scene}",
            "generation_prompt": f"a photo of {token} {class_noun}, {scene}", "seed": seed,
            "steps": settings.steps, "guidance": float(settings.guidance_scale)}


GENERATE = Step("generate", run_generation,
                reads=("adapters", "prompt_bank", "products", "product_classes", CHAMPIONS),
                writes=("generations", "quarantine"), roles=("text2img",),
                description="images from each product's champion adapter (and the baseline's)")
