"""Diffusion pipelines (diffusers), loaded from `save_pretrained` folders.

Roles: `text2img` (in-class negatives, LoRA training and generation), `inpaint` (outpainted
backgrounds and counterfactuals) and `image2video` (StableVideoDiffusionPipeline: novel views).
The family of a text-to-image or inpainting snapshot (SD 1.x/2.x or SDXL) is read from its
`model_index.json`, as diffusers' AutoPipeline does: FAMILIES is the one table of what differs
(pipeline classes, text encoders, the added SDXL conditioning). A real snapshot is a folder swap;
the tiny builders write random-weight components with the real architectures in the same layout.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import UserError
from udfs.device import BUILDING, pick_device

TINY_TEXT_DIM = 32


@dataclass(frozen=True)
class Family:
    """What differs between base-model families for loading, LoRA training and saving."""

    name: str
    text2img: str  # diffusers pipeline classes
    inpaint: str
    text_encoders: tuple[str, ...]  # pipeline attributes; the LoRA file prefixes them alike
    tokenizers: tuple[str, ...]
    added_conditions: bool  # SDXL: pooled text embeddings and size/crop time ids go into the UNet


SD = Family("sd", "StableDiffusionPipeline", "StableDiffusionInpaintPipeline", ("text_encoder",), ("tokenizer",),
            added_conditions=False)
SDXL = Family("sdxl", "StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline",
              ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), added_conditions=True)
# model_index.json `_class_name` -> family. A flow-matching family (SD3, FLUX) would be one more
# entry plus its loss (flow-matching target, T5 conditioning) in training/lora.py.
FAMILIES = {cls: family for family in (SD, SDXL) for cls in (family.text2img, family.inpaint)}


def family_of(path: str | Path) -> Family:
    """The family of a diffusers snapshot, from its model_index.json; an unknown one is named."""
    index = Path(path) / "model_index.json"
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{index} is missing or has no _class_name ({err}); is {path} a diffusers snapshot?") from err
    if name not in FAMILIES:
        raise UserError(f"{path} holds a {name}; supported base models: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def load_pipeline(role: str, path: str | Path, device: str = "auto", dtype: torch.dtype | None = None):
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    if role == "image2video":
        cls = diffusers.StableVideoDiffusionPipeline
    else:
        cls = getattr(diffusers, getattr(family_of(path), role))
    target = pick_device(device)
    # Inference: half precision on GPUs (bf16 where supported); fp32 on the CPU, exact and portable.
    # Training keeps these frozen weights and trains fp32 LoRA weights under autocast.
    if dtype is None:
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if target.type == "cuda" \
            else torch.float32
    kwargs = {"safety_checker": None, "requires_safety_checker": False} \
        if cls.__name__.startswith("StableDiffusion") and "XL" not in cls.__name__ else {}
    with BUILDING:  # one load at a time per process (udfs.device)
        pipeline = cls.from_pretrained(str(path), local_files_only=True, dtype=dtype, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(target)


def clip_tokenizer():
    """The real CLIP BPE tokenizer (49,408 tokens) from the vocabulary that open_clip ships."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    # open_clip spells the special tokens <start_of_text>/<end_of_text>; transformers, <|...|>.
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): i for token, i in bpe.encoder.items()}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    if len(tokenizer) != 49408:  # transformers can build a near-empty vocabulary without an error
        raise RuntimeError(f"CLIP tokenizer has {len(tokenizer)} tokens, expected 49408")
    return tokenizer


def _tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=TINY_TEXT_DIM,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, projection_dim=TINY_TEXT_DIM))


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, sample_size=64)


def _tiny_unet(in_channels: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM, attention_head_dim=8, norm_num_groups=32)


def _tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _build_tiny_sd(pipeline_class, unet_in_channels: int, path: Path, seed: int):
    torch.manual_seed(seed)
    pipeline = pipeline_class(
        unet=_tiny_unet(unet_in_channels), vae=_tiny_vae(), text_encoder=_tiny_text_encoder(),
        tokenizer=clip_tokenizer(), scheduler=_tiny_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.save_pretrained(path)
    return pipeline


def _build_tiny_sdxl(pipeline_class, unet_in_channels: int, path: Path, seed: int):
    """SDXL's layout at tiny size: two CLIP text encoders (the second with a projection, whose
    pooled output joins the size/crop time ids as added conditioning) feeding one UNet."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=TINY_TEXT_DIM,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, projection_dim=TINY_TEXT_DIM, hidden_act="gelu")
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=unet_in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 2), cross_attention_dim=2 * TINY_TEXT_DIM, norm_num_groups=32,
        # six time ids (original size, crop corner, target size) plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_embed_dim + TINY_TEXT_DIM)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    kwargs = {"requires_aesthetics_score": False} if unet_in_channels == 9 else {}
    pipeline = pipeline_class(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, **kwargs)
    pipeline.save_pretrained(path)
    return pipeline


def build_tiny_text2img(path: Path, seed: int = 0, family: str = "sd"):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return _build_tiny_sdxl(StableDiffusionXLPipeline, 4, path, seed)
    return _build_tiny_sd(StableDiffusionPipeline, 4, path, seed)


def build_tiny_inpaint(path: Path, seed: int = 0, family: str = "sd"):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    # latents + mask + masked image
    if family == "sdxl":
        return _build_tiny_sdxl(StableDiffusionXLInpaintPipeline, 9, path, seed)
    return _build_tiny_sd(StableDiffusionInpaintPipeline, 9, path, seed)


def build_tiny_image2video(path: Path, seed: int = 0):
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=(2, 4), projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                       down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4)
    # SVD resizes its conditioning image to 224 px before the image encoder.
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        intermediate_size=37, patch_size=32))
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    pipeline = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}))
    pipeline.save_pretrained(path)
    (path / "recontext_tiny.json").write_text(json.dumps({"seed": seed}))
    return pipeline


# The zoo's loaders (udfs/zoo.py ROLES), one per pipeline role.
def load_text2img(path, models):
    return load_pipeline("text2img", path, models.device)


def load_inpaint(path, models):
    return load_pipeline("inpaint", path, models.device)


def load_image2video(path, models):
    return load_pipeline("image2video", path, models.device)


@contextmanager
def adapter_loaded(pipeline, adapter_path: str | Path, fuse: bool = False):
    """The worker's base pipeline with a LoRA adapter for the duration of a block, then exactly
    the base again.

    `fuse` folds the adapter into the weights (no extra LoRA matmuls per step). Unfusing
    subtracts the update back in the weights' own precision, which in bf16/fp16 is not exact:
    the shared base would drift a little with every product and every service request. So the
    original tensors of the layers the adapter touches are kept (a copy on their own device,
    held only for the block) and put back after unfusing: the base stays bit-identical to a
    fresh load after any number of adapters."""
    pipeline.load_lora_weights(str(adapter_path))
    originals = {}
    try:
        if fuse:
            originals = {id(w): (w, w.detach().clone()) for w in _adapted_weights(pipeline)}
            pipeline.fuse_lora()
        yield pipeline
    finally:
        try:
            if fuse:
                pipeline.unfuse_lora()
        finally:
            with torch.no_grad():
                for weight, original in originals.values():
                    weight.copy_(original)
            pipeline.unload_lora_weights()


def _adapted_weights(pipeline) -> list[torch.Tensor]:
    """The base weights (and biases) of every layer a LoRA adapter wraps, in every component:
    what fusing changes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    weights = []
    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for module in component.modules():
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                weights += [p for p in (getattr(base, "weight", None), getattr(base, "bias", None)) if p is not None]
    return weights


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
