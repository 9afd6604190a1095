"""DreamBooth-style LoRA fine-tuning of a Stable Diffusion UNet (paper 2.4, appendix A.5).

Our arm has no prior-preservation loss: negatives and counterfactuals are ordinary examples with
their own captions (without the rare token), so the adapter learns what the product is *not*.
The baseline arm, standard DreamBooth, passes `prior` examples (class images the base model
made from "a photo of a <class>"): each step then adds a batch of them, and their loss, times
`prior_loss_weight`, to the instance loss, as diffusers' reference trainer does. Latents
and (frozen) text states are computed once. Every `checkpoint_every` steps the LoRA weights,
optimizer state, data/noise generator state and loss history are written atomically; a run
that finds a checkpoint resumes from it and ends with exactly the weights of an uninterrupted
run (CPU), the property users most often find broken in peers' scripts.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from etl.config import TrainingSettings
from udfs.device import BUILDING, pick_device

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass(frozen=True)
class Example:
    image: Image.Image
    caption: str


@dataclass
class TrainResult:
    adapter_dir: Path
    losses: list[float]
    validations: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def instance_prompt(token: str, class_noun: str, caption: str | None = None) -> str:
    """"a photo of <token> <class>", joined with the fine-grained caption when there is one."""
    prompt = f"a photo of {token} {class_noun}"
    return f"{prompt}, {caption}" if caption else prompt


def train_lora(base_path: str | Path, examples: list[Example], config: TrainingSettings, out_dir: str | Path,
               steps: int | None = None, on_step: Callable[[int, float], None] | None = None,
               validate: Callable[[object, int], dict] | None = None, device: str = "auto",
               prior: list[Example] = (), prior_loss_weight: float = 1.0) -> TrainResult:
    """Train (or resume) a LoRA adapter; returns where `pytorch_lora_weights.safetensors` lies.

    `validate(pipeline, step)` is called every `validate_every` steps with the pipeline that holds
    the adapter being trained, and returns metrics to record.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from udfs.diffusion import load_pipeline

    if not examples:
        raise ValueError("no training examples")
    steps = steps or config.steps
    out_dir = Path(out_dir)
    target = pick_device(device)
    pipeline = load_pipeline("text2img", base_path, str(target), dtype=torch.float32)
    unet, vae, text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    with BUILDING:  # parallel tasks share torch's global generator and module construction
        torch.manual_seed(config.seed)  # the LoRA initialisation
        unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                    target_modules=list(config.target_modules)))
        if config.train_text_encoder:
            # peft directly: transformers 5's add_adapter wants a peft release not yet published.
            from peft import inject_adapter_in_model

            text_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                     target_modules=TEXT_ENCODER_TARGETS)
            inject_adapter_in_model(text_config, text_encoder)
            text_encoder.peft_config = {"default": text_config}
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    # Instance examples first, then the prior (class) examples: one tensor, two index ranges.
    latents = _cached_latents(vae, [e.image for e in [*examples, *prior]], config.resolution, target)
    captions = [e.caption for e in [*examples, *prior]]
    tokens = pipeline.tokenizer(captions, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(target)
    frozen_states = None if config.train_text_encoder else _encode(text_encoder, tokens).detach()

    generator = torch.Generator("cpu").manual_seed(config.seed)  # batches, noise and timesteps
    losses: list[float] = []
    validations: list[dict] = []
    start = _resume(out_dir, unet, text_encoder, optimizer, generator, losses, validations, config)
    unet.train()
    for step in range(start, steps):
        index = torch.randint(len(examples), (config.batch_size,), generator=generator)
        if prior:
            index = torch.cat([index, len(examples) + torch.randint(len(prior), (config.batch_size,),
                                                                    generator=generator)])
        noise = torch.randn(latents[index].shape, generator=generator).to(target)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),),
                                  generator=generator).to(target)
        noisy = noise_scheduler.add_noise(latents[index], noise, timesteps)
        states = frozen_states[index] if frozen_states is not None else _encode(text_encoder, tokens[index])
        with _autocast(target, config.mixed_precision):
            prediction = unet(noisy, timesteps, encoder_hidden_states=states).sample
        wanted = noise if noise_scheduler.config.prediction_type == "epsilon" \
            else noise_scheduler.get_velocity(latents[index], noise, timesteps)
        if prior:  # the instance loss plus the weighted prior-preservation loss
            n = config.batch_size
            loss = (F.mse_loss(prediction[:n].float(), wanted[:n].float())
                    + prior_loss_weight * F.mse_loss(prediction[n:].float(), wanted[n:].float()))
        else:
            loss = F.mse_loss(prediction.float(), wanted.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        done = step + 1
        if on_step:
            on_step(done, losses[-1])
        if validate and done % config.validate_every == 0:
            unet.eval()
            validations.append({"step": done, **validate(pipeline, done)})
            unet.train()
        if done % config.checkpoint_every == 0 or done == steps:
            _checkpoint(out_dir, done, unet, text_encoder, optimizer, generator, losses, validations, config)

    adapter_dir = out_dir / "adapter"
    scratch = out_dir / ".adapter-tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    StableDiffusionPipeline.save_lora_weights(
        scratch, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=(convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
                                  if config.train_text_encoder else None))
    shutil.rmtree(adapter_dir, ignore_errors=True)
    scratch.rename(adapter_dir)
    return TrainResult(adapter_dir, losses, validations, resumed_from=start)


def _cached_latents(vae, images: list[Image.Image], resolution: int, device: torch.device) -> torch.Tensor:
    """Each image centre-cropped to a square, resized, encoded once (distribution mean)."""
    tensors = []
    for image in images:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.convert("RGB").crop((left, top, left + side, top + side)).resize(
            (resolution, resolution), Image.Resampling.LANCZOS)
        pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
        tensors.append(pixels.permute(2, 0, 1).float() / 127.5 - 1.0)
    with torch.no_grad():
        latent = vae.encode(torch.stack(tensors).to(device)).latent_dist.mean
    return latent * vae.config.scaling_factor


def _encode(text_encoder, tokens: torch.Tensor) -> torch.Tensor:
    return text_encoder(tokens)[0]


def _autocast(device: torch.device, mixed_precision: str):
    if device.type != "cuda" or mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def _lora_state(unet, text_encoder, with_text: bool) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    if with_text:
        state.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(text_encoder).items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _checkpoint(out_dir: Path, step: int, unet, text_encoder, optimizer, generator, losses, validations,
                config: TrainingSettings) -> None:
    """checkpoint-<step>/: LoRA weights, optimizer, generator state, history. Written to a scratch
    folder and renamed, so a kill mid-write never leaves a half checkpoint."""
    final = out_dir / "checkpoints" / f"checkpoint-{step:06d}"
    scratch = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    save_file(_lora_state(unet, text_encoder, config.train_text_encoder), scratch / "lora.safetensors")
    torch.save(optimizer.state_dict(), scratch / "optimizer.pt")
    save_file({"state": generator.get_state()}, scratch / "generator.safetensors")
    (scratch / "state.json").write_text(json.dumps({"step": step, "losses": losses, "validations": validations}))
    shutil.rmtree(final, ignore_errors=True)
    scratch.rename(final)


def _resume(out_dir: Path, unet, text_encoder, optimizer, generator, losses, validations,
            config: TrainingSettings) -> int:
    from peft.utils import set_peft_model_state_dict

    found = sorted((out_dir / "checkpoints").glob("checkpoint-*")) if (out_dir / "checkpoints").is_dir() else []
    if not found:
        return 0
    latest = found[-1]
    weights = load_file(latest / "lora.safetensors")
    set_peft_model_state_dict(unet, {k[len("unet."):]: v for k, v in weights.items() if k.startswith("unet.")})
    if config.train_text_encoder:
        set_peft_model_state_dict(text_encoder, {k[len("text_encoder."):]: v for k, v in weights.items()
                                                 if k.startswith("text_encoder.")})
    optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
    generator.set_state(load_file(latest / "generator.safetensors")["state"])
    state = json.loads((latest / "state.json").read_text())
    losses.extend(state["losses"])
    validations.extend(state["validations"])
    return state["step"]
