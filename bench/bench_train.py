"""Benchmark: LoRA training and generation speed per base-model family.

    python bench/bench_train.py                          # tiny SD and tiny SDXL here: training s per
                                                          # 100 steps, generation images/s at batch 1 vs 4
    python bench/bench_train.py --full-size --device cuda   # SD 1.5-size UNet, 512 px, bf16, rank 64

The full-size run builds a random-weight Stable Diffusion 1.5-size pipeline in the diffusers
layout (UNet2DConditionModel defaults, SD VAE, CLIP ViT-L/14 text encoder), then trains rank-64
LoRA at batch 1 and batch 4 and reports seconds per 1,000 steps (after 5 warm-up steps).
Published anchor: DreamBooth full fine-tune, 1,000 steps, ~5 minutes on an A100.
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

from core.settings import TrainingSettings  # noqa: E402
from sample_images import product_shot  # noqa: E402
from training.lora import Example, instance_prompt, train_lora  # noqa: E402


def build_full_size(path: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from udfs.diffusion import clip_tokenizer

    StableDiffusionPipeline(
        unet=UNet2DConditionModel(cross_attention_dim=768, sample_size=64),
        vae=AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                          up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                  num_attention_heads=12)),
        tokenizer=clip_tokenizer(), scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False),
        safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).save_pretrained(path)


def timed(pipeline, config: TrainingSettings, steps: int, device: str, work: Path) -> float:
    examples = [Example(product_shot(config.resolution, config.resolution, seed=i), instance_prompt("mmes", "mug"))
                for i in range(8)]
    warm = train_lora(pipeline, examples, config, work / "warm", steps=5)
    assert warm.losses
    marks = {}
    train_lora(pipeline, examples, config, work / "run", steps=steps + 5,
               on_step=lambda step, loss: marks.setdefault(step, time.perf_counter()))
    if device == "cuda":
        torch.cuda.synchronize()
    return (marks[steps + 5] - marks[5]) / steps


def images_per_second(pipeline, batch: int, images: int = 16, steps: int = 8) -> float:
    """Generation throughput at `batch` prompts per call (one warm-up call first)."""
    def call(seeds):
        pipeline([instance_prompt("mmes", "mug", "on a marble counter")] * len(seeds), num_inference_steps=steps,
                 height=64, width=64, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])

    call(range(batch))
    started = time.perf_counter()
    for start in range(0, images, batch):
        call(range(start, start + batch))
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recontext-bench-train-"))
    results = {"machine": f"{platform.machine()}, torch {torch.__version__}, "
                          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}"}
    if args.full_size:
        from udfs.diffusion import load_pipeline

        build_full_size(work / "sd15")
        pipeline = load_pipeline("text2img", work / "sd15", args.device)
        for batch in (1, 4):
            config = TrainingSettings(rank=64, resolution=512, batch_size=batch, mixed_precision="bf16",
                                      checkpoint_every=10**9)
            per_step = timed(pipeline, config, args.steps, args.device, work / f"b{batch}")
            results[f"sd15_rank64_512px_batch{batch}_s_per_1000_steps"] = round(per_step * 1000, 1)
    else:
        from core.settings import Settings
        from udfs.zoo import ModelZoo

        for family in ("sd", "sdxl"):
            zoo = ModelZoo.from_settings(Settings.load(work / "home", models={"tiny_family": family,
                                                                               "device": args.device}))
            zoo.check("text2img")
            pipeline = zoo.load("text2img")
            for batch in (1, 4):
                config = TrainingSettings(batch_size=batch, checkpoint_every=10**9)
                per_step = timed(pipeline, config, args.steps, args.device, work / f"{family}-b{batch}")
                results[f"tiny_{family}_64px_rank4_batch{batch}_train_s_per_100_steps"] = round(per_step * 100, 2)
            one, four = images_per_second(pipeline, 1), images_per_second(pipeline, 4)
            results[f"tiny_{family}_generation_images_per_s_batch1"] = round(one, 2)
            results[f"tiny_{family}_generation_images_per_s_batch4"] = round(four, 2)
            results[f"tiny_{family}_generation_batch4_speedup"] = round(four / one, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
