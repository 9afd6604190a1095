"""Benchmark: the project's own trainer and generation at a profile's settings, full size.

bench/bench_gpu.py times the model work in a bare PyTorch loop; this times the code every
product runs: `train_lora` (training/lora.py) with the `sd15` or `sdxl` profile's own training
settings (core/settings.py PROFILES: resolution, rank, batch, gradient accumulation, learning rate;
gradient checkpointing as the trainer decides it, on from 768 px), then generation through
`adapter_loaded` + `render` at the profile's generation settings, unfused and fused, and the
cost of one adapter cycle (load, fuse, unfuse, put the base weights back, unload).

The pipeline (UNet, VAE, text encoder(s), the real CLIP BPE tokenizer) is built at full size with
RANDOM weights right on the device (nothing is downloaded or written): timings and memory only,
nothing about image quality.

    PYTHONPATH=/tmp/gw:.:tests HF_HUB_OFFLINE=1 python bench/bench_gpu_trainer.py --profile sd15 --out x.json
    python bench/bench_gpu_trainer.py --profile sdxl --tiny          # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_gpu import clip_text_config, sd15_unet_config, sdxl_unet_config, vae_config  # noqa: E402


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke test, not a figure)"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_pipeline(sdxl: bool, tiny: bool):
    """A full-size (or tiny) SD 1.5 or SDXL pipeline with random weights, on the device, bf16 on CUDA."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from udfs.diffusion import clip_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(sdxl_unet_config(tiny) if sdxl else sd15_unet_config(tiny)))
        vae = AutoencoderKL(**vae_config(tiny, sdxl=sdxl))
        if not sdxl:
            text_encoder = CLIPTextModel(clip_text_config(tiny))
        else:  # SDXL: CLIP ViT-L's text model and OpenCLIP bigG's, with its projection (pooled)
            big = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       projection_dim=32) if tiny else dict(hidden_size=1280, num_hidden_layers=32,
                                                            num_attention_heads=20, intermediate_size=5120,
                                                            projection_dim=1280, hidden_act="gelu")
            text_encoder = CLIPTextModel(clip_text_config(tiny))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                                        **big))
    if sdxl:
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                             tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                             scheduler=scheduler, add_watermarker=False)
    else:
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipeline = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as udfs.diffusion.load_pipeline
    return pipeline.to(device=device, dtype=dtype)


def train(pipeline, config, steps: int, warmup: int, out: Path) -> dict:
    from sample_images import product_shot
    from training.lora import Example, instance_prompt, train_lora

    examples = [Example(product_shot(640 + 80 * (i % 3), 480, seed=i), instance_prompt("sks", "mug", f"caption {i}"))
                for i in range(5)]
    stamps: list[float] = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train_lora(pipeline, examples, config, out, steps=steps,
                        on_step=lambda step, loss: stamps.append(time.perf_counter()))  # the loss syncs
    total = time.perf_counter() - started
    timed = stamps[warmup:]
    per_step = (timed[-1] - timed[0]) / max(len(timed) - 1, 1)
    return {"s_per_1000_steps": round(per_step * 1000, 1), "timed_steps": len(timed) - 1,
            "setup_s (latents, text, first steps)": round(total - (stamps[-1] - stamps[warmup]), 1),
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
            else None,
            "losses_finite": all(loss == loss and abs(loss) != float("inf") for loss in result.losses),
            "gradient_checkpointing": bool(config.gradient_checkpointing or (
                config.gradient_checkpointing is None and config.resolution >= 768)),
            "adapter_dir": str(result.adapter_dir)}


def generate(pipeline, adapter: Path, generation, tiny: bool) -> dict:
    """Images/s of one batch through adapter_loaded + render, unfused and fused, and the time of
    one adapter cycle each way (the fused one includes keeping and restoring the base weights)."""
    from udfs.diffusion import _adapted_weights, adapter_loaded, render

    prompts = [f"a photo of sks mug, scene {i}" for i in range(generation.batch_size)]
    seeds = list(range(generation.batch_size))
    figures = {"px": generation.resolution, "steps": generation.steps, "batch": generation.batch_size}
    for fuse in (False, True):
        name = "fused" if fuse else "unfused"
        cycles = []
        for _ in range(3):
            sync()
            started = time.perf_counter()
            with adapter_loaded(pipeline, adapter, fuse=fuse):
                sync()
            sync()
            cycles.append(time.perf_counter() - started)
        with adapter_loaded(pipeline, adapter, fuse=fuse) as loaded:
            if fuse:
                figures["base_copy_mib"] = round(sum(w.numel() * w.element_size()
                                                     for w in _adapted_weights(loaded)) / 2**20, 1)
            render(loaded, prompts, seeds, 2, generation.guidance_scale, generation.resolution, len(prompts))  # warm
            sync()
            started = time.perf_counter()
            render(loaded, prompts, seeds, generation.steps, generation.guidance_scale, generation.resolution,
                   len(prompts))
            sync()
            seconds = time.perf_counter() - started
        figures[f"{name}_images_per_s"] = round(len(prompts) / seconds, 3)
        figures[f"{name}_adapter_cycle_s"] = round(min(cycles), 3)
    figures["fused_speedup"] = round(figures["fused_images_per_s"] / figures["unfused_images_per_s"], 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--tiny", action="store_true", help="tiny configs at 64 px: a CPU smoke test")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps timed (default: 40 sd15, 12 sdxl)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from core.settings import PROFILES, GenerationSettings, TrainingSettings

    profile = PROFILES[args.profile]
    config = dataclasses.replace(TrainingSettings(**profile["training"]), mixed_precision="auto",
                                 checkpoint_every=10**9, validate_every=10**9)
    generation = GenerationSettings(**profile["generation"])
    if args.tiny:
        config = dataclasses.replace(config, resolution=64, rank=4)
        generation = dataclasses.replace(generation, resolution=64, steps=2)
    steps = args.steps or (40 if args.profile == "sd15" else 12)
    report = {"card": card(), "profile": args.profile, "tiny": args.tiny,
              "measure": "training/lora.py train_lora and udfs.diffusion adapter_loaded + render, "
                         "random weights at full size (timings only)",
              "training_settings": {k: getattr(config, k) for k in (
                  "resolution", "rank", "batch_size", "gradient_accumulation_steps", "learning_rate",
                  "mixed_precision", "gradient_checkpointing")}}
    started = time.perf_counter()
    pipeline = build_pipeline(args.profile == "sdxl", args.tiny)
    report["build_s"] = round(time.perf_counter() - started, 1)
    with tempfile.TemporaryDirectory() as scratch:
        report["train"] = train(pipeline, config, steps, min(args.warmup, steps - 2), Path(scratch) / "run")
        if not args.no_generate:
            report["generate"] = generate(pipeline, Path(report["train"].pop("adapter_dir")), generation, args.tiny)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
