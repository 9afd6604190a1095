"""Benchmark: the project's own LoRA trainer (training/lora.py) on a full-size SD 1.5 snapshot.

bench/bench_gpu.py times the model work in a bare PyTorch loop; this times `train_lora` itself
(the code every product's training runs today), so the two side by side show what the trainer
adds or loses at real settings. A full-size SD 1.5 pipeline (UNet, VAE, CLIP ViT-L/14 text
encoder, the real CLIP BPE tokenizer) is built with RANDOM weights and saved in diffusers' layout,
then `train_lora` trains rank 64 (alpha 64), batch 1 at 512 px, bf16 autocast, for --steps steps
on 5 product shots; per-step times come from its `on_step` callback (the loss is read each step,
which synchronizes the GPU), after --warmup steps. Timings only: nothing about image quality.

    PYTHONPATH=/tmp/gw:. HF_HUB_OFFLINE=1 python bench/bench_gpu_trainer.py --out $OUT/trainer.json
    python bench/bench_gpu_trainer.py --tiny          # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_gpu import clip_text_config, sd15_unet_config, vae_config  # noqa: E402


def build_snapshot(path: Path, tiny: bool) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from udfs.diffusion import clip_tokenizer

    torch.manual_seed(0)
    pipeline = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**sd15_unet_config(tiny)), vae=AutoencoderKL(**vae_config(tiny, sdxl=False)),
        text_encoder=CLIPTextModel(clip_text_config(tiny)), tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from etl.config import TrainingSettings
    from sample_images import product_shot
    from training.lora import Example, instance_prompt, train_lora

    resolution = 64 if args.tiny else 512
    config = TrainingSettings(rank=64, resolution=resolution, batch_size=1, learning_rate=1e-4,
                              mixed_precision="bf16", checkpoint_every=10**9, validate_every=10**9)
    examples = [Example(product_shot(640, 480, seed=i), instance_prompt("sks", "mug", f"caption {i}"))
                for i in range(5)]
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        build_snapshot(Path(scratch) / "sd15", args.tiny)
        built = time.perf_counter() - started
        stamps: list[float] = []
        started = time.perf_counter()
        from udfs.diffusion import load_pipeline

        pipeline = load_pipeline("text2img", Path(scratch) / "sd15")
        result = train_lora(pipeline, examples, config, Path(scratch) / "run", steps=args.steps,
                            on_step=lambda step, loss: stamps.append(time.perf_counter()))
        total = time.perf_counter() - started
    timed = stamps[args.warmup:]
    per_step = (timed[-1] - timed[0]) / (len(timed) - 1)
    report = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "measure": "training/lora.py train_lora, SD 1.5 full size, random weights, rank 64, 512 px, batch 1, bf16",
        "snapshot_build_s": round(built, 1), "train_lora_call_s": round(total, 1),
        "setup_s (load, latents, first steps)": round(total - (stamps[-1] - stamps[0]), 1),
        "s_per_1000_steps": round(per_step * 1000, 1), "timed_steps": len(timed) - 1,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "final_loss": result.losses[-1],
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
