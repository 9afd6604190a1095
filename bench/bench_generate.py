"""Benchmark: generation with a LoRA adapter, unfused and fused into the base weights.

    python bench/bench_generate.py                          # tiny pipeline here: seconds per image
    python bench/bench_generate.py --full-size --device cuda   # SD 1.5-size, 512 px, 30 steps, bf16

Both build the pipeline, train a short LoRA on it (the adapter's values do not change the cost),
then time the same prompts and seeds with the adapter loaded as LoRA layers and again after
`fuse_lora()` (the LoRA product added into the base weights: no extra matmuls per step), side by
side in one process. The full-size components are random weights in the SD 1.5 shapes
(bench_train.build_full_size); pass --images to change the count (after one warm-up image).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from bench_train import build_full_size  # noqa: E402
from core.settings import TrainingSettings  # noqa: E402
from sample_images import product_shot  # noqa: E402
from training.lora import Example, instance_prompt, train_lora  # noqa: E402


def timed(pipeline, images: int, resolution: int, steps: int, device: str) -> float:
    """Seconds per image over `images` images (one warm-up image first)."""
    def one(seed: int):
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipeline(instance_prompt("mmes", "mug", "on a marble counter"), num_inference_steps=steps,
                        guidance_scale=5.0, height=resolution, width=resolution, generator=generator).images[0]

    one(0)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for seed in range(1, images + 1):
        one(seed)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None)
    args = parser.parse_args()
    from udfs.diffusion import load_pipeline

    work = Path(tempfile.mkdtemp(prefix="recontext-bench-gen-"))
    if args.full_size:
        base, resolution, steps, rank, dtype = work / "sd15", 512, 30, 64, torch.bfloat16
        build_full_size(base)
        images = args.images or 8
    else:
        from core.settings import Settings
        from udfs.zoo import ModelZoo

        zoo = ModelZoo.from_settings(Settings.load(work / "home"))
        zoo.check("text2img")
        base, resolution, steps, rank, dtype = zoo.path("text2img"), 64, 8, 4, torch.float32
        images = args.images or 20
    config = TrainingSettings(rank=rank, resolution=min(resolution, 512), batch_size=1,
                              checkpoint_every=10**9, mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    examples = [Example(product_shot(resolution, resolution, seed=i), instance_prompt("mmes", "mug")) for i in range(2)]
    pipeline = load_pipeline("text2img", base, args.device, dtype)
    adapter = train_lora(pipeline, examples, config, work / "lora", steps=2).adapter_dir

    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(adapter))
    unfused = timed(pipeline, images, resolution, steps, args.device)
    pipeline.fuse_lora()
    fused = timed(pipeline, images, resolution, steps, args.device)
    size = f"sd15_{resolution}px_{steps}steps_bf16" if args.full_size else f"tiny_{resolution}px_{steps}steps"
    print(json.dumps({
        "machine": f"{platform.machine()}, torch {torch.__version__}, "
                   f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
        f"{size}_lora_s_per_image": round(unfused, 4), f"{size}_fused_s_per_image": round(fused, 4),
        f"{size}_lora_images_per_s": round(1 / unfused, 3), f"{size}_fused_images_per_s": round(1 / fused, 3),
        "fused_speedup": round(unfused / fused, 3), "images_timed": images}, indent=2))


if __name__ == "__main__":
    main()
