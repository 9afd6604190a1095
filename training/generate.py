"""Generation with the champion adapters -> `generations` (paper 2.5; the ranking that follows
is training/ranking.py).

Generation is a driver loop over products and arms (each loads its adapter from the MLflow
registry by the `champion` alias onto the worker's one base pipeline, prompts in batches; the baseline arm, when trained, gets the
same prompts and seeds): approved target prompts of the product's type
x seeds. A task key hashes adapter version, prompt, seed and parameters, so a re-run generates
nothing twice and promoting another version makes the next run generate with it.

`render` is the one place images come out of a pipeline; on-demand requests
(training/imagine.py) call it too.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pandas as pd
import torch

from etl.config import GenerationSettings
from etl.lakehouse import Lakehouse
from etl.progress import Progress
from etl.prompt_bank import approved_prompts, class_noun, resolved_types
from etl.step import CHAMPIONS, Step
from etl import tracking
from etl.vocabulary import BANK
from udfs.diffusion import adapter_loaded
from udfs.imaging import encode_png, pixel_hash
from udfs.zoo import ModelZoo

log = logging.getLogger(__name__)
STAGE = "generate"


def run_generation(lake: Lakehouse, zoo: ModelZoo, progress=print) -> dict[str, int]:
    import mlflow

    settings = lake.settings.generation
    tracking.configure(lake.settings)
    adapters = lake.spark.sql("SELECT product_id, arm, model_version, token FROM adapters").toPandas()
    tokens = {(r.product_id, r.arm, str(r.model_version)): r.token for r in adapters.itertuples()}
    types = dict(resolved_types(lake).toPandas().itertuples(index=False))
    targets = approved_prompts(lake, "target")
    done = {r["task_key"] for r in lake.spark.sql("SELECT DISTINCT task_key FROM generations").collect()}
    rows, failures = [], []
    pairs = [(p, a) for p, a in sorted(set(zip(adapters.product_id, adapters.arm)))
             if lake.products is None or p in lake.products]
    meter = Progress(len(pairs), "adapters", progress)
    for product_id, arm in meter.track(pairs, lambda pair: f"{pair[0]} ({pair[1]})"):
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
        try:
            if token is None:
                raise ValueError(f"version {version} of {name} is not in the adapters table")
            adapter = mlflow.diffusers.load_model(f"models:/{name}@{tracking.CHAMPION}")
            rows += generate_images(zoo, adapter.adapter_path, tasks, settings)
        except Exception as err:  # noqa: BLE001 - one product's failure never stops the others
            log.exception("generation for %s failed", product_id)
            failures.append((product_id, f"adapter:{name}/{version}", "generation_failed",
                             f"generation failed ({type(err).__name__}: {err}); it is retried on the next run"))
    written = 0
    if rows:
        written = lake.upsert_rows("generations", pd.DataFrame(rows).astype({"seed": "int32", "steps": "int32"}))
    return {"generations": written, "quarantine": lake.quarantine(STAGE, failures)}


def generate_images(zoo: ModelZoo, adapter_path, tasks: list[dict], settings: GenerationSettings) -> list[dict]:
    """`generations` rows for `tasks` (generation_prompt, seed) from the worker's one base
    pipeline with the adapter loaded (fused on GPUs), `settings.batch_size` prompts per call."""
    with zoo.exclusive("text2img"), adapter_on(zoo, adapter_path, settings) as pipeline:
        images = render(pipeline, [t["generation_prompt"] for t in tasks], [t["seed"] for t in tasks],
                        settings.steps, settings.guidance_scale, settings.resolution, settings.batch_size)
        return [image_row(task, image, type(pipeline.scheduler).__name__) for task, image in zip(tasks, images)]


def adapter_on(zoo: ModelZoo, adapter_path, settings: GenerationSettings):
    """The zoo's base pipeline with the adapter for a block (hold zoo.exclusive("text2img")):
    fused into the weights on CUDA under `fuse_lora = "auto"`."""
    base = zoo.load("text2img")
    fuse = settings.fuse_lora == "on" or (settings.fuse_lora == "auto" and base.device.type == "cuda")
    return adapter_loaded(base, adapter_path, fuse=fuse)


def render(pipeline, prompts: list[str], seeds: list[int], steps: int, guidance: float, size: int,
           batch_size: int) -> list:
    """One image per (prompt, seed), `batch_size` per pipeline call, at `size` x `size` pixels.
    Each image has its own seeded generator, so its noise does not depend on its batch."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds[chunk]]
        images += pipeline(prompts[chunk], num_inference_steps=steps, guidance_scale=guidance, height=size,
                           width=size, generator=generators).images
    return images


def prompts(token: str, class_noun: str, text: str) -> tuple[str, str]:
    """(prompt, generation_prompt): the text with the class noun (what CLIP-T compares the image
    with), and with the rare token too (what the adapter is given)."""
    return f"a photo of a {class_noun}, {text}", f"a photo of {token} {class_noun}, {text}"


def task_key(*identity) -> str:
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def image_row(task: dict, image, scheduler: str) -> dict:
    """A `generations` row: the task's lineage and the image."""
    return {**task, "image_id": pixel_hash(image), "image": encode_png(image), "width": image.width,
            "height": image.height, "scheduler": scheduler}


def _task(product_id, arm, name, version, run_id, token, class_noun, prompt, seed, settings: GenerationSettings) -> dict:
    text, generation_prompt = prompts(token, class_noun, prompt.text)
    return {"task_key": task_key(name, version, prompt.prompt_id, seed, settings.steps, settings.guidance_scale,
                                 settings.resolution),
            "product_id": product_id, "arm": arm, "origin": BANK, "scene": None,
            "adapter_model": name, "adapter_version": version, "run_id": run_id, "token": token,
            "prompt_id": prompt.prompt_id, "prompt": text, "generation_prompt": generation_prompt, "seed": seed,
            "steps": settings.steps, "guidance": float(settings.guidance_scale)}


GENERATE = Step("generate", run_generation,
                reads=("adapters", "prompt_bank", "products", "product_classes", CHAMPIONS),
                writes=("generations", "quarantine"), roles=("text2img",),
                description="images from each product's champion adapter (and the baseline's)")
