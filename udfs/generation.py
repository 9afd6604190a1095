"""The augmentation UDF: one row per generation task in, one row per generated image out.

Kinds (paper sections 2.1-2.2, appendix A.2):
- novel_view: image-to-video clip from a reference; chosen frames become new viewpoints.
- outpaint: inpainting of everything *outside* the product mask from an approved scene prompt;
  the product's pixels are then copied back from the source, so they are unchanged exactly.
- counterfactual: inpainting of the (slightly dilated) product region of a positive with another
  object of the class; pixels outside that region are copied back (same background).
- negative: text-to-image of the class noun in a caption's scene (an in-class negative).
Noise comes from a CPU generator seeded per task, so a task gives the same image on any device
and the same bytes on the CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFilter

from udfs.imaging import decode_mask, decode_rgb, encode_png, pixel_hash
from udfs.zoo import ModelZoo

OUTPUT_COLUMNS = ["image_id", "product_id", "kind", "parent_image_id", "task_key", "prompt_id", "prompt", "model",
                  "seed", "parameters", "image", "width", "height", "error"]
ROLE_OF_KIND = {"novel_view": "image2video", "outpaint": "inpaint", "counterfactual": "inpaint",
                "negative": "text2img"}


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
                    with zoo.exclusive(ROLE_OF_KIND[task["kind"]]):
                        outputs = run_task(zoo, task)
                    for image, extra in outputs:
                        params = {**json.loads(task["parameters"]), **extra}
                        rows.append([pixel_hash(image), *base, json.dumps(params, sort_keys=True),
                                     encode_png(image), image.width, image.height, None])
                except Exception as err:  # noqa: BLE001 - recorded in quarantine, never fatal
                    rows.append([None, *base, task["parameters"], None, None, None, f"{type(err).__name__}: {err}"])
            yield pd.DataFrame(rows, columns=OUTPUT_COLUMNS).astype({"seed": "int32", "width": "Int32",
                                                                     "height": "Int32"})

    return run


def run_task(zoo: ModelZoo, task: dict) -> list[tuple[Image.Image, dict]]:
    params = json.loads(task["parameters"])
    kind, resolution = task["kind"], params["resolution"]
    pipeline = zoo.load(ROLE_OF_KIND[kind])
    generator = torch.Generator("cpu").manual_seed(int(task["seed"]))
    if kind == "negative":
        image = pipeline(task["prompt"], height=resolution, width=resolution, num_inference_steps=params["steps"],
                         guidance_scale=params["guidance_scale"], generator=generator).images[0]
        return [(image, {})]
    if task["image"] is None:
        raise ValueError("the parent image is missing")
    if kind == "novel_view":
        parent, _ = resized_inputs(task["image"], None, resolution)
        frames = pipeline(parent, height=parent.height, width=parent.width, num_frames=params["frames"],
                          num_inference_steps=params["steps"], decode_chunk_size=params["frames"],
                          generator=generator, noise_aug_strength=0.02).frames[0]
        return [(frames[i].convert("RGB"), {"frame": i}) for i in params["keep_frames"]]
    if task["mask"] is None:
        raise ValueError("the parent image has no product mask")
    parent, mask = resized_inputs(task["image"], task["mask"], resolution)
    if kind == "outpaint":
        repaint = Image.eval(mask, lambda v: 255 - v)  # everything but the product
    else:  # counterfactual: the product region, grown a little so another object fits
        repaint = mask.filter(ImageFilter.MaxFilter(params.get("dilate", 5)))
    generated = pipeline(task["prompt"], image=parent, mask_image=repaint, height=parent.height, width=parent.width,
                         num_inference_steps=params["steps"], guidance_scale=params["guidance_scale"],
                         generator=generator).images[0].convert("RGB").resize(parent.size)
    # Keep what must not change exactly: the product (outpaint) or the background (counterfactual).
    keep = mask if kind == "outpaint" else Image.eval(repaint, lambda v: 255 - v)
    return [(Image.composite(parent, generated, keep), {"size": list(parent.size)})]
