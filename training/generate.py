"""Generation with the champion adapters -> `generations` (paper 2.5; the ranking that follows
is etl/ranking.py).

The driver takes the tasks of the generation plan (etl/plans.py: per product, each arm's
`@champion` adapter on the same approved target prompts and seeds) and of every pinned
evaluation, minus the tasks already done, and downloads each adapter under the home.
Then one Spark task per product and arm (training/fanout.py, `training.parallel_products` at
once, each on its own device) uses its worker's one base pipeline on the task's device (udfs/zoo.py), applies the adapter
(fused on GPUs), renders in batches and returns the image rows; the driver MERGEs them. A task key hashes adapter version, prompt, seed
and parameters, so a re-run generates nothing twice and promoting another version makes the
next run generate with it.

`render` (udfs/diffusion.py) is the one place images come out of a pipeline; on-demand
requests (training/imagine.py) call it too.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging

import pandas as pd

from core.settings import GenerationSettings, Settings
from etl.lakehouse import Lakehouse
from etl.plans import pending_tasks, photos_version, reference_photos
from etl.tracking import ZERO_SHOT
from etl.step import CHAMPIONS, Step
from core.tables import TABLES
from training.fanout import fan_out, parallelism, with_slots
from udfs.device import task_device
from udfs.diffusion import adapter_loaded, render
from udfs.imaging import decode_rgb, encode_png, padded_square, pixel_hash
from udfs.zoo import ModelZoo

log = logging.getLogger(__name__)
STAGE = "generate"
RESULT_SCHEMA = f"{TABLES['generations'].data_schema()}, error STRING"


def run_generation(lake: Lakehouse, zoo: ModelZoo, progress=print) -> dict[str, int]:
    """Generate every planned image not made yet: the current plan's (each product's champion per
    arm, etl/plans.py) and those of pinned evaluations still incomplete."""
    import mlflow

    tasks, failures = pending_tasks(lake)
    specs = []
    zero_shot = sorted(set(tasks.product_id[tasks.arm == ZERO_SHOT]))
    photos, photo_ids = reference_photos(lake, zero_shot), reference_photos(lake, zero_shot, with_images=False)
    for (product_id, arm, name, version), group in tasks.groupby(
            ["product_id", "arm", "adapter_model", "adapter_version"], sort=True):
        source = f"adapter:{name}/{version}"
        if arm == ZERO_SHOT:  # no adapter: the reference photos travel with the task
            if version != photos_version(photo_ids.get(product_id, [])):  # a pinned plan's photos are gone
                failures.append((product_id, source, "generation_failed", "the reference photos this zero-shot "
                                 "version was planned with changed; the current plan uses the new ones"))
                continue
            references = json.dumps([base64.b64encode(bytes(image)).decode() for image in photos.get(product_id, [])])
            specs.append({"product_id": product_id, "arm": arm, "adapter": None, "source": source,
                          "reference_photos": references,
                          "tasks": group.astype(object).where(group.notna(), None).to_json(orient="records")})
            continue
        try:
            if group.token.isna().any():
                raise ValueError(f"version {version} of {name} is not in the adapters table")
            local = lake.settings.home / "generation" / "adapters" / name / version  # the home: every worker sees it
            local.mkdir(parents=True, exist_ok=True)
            adapter = mlflow.diffusers.load_model(f"models:/{name}/{version}", dst_path=str(local))
        except Exception as err:  # noqa: BLE001 - one product's failure never stops the others
            failures.append((product_id, source, "generation_failed",
                             f"generation failed ({type(err).__name__}: {err}); it is retried on the next run"))
            continue
        specs.append({"product_id": product_id, "arm": arm, "adapter": adapter.adapter_path, "source": source,
                      "reference_photos": None,
                      "tasks": group.astype(object).where(group.notna(), None).to_json(orient="records")})
    rows = []
    if specs:
        parallel = parallelism(lake.settings)
        progress(f"  generating for {len(specs)} adapter(s) in {min(parallel, len(specs))} parallel task(s)")
        frame = lake.spark.createDataFrame(with_slots(pd.DataFrame(specs)),
                                           "product_id STRING, arm STRING, adapter STRING, source STRING, "
                                           "reference_photos STRING, tasks STRING, slot BIGINT")
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


def generate_images(zoo: ModelZoo, adapter_path, tasks: list[dict], settings: GenerationSettings,
                    references: list | None = None) -> list[dict]:
    """`generations` rows for `tasks` (generation_prompt, seed) from the worker's one base
    pipeline with the adapter loaded (fused on GPUs), `settings.batch_size` prompts per call;
    without an adapter, the base pipeline conditioned on `references` (the zero-shot arm)."""
    block = adapter_on(zoo, adapter_path, settings) if adapter_path else contextlib.nullcontext(zoo.load("text2img"))
    if references:  # as in training, at the generation's size: a reference's tokens join every attention
        references = [padded_square(image, settings.resolution) for image in references]
    with zoo.exclusive("text2img"), block as pipeline:
        images = render(pipeline, [t["generation_prompt"] for t in tasks], [t["seed"] for t in tasks],
                        settings.steps, settings.guidance_scale, settings.resolution, settings.batch_size,
                        references=references)
        return [image_row(task, image, type(pipeline.scheduler).__name__) for task, image in zip(tasks, images)]


def adapter_on(zoo: ModelZoo, adapter_path, settings: GenerationSettings):
    """The zoo's base pipeline with the adapter for a block (hold zoo.exclusive("text2img")):
    fused into the weights on CUDA under `fuse_lora = "auto"`."""
    base = zoo.load("text2img")
    fuse = settings.fuse_lora == "on" or (settings.fuse_lora == "auto" and base.device.type == "cuda")
    return adapter_loaded(base, adapter_path, fuse=fuse)




def image_row(task: dict, image, scheduler: str) -> dict:
    """A `generations` row: the task's lineage and the image."""
    return {**task, "image_id": pixel_hash(image), "image": encode_png(image), "width": image.width,
            "height": image.height, "scheduler": scheduler}


def _generate_task(settings: Settings, zoo: ModelZoo, spec, state: dict) -> list[dict] | dict:
    """Spark task: one product's (and arm's) images with its adapter, on this task's device; a
    failure becomes one row carrying `error` (its `adapter_model` says which adapter). The worker's
    base pipeline for that device is loaded once (the zoo) and reused by its next tasks."""
    device = task_device(zoo.models.device, int(spec.slot))
    try:
        references = ([decode_rgb(base64.b64decode(b)) for b in json.loads(spec.reference_photos)]
                      if spec.reference_photos else None)
        rows = generate_images(zoo.on(device), spec.adapter, json.loads(spec.tasks), settings.generation, references)
        return [{**row, "error": None} for row in rows]
    except Exception as err:  # noqa: BLE001 - reported to the driver, which quarantines the product
        log.exception("generation for %s (%s) on %s failed", spec.product_id, spec.arm, device)
        return {"product_id": spec.product_id, "arm": spec.arm, "adapter_model": spec.source,
                "error": f"{type(err).__name__}: {err}"}


GENERATE = Step("generate", run_generation,
                # product_images: the zero-shot arm's reference photos
                reads=("adapters", "prompt_bank", "products", "product_classes", "evaluation_plans", "product_images",
                       CHAMPIONS),
                writes=("generations", "quarantine"), roles=("text2img",),
                description="images from each product's champion adapter (and the baseline's)")
