"""Augmentation kinds and their UDF: one row per augmentation task in, one row per image out.

One function per augmentation kind makes its images; the kinds themselves (paper sections
2.1-2.2, appendix A.2), with the model role and the function each uses, are rows of
core/vocabulary.py AUGMENT_KINDS.
Noise comes from a CPU generator seeded per task, so a task gives the same image on any device
and the same bytes on the CPU.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter, ImageOps

from core.vocabulary import AUGMENT_KINDS, resolve
from udfs.imaging import decode_mask, decode_rgb, encode_png, pixel_hash
from udfs.zoo import ModelZoo

REJECTED = "rejected:"  # error prefix of a Rejected task
OUTPUT_COLUMNS = ["image_id", "product_id", "kind", "parent_image_id", "task_key", "prompt_id", "prompt", "model",
                  "seed", "parameters", "image", "width", "height", "error"]


def fit_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """Scale so the longest side is `resolution`, each side a multiple of 8 (latent grid)."""
    scale = resolution / max(size)
    return tuple(max(8, int(round(side * scale / 8)) * 8) for side in size)


def resized_inputs(image_bytes: bytes, mask_bytes: bytes | None, resolution: int):
    """The parent (LANCZOS) and its mask (NEAREST) at generation size: the exact pixels a
    positive keeps and a counterfactual replaces."""
    parent = decode_rgb(image_bytes)
    size = fit_size(parent.size, resolution)
    mask = None
    if mask_bytes is not None:
        mask = Image.fromarray(decode_mask(mask_bytes).astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    return parent.resize(size, Image.Resampling.LANCZOS), mask


def generate_batches(zoo: ModelZoo):
    """The mapInPandas function over generation tasks; a failed task yields one error row."""

    def run(batches):
        for batch in batches:
            rows = []
            for task in batch.to_dict("records"):
                base = [task["product_id"], task["kind"], task["parent_image_id"], task["task_key"],
                        task["prompt_id"], task["prompt"], task["model"], int(task["seed"])]
                try:
                    role = AUGMENT_KINDS[task["kind"]].role
                    with zoo.exclusive(role) if role else contextlib.nullcontext():
                        outputs = run_task(zoo, task)
                    for image, extra in outputs:
                        params = {**json.loads(task["parameters"]), **extra}
                        rows.append([pixel_hash(image), *base, json.dumps(params, sort_keys=True),
                                     encode_png(image), image.width, image.height, None])
                except Rejected as err:  # recorded in quarantine with its code, not retried
                    rows.append([None, *base, task["parameters"], None, None, None, f"{REJECTED}{err}"])
                except Exception as err:  # noqa: BLE001 - recorded in quarantine, never fatal
                    rows.append([None, *base, task["parameters"], None, None, None, f"{type(err).__name__}: {err}"])
            yield pd.DataFrame(rows, columns=OUTPUT_COLUMNS).astype({"seed": "int32", "width": "Int32",
                                                                     "height": "Int32"})

    return run


def run_task(zoo: ModelZoo, task: dict) -> list[tuple[Image.Image, dict]]:
    import torch

    kind = AUGMENT_KINDS[task["kind"]]
    generator = torch.Generator("cpu").manual_seed(int(task["seed"]))
    pipeline = zoo.load(kind.role) if kind.role else None
    return resolve(kind.generate)(pipeline, task, json.loads(task["parameters"]), generator)


def negative(pipeline, task: dict, params: dict, generator) -> list[tuple[Image.Image, dict]]:
    resolution = params["resolution"]
    image = pipeline(prompt=task["prompt"], height=resolution, width=resolution, num_inference_steps=params["steps"],
                     guidance_scale=params["guidance_scale"], generator=generator).images[0]
    return [(image, {})]


def novel_view(pipeline, task: dict, params: dict, generator) -> list[tuple[Image.Image, dict]]:
    if task["image"] is None:
        raise ValueError("the parent image is missing")
    parent, _ = resized_inputs(task["image"], None, params["resolution"])
    frames = pipeline(parent, height=parent.height, width=parent.width, num_frames=params["frames"],
                      num_inference_steps=params["steps"], decode_chunk_size=params["frames"],
                      generator=generator, noise_aug_strength=0.02).frames[0]
    return [(frames[i].convert("RGB"), {"frame": i}) for i in params["keep_frames"]]


def mirror(pipeline, task: dict, params: dict, generator) -> list[tuple[Image.Image, dict]]:
    """The parent flipped left to right at its own size: no model, every pixel kept."""
    if task["image"] is None:
        raise ValueError("the parent image is missing")
    return [(ImageOps.mirror(decode_rgb(task["image"])), {})]


class Rejected(Exception):
    """A task ran but its output must not be used (recorded with `code`, not retried)."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code = code


def _inpainted(pipeline, task: dict, params: dict, generator, outpaint: bool) -> list[tuple[Image.Image, dict]]:
    if task["image"] is None:
        raise ValueError("the parent image is missing")
    if task["mask"] is None:
        raise ValueError("the parent image has no product mask")
    parent, mask = resized_inputs(task["image"], task["mask"], params["resolution"])
    if outpaint:
        repaint = Image.eval(mask, lambda v: 255 - v)  # everything but the product
    else:  # counterfactual: the product region, grown a little so another object fits
        repaint = mask.filter(ImageFilter.MaxFilter(params.get("dilate", 5)))
    generated = pipeline(prompt=task["prompt"], image=parent, mask_image=repaint, height=parent.height,
                         width=parent.width, num_inference_steps=params["steps"],
                         guidance_scale=params["guidance_scale"],
                         generator=generator).images[0].convert("RGB").resize(parent.size)
    # Keep what must not change exactly: the product (outpaint) or the background (counterfactual).
    keep = mask if outpaint else Image.eval(repaint, lambda v: 255 - v)
    result = Image.composite(parent, generated, keep)
    if not outpaint:
        _check_changed(parent, result, repaint, params.get("min_change", 2.0))
    return [(result, {"size": list(parent.size)})]


def _check_changed(parent: Image.Image, result: Image.Image, region: Image.Image, min_change: float) -> None:
    """A counterfactual must replace the product: mean absolute pixel change (0-255) inside the
    repainted region at least `min_change`, or it would be the parent again, a positive."""
    inside = np.asarray(region) > 0
    if not inside.any():
        raise Rejected("counterfactual_unchanged", "the parent's product mask is empty: nothing to replace")
    change = float(np.abs(np.asarray(result, dtype=np.int16) - np.asarray(parent, dtype=np.int16))[inside].mean())
    if change < min_change:
        raise Rejected("counterfactual_unchanged", f"the product region changed by {change:.2f} on average "
                                                   f"(minimum {min_change}): the image would be its parent again")


def outpaint(pipeline, task, params, generator):
    return _inpainted(pipeline, task, params, generator, outpaint=True)


def counterfactual(pipeline, task, params, generator):
    return _inpainted(pipeline, task, params, generator, outpaint=False)
