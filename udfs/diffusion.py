"""Diffusion pipelines (diffusers), loaded from `save_pretrained` folders.

Roles: `text2img` (in-class negatives, LoRA training and generation), `inpaint` (outpainted
backgrounds and counterfactuals) and `image2video` (StableVideoDiffusionPipeline: novel views).
The family of a text-to-image or inpainting snapshot (SD 1.x/2.x, SDXL or FLUX.2 [klein]) is read
from its `model_index.json`, as diffusers' AutoPipeline does: FAMILIES is the one table of what
differs (pipeline classes, denoiser, text conditioning, loss, LoRA targets, the CLI name). A real
snapshot is a folder swap; the tiny builders write random-weight components with the real
architectures in the same layout.
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


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# FLUX.2 [klein] as diffusers' klein DreamBooth LoRA trainer targets it: the double-stream blocks'
# attention projections, the single-stream blocks' fused QKV+MLP input and their attention output.
# `{i}` runs over the model's single-stream blocks.
FLUX2_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", "single_transformer_blocks.{i}.attn.to_out")


@dataclass(frozen=True)
class Family:
    """What differs between base-model families for loading, LoRA training, saving and the CLI."""

    name: str  # the CLI's and models.tiny_family's name
    text2img: str  # diffusers pipeline classes
    inpaint: str
    text_encoders: tuple[str, ...]  # pipeline attributes; the LoRA file prefixes them alike
    tokenizers: tuple[str, ...]
    added_conditions: bool  # SDXL: pooled text embeddings and size/crop time ids go into the UNet
    denoiser: str = "unet"  # the pipeline attribute LoRA trains
    # "noise" (DDPM: epsilon or v-prediction, per the scheduler) or "flow_matching" (rectified
    # flow: target noise - x0 on packed, batch-normalised latents, as diffusers' FLUX.2 trainers)
    loss: str = "noise"
    lora_targets: tuple[str, ...] = UNET_TARGETS  # the default when training.target_modules is unset
    # The pipeline that edits from reference photos without training (the zero-shot arm), if any.
    reference: str | None = None
    build_tiny: str = "_build_tiny_sd"  # this module's builder of the tiny random-weight snapshot
    # The adapter file's key names, as the family's diffusers trainer writes them: "diffusers"
    # (lora.down/up, the SD trainers convert peft's names) or "peft" (lora_A/B, the FLUX trainers).
    lora_keys: str = "diffusers"

    def lora_target_modules(self, denoiser) -> list[str]:
        """The default LoRA targets, `{i}` expanded over the denoiser's single-stream blocks."""
        blocks = range(getattr(denoiser.config, "num_single_layers", 0))
        return [name for target in self.lora_targets
                for name in ([target.format(i=i) for i in blocks] if "{i}" in target else [target])]


SD = Family("sd", "StableDiffusionPipeline", "StableDiffusionInpaintPipeline", ("text_encoder",), ("tokenizer",),
            added_conditions=False)
SDXL = Family("sdxl", "StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline",
              ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), added_conditions=True,
              build_tiny="_build_tiny_sdxl")
# FLUX.2 [klein]: the smallest open flow-matching family diffusers both LoRA-trains and runs with
# reference images (Flux2KleinPipeline(image=[...]) conditions on them without training); a
# Qwen3 text encoder (three hidden layers stacked), no guidance embedding, its own inpainting.
FLUX2_KLEIN = Family("flux2-klein", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline", ("text_encoder",),
                     ("tokenizer",), added_conditions=False, denoiser="transformer", loss="flow_matching",
                     lora_targets=FLUX2_TARGETS, reference="Flux2KleinPipeline", build_tiny="_build_tiny_flux2_klein",
                     lora_keys="peft")
BY_NAME = {family.name: family for family in (SD, SDXL, FLUX2_KLEIN)}
# model_index.json `_class_name` -> family.
FAMILIES = {cls: family for family in BY_NAME.values() for cls in (family.text2img, family.inpaint)}


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


# A tiny Qwen3 needs as many layers as the pipelines' default text_encoder_out_layers (9, 18, 27) reach.
TINY_QWEN_LAYERS = 27
TINY_QWEN_DIM = 16
# Qwen3's chat template, as far as FLUX.2 [klein] uses it (a user turn, then the assistant's empty thinking).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer in Qwen2's format, trained here on a few sentences (no download):
    any text tokenizes (the 256 byte symbols are its alphabet), with Qwen's special tokens and chat
    template. Real snapshots ship Qwen's own 151k-token tokenizer in the same format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["a photo of a product on a table in a kitchen", "user assistant think",
              "a mug, a shoe, a lamp, a chair, a bag, a bottle in a living room, outdoors, on a shelf"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, model_max_length=512)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _build_tiny_flux2_klein(pipeline_class, unet_in_channels: int, path: Path, seed: int):
    """FLUX.2 [klein]'s layout at tiny size: a Qwen3 causal LM whose hidden layers 9, 18 and 27
    are stacked as text states, a FLUX.2 VAE (batch-normalised, 2x2-patchified latents) and a
    Flux2Transformer2DModel with one double- and one single-stream block. The same components
    serve text-to-image and inpainting (diffusers' klein inpaint pipeline takes no extra channels)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    del unet_in_channels
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TINY_QWEN_DIM, intermediate_size=32,
        num_hidden_layers=TINY_QWEN_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    latent_channels = 4
    vae = AutoencoderKLFlux2(block_out_channels=(32, 64), latent_channels=latent_channels, layers_per_block=1,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             sample_size=64, norm_num_groups=32)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TINY_QWEN_DIM, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipeline = pipeline_class(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    pipeline.save_pretrained(path)
    return pipeline


def _build_tiny(role: str, unet_in_channels: int, path: Path, seed: int, family: str):
    import diffusers

    if family not in BY_NAME:
        raise UserError(f"unknown base-model family '{family}'; families: {', '.join(BY_NAME)}")
    chosen = BY_NAME[family]
    return globals()[chosen.build_tiny](getattr(diffusers, getattr(chosen, role)), unet_in_channels, path, seed)


def build_tiny_text2img(path: Path, seed: int = 0, family: str = "sd"):
    return _build_tiny("text2img", 4, path, seed, family)


def build_tiny_inpaint(path: Path, seed: int = 0, family: str = "sd"):
    return _build_tiny("inpaint", 9, path, seed, family)  # UNets: latents + mask + masked image


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
           batch_size: int, references: list | None = None) -> list:
    """One image per (prompt, seed), `batch_size` per pipeline call, at `size` x `size` pixels.
    Each image has its own seeded generator, so its noise does not depend on its batch.
    `references` (photos) condition a family's reference pipeline (Family.reference) with no training."""
    if references and type(pipeline).__name__ != FAMILIES[type(pipeline).__name__].reference:
        raise UserError(f"{type(pipeline).__name__} takes no reference photos (the zero-shot arm needs a family "
                        f"with a reference pipeline: {', '.join(f.name for f in BY_NAME.values() if f.reference)})")
    extra = {"image": list(references)} if references else {}
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds[chunk]]
        images += pipeline(prompt=prompts[chunk], num_inference_steps=steps, guidance_scale=guidance, height=size,
                           width=size, generator=generators, **extra).images
    return images
