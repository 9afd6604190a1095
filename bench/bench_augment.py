"""Benchmark: augmentation cost.

    python bench/bench_augment.py                 # tiny models, sample catalog: seconds per product per stage
    python bench/bench_augment.py --full-size --device cuda   # GPU: SD 1.5-size inpainting, SVD-size clip

The tiny run measures the whole `recontext augment` sequence on the sample catalog (4 products,
real SmolLM2 prompt bank, tiny random-weight diffusion models), then the unchanged re-run.
The full-size run builds random-weight pipelines with the real architectures (SD 1.5
inpainting UNet, 512 px, 30 steps; SVD img2vid UNet, 14 frames at 576x1024, 25 steps) and
times one image / one clip after a warm-up, in bf16 on CUDA.
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

import torch  # noqa: E402


def tiny_run() -> dict:
    from core.settings import Settings
    from etl.ingest import ingest
    from etl.lakehouse import Lakehouse
    from jobs.steps import run_steps
    from etl.sample_catalog import write_sample_catalog
    from jobs.graph import steps_for

    AUGMENTATION = steps_for("augment")

    home = Path(tempfile.mkdtemp(prefix="recontext-bench-aug-"))
    lake = Lakehouse(Settings.load(home))
    ingest(lake, write_sample_catalog(home / "catalog"))
    products = 4
    timings: dict[str, float] = {}
    last = [time.perf_counter()]

    def progress(line: str) -> None:
        name = line.split()[0]
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - last[0]
        last[0] = now

    started = time.perf_counter()
    run_steps(lake, AUGMENTATION, progress=progress)
    total = time.perf_counter() - started
    again = time.perf_counter()
    run_steps(lake, AUGMENTATION, progress=lambda _: None)
    rerun = time.perf_counter() - again
    images = lake.spark.sql("SELECT kind, count(*) AS n FROM synthetic_images GROUP BY kind").toPandas()
    return {"products": products, "seconds_per_product": {k: round(v / products, 2) for k, v in timings.items()},
            "total_s": round(total, 1), "unchanged_rerun_s": round(rerun, 1),
            "synthetic_images": dict(zip(images.kind, images.n.astype(int)))}


def full_size_run(device: str) -> dict:
    from diffusers import (AutoencoderKL, AutoencoderKLTemporalDecoder, DDIMScheduler, EulerDiscreteScheduler,
                           StableDiffusionInpaintPipeline, StableVideoDiffusionPipeline, UNet2DConditionModel,
                           UNetSpatioTemporalConditionModel)
    from PIL import Image
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from udfs.diffusion import clip_tokenizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = {}
    # SD 1.5 inpainting: UNet2DConditionModel's defaults are SD 1.x sizes; 9 input channels.
    inpaint = StableDiffusionInpaintPipeline(
        unet=UNet2DConditionModel(in_channels=9, cross_attention_dim=768, sample_size=64),
        vae=AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                          up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                  num_attention_heads=12, vocab_size=49408)),
        tokenizer=clip_tokenizer(), scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(device, dtype)
    inpaint.set_progress_bar_config(disable=True)
    image, mask = Image.new("RGB", (512, 512), "white"), Image.new("L", (512, 512), 255)
    for label in ("warmup", "timed"):
        started = time.perf_counter()
        inpaint("a photo of a mug on a marble counter", image=image, mask_image=mask, num_inference_steps=30,
                generator=torch.Generator("cpu").manual_seed(0))
        if device == "cuda":
            torch.cuda.synchronize()
        results["outpaint_512px_30_steps_s_per_image"] = round(time.perf_counter() - started, 2)
    del inpaint
    # SVD img2vid: the spatio-temporal UNet's defaults are SVD sizes.
    video = StableVideoDiffusionPipeline(
        vae=AutoencoderKLTemporalDecoder(block_out_channels=[128, 256, 512, 512],
                                         down_block_types=["DownEncoderBlock2D"] * 4, layers_per_block=2),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
            patch_size=14, image_size=224, projection_dim=1024)),
        unet=UNetSpatioTemporalConditionModel(),
        scheduler=EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True, sigma_max=700.0,
                                         sigma_min=0.002, timestep_type="continuous"),
        feature_extractor=CLIPImageProcessor()).to(device, dtype)
    video.set_progress_bar_config(disable=True)
    for label in ("warmup", "timed"):
        started = time.perf_counter()
        video(Image.new("RGB", (1024, 576), "white"), height=576, width=1024, num_frames=14, num_inference_steps=25,
              decode_chunk_size=7, generator=torch.Generator("cpu").manual_seed(0))
        if device == "cuda":
            torch.cuda.synchronize()
        results["novel_view_clip_14_frames_576x1024_25_steps_s"] = round(time.perf_counter() - started, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    machine = (f"{platform.machine()}, torch {torch.__version__}, "
               f"{torch.cuda.get_device_name() if torch.cuda.is_available() else f'cpu x{torch.get_num_threads()}'}")
    result = full_size_run(args.device) if args.full_size else tiny_run()
    print(json.dumps({"machine": machine, **result}, indent=2))


if __name__ == "__main__":
    main()
