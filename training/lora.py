"""DreamBooth-style LoRA fine-tuning of a diffusion model's denoiser (paper 2.4, appendix A.5).

Training runs on the worker's one loaded base pipeline (udfs/zoo.py): the LoRA layers are added
for the run and removed after it, leaving the frozen weights untouched for the sweep's next
token, validation and generation. SD 1.x/2.x, SDXL and FLUX.2 [klein] differ only in what
udfs/diffusion.py's Family says (denoiser, text encoders, SDXL's pooled embeddings and size time
ids, the loss). The flow-matching loss (FLUX.2 [klein]) is diffusers' klein DreamBooth LoRA
trainer's: latents are the VAE posterior's mode, 2x2-patchified and normalised by the VAE's batch
norm; timesteps are drawn by `weighting_scheme`'s density and indexed into the flow-matching
scheduler's timesteps and sigmas; x_t = (1 - sigma) x0 + sigma noise, packed into tokens with
their position ids; the target is noise - x0, weighted per sigma; the guidance embedding gets
`guidance_scale` where the transformer has one.

Our arm has no prior-preservation loss: negatives and counterfactuals are ordinary examples with
their own captions (without the rare token), so the adapter learns what the product is *not*.
The baseline arm, standard DreamBooth, passes `prior` examples (class images the base model
made from "a photo of a <class>"): each step then adds a batch of them, and their loss, times
`prior_loss_weight`, to the instance loss, as diffusers' reference trainer does. Latents
(VAE in micro-batches) and frozen text states are computed once. Defaults follow diffusers'
reference trainers: lora_alpha = rank (the adapter file carries its LoRA config, so it loads at
the scale it was trained at), gradient clipping at 1.0, bf16 frozen weights with fp32 LoRA
weights on CUDA (fp16 with a GradScaler), SDPA attention (diffusers' default processor).
Images keep their aspect ratio: the long side is resized to the resolution and the short side
padded with the photo's own border colour (padding, not bucketing: one resolution, one batch).
SDXL's size conditioning follows diffusers' SDXL trainer: each image's original size, the crop
corner (0, 0: padding crops nothing) and the target size. Every `checkpoint_every` steps the LoRA
weights, optimizer state, data/noise generator state and loss history are written atomically; a
run that finds a checkpoint resumes from it and ends with exactly the weights of an uninterrupted
run (CPU), the property users most often find broken in peers' scripts.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from core.settings import TrainingSettings
from udfs.device import BUILDING
from udfs.imaging import padded_square
from udfs.diffusion import FAMILIES, Family

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
    learning_rates: list[float] = field(default_factory=list)  # per optimizer step, after the scheduler
    grad_norms: list[float] = field(default_factory=list)  # per optimizer step, before clipping


def lora_alpha(config: TrainingSettings) -> int:
    """The LoRA scale numerator: `alpha` when set, else the rank (diffusers' default), so the
    update scale alpha/rank stays 1 across a rank sweep."""
    return config.alpha if config.alpha is not None else config.rank


def instance_prompt(token: str, class_noun: str, caption: str | None = None) -> str:
    """"a photo of <token> <class>", joined with the fine-grained caption when there is one."""
    prompt = f"a photo of {token} {class_noun}"
    return f"{prompt}, {caption}" if caption else prompt


def train_lora(pipeline, examples: list[Example], config: TrainingSettings, out_dir: str | Path,
               steps: int | None = None, on_step: Callable[[int, float], None] | None = None,
               validate: Callable[[object, int], dict] | None = None,
               prior: list[Example] = (), prior_loss_weight: float = 1.0) -> TrainResult:
    """Train (or resume) a LoRA adapter on a loaded base `pipeline` (its frozen weights are left
    as they were); returns where `pytorch_lora_weights.safetensors` lies.

    `validate(pipeline, step)` is called every `validate_every` steps with the pipeline holding the
    adapter being trained, and returns metrics to record. One step is one optimizer step over
    batch_size x gradient_accumulation_steps examples (plus as many prior examples).
    """
    if not examples:
        raise ValueError("no training examples")
    family = FAMILIES[type(pipeline).__name__]
    prediction_type = pipeline.scheduler.config.get("prediction_type", "epsilon") if family.loss == "noise" \
        else "flow"
    if family.loss == "flow_matching" and config.train_text_encoder:
        raise ValueError(f"train_text_encoder is not supported for {family.name}: diffusers' trainer for it "
                         "trains the transformer only")
    if prediction_type not in ("epsilon", "v_prediction", "flow"):
        raise ValueError(f"the base model's scheduler has prediction_type '{prediction_type}'; LoRA training "
                         "supports epsilon and v_prediction")
    steps = steps or config.steps
    out_dir = Path(out_dir)
    unet, vae = getattr(pipeline, family.denoiser), pipeline.vae  # a UNet or a transformer
    encoders = [getattr(pipeline, name) for name in family.text_encoders]
    target = unet.device
    weight_dtype = _weight_dtype(config, target)
    if unet.dtype != weight_dtype:  # the worker's inference copy is bf16 on CUDA; fp16/fp32 if asked
        pipeline.to(dtype=weight_dtype)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
    try:
        return _train(pipeline, family, unet, vae, encoders, examples, config, out_dir, steps, on_step, validate,
                      prior, prior_loss_weight, prediction_type, target, weight_dtype)
    finally:  # the base pipeline goes back to plain inference, whatever happened
        pipeline.unload_lora_weights()
        if unet.is_gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        unet.eval()


def _train(pipeline, family: Family, unet, vae, encoders, examples, config: TrainingSettings, out_dir: Path,
           steps: int, on_step, validate, prior, prior_loss_weight: float, prediction_type: str,
           target: torch.device, weight_dtype: torch.dtype) -> TrainResult:
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig, inject_adapter_in_model

    alpha = lora_alpha(config)
    trained = {family.denoiser: unet}
    with BUILDING:  # parallel tasks share torch's global generator and module construction
        torch.manual_seed(config.seed)  # the LoRA initialisation
        unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=list(config.target_modules or family.lora_target_modules(unet))))
        if config.train_text_encoder:
            for name, encoder in zip(family.text_encoders, encoders):
                # peft directly: transformers 5's add_adapter wants a peft release not yet published.
                text_config = LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                         target_modules=TEXT_ENCODER_TARGETS)
                inject_adapter_in_model(text_config, encoder)
                encoder.peft_config = {"default": text_config}
                trained[name] = encoder
    if config.gradient_checkpointing or (config.gradient_checkpointing is None and config.resolution >= 768):
        unet.enable_gradient_checkpointing()
    trainable = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    for parameter in trainable:  # LoRA weights train in fp32 over bf16/fp16 frozen weights
        parameter.data = parameter.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=steps)
    scaler = torch.amp.GradScaler("cuda") if weight_dtype == torch.float16 else None
    flow = family.loss == "flow_matching"
    scheduler_class = FlowMatchEulerDiscreteScheduler if flow else DDPMScheduler
    noise_scheduler = scheduler_class.from_config(pipeline.scheduler.config)

    # Instance examples first, then the prior (class) examples: one tensor, two index ranges.
    everything = [*examples, *prior]
    mean, std = _encoded_latents(vae, [e.image for e in everything], config, target, flow)
    time_ids = sdxl_time_ids([e.image for e in everything], config.resolution) if family.added_conditions else None
    frozen, token_ids = None, []
    if flow:  # the pipeline's own text conditioning (prompt states, their position ids), as the trainer
        with torch.no_grad():
            frozen = tuple(t.cpu() for t in pipeline.encode_prompt([e.caption for e in everything], device=target))
    else:
        token_ids = [getattr(pipeline, name)([e.caption for e in everything], padding="max_length",
                                             max_length=getattr(pipeline, name).model_max_length, truncation=True,
                                             return_tensors="pt").input_ids.to(target) for name in family.tokenizers]
    if not flow and not config.train_text_encoder:
        with torch.no_grad():
            frozen = _encode(family, encoders, token_ids)

    generator = torch.Generator("cpu").manual_seed(config.seed)  # batches, noise, timesteps, latent samples
    result = TrainResult(out_dir / "adapter", [])
    result.resumed_from = _resume(out_dir, trained, optimizer, lr_scheduler, scaler, generator, result)
    unet.train()
    batch, micro_batches = config.batch_size, config.gradient_accumulation_steps
    for step in range(result.resumed_from, steps):
        # The whole effective batch is drawn at once and split into micro-batches, so accumulating
        # k micro-batches of n equals one batch of k x n.
        index = torch.randint(len(examples), (batch * micro_batches,), generator=generator)
        prior_index = len(examples) + torch.randint(len(prior), (batch * micro_batches,), generator=generator) \
            if prior else None
        rows = torch.cat([index, prior_index]) if prior else index
        noise = torch.randn((len(rows), *mean.shape[1:]), generator=generator)
        if flow:  # a timestep index per row from the weighting scheme's density (uniform by default)
            timesteps = _flow_indices(noise_scheduler, config, len(rows), generator)
        else:
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(rows),), generator=generator)
        latents = mean[rows]
        if config.sample_latents:  # a fresh draw from each image's latent distribution
            latents = latents + std[rows] * torch.randn(latents.shape, generator=generator)
        micro_losses = []
        for m in range(micro_batches):
            part = torch.arange(m * batch, (m + 1) * batch)
            if prior:
                part = torch.cat([part, len(index) + part])
            loss = (_flow_loss if flow else _loss)(
                family, unet, encoders, noise_scheduler, prediction_type, frozen, token_ids, time_ids,
                rows[part], latents[part].to(target), noise[part].to(target), timesteps[part].to(target),
                target, weight_dtype, batch if prior else None, prior_loss_weight, config)
            scaled = loss / micro_batches
            (scaler.scale(scaled) if scaler else scaled).backward()
            micro_losses.append(float(loss.detach()))
        if scaler:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm if config.max_grad_norm > 0
                                              else float("inf"))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(sum(micro_losses) / micro_batches)
        result.grad_norms.append(float(norm))
        result.learning_rates.append(lr_scheduler.get_last_lr()[0])
        done = step + 1
        if on_step:
            on_step(done, result.losses[-1])
        if validate and done % config.validate_every == 0:
            unet.eval()
            result.validations.append({"step": done, **validate(pipeline, done)})
            unet.train()
        if done % config.checkpoint_every == 0 or done == steps:
            _checkpoint(out_dir, done, trained, optimizer, lr_scheduler, scaler, generator, result, config)

    _save_adapter(pipeline, trained, result.adapter_dir)
    return result


def _weight_dtype(config: TrainingSettings, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype: fp32 on the CPU; on CUDA bf16 by default (`auto`), fp16 or fp32."""
    if device.type != "cuda" or config.mixed_precision == "no":
        return torch.float32
    if config.mixed_precision == "fp16" or (config.mixed_precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _loss(family: Family, unet, encoders, noise_scheduler, prediction_type: str, frozen, token_ids, time_ids,
          rows, latents, noise, timesteps, target, weight_dtype, instances: int | None,
          prior_loss_weight: float, config: TrainingSettings = None) -> torch.Tensor:
    """The denoising loss of one micro-batch; with `instances`, its first `instances` rows are
    instance examples and the rest prior examples, whose loss is added times the weight."""
    if frozen is not None:
        states, pooled = frozen[0][rows], (frozen[1][rows] if frozen[1] is not None else None)
    else:
        states, pooled = _encode(family, encoders, [ids[rows] for ids in token_ids])
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    added = None
    if family.added_conditions:
        added = {"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids[rows].to(target, weight_dtype)}
    with _autocast(target, weight_dtype):
        prediction = unet(noisy.to(weight_dtype), timesteps, encoder_hidden_states=states.to(weight_dtype),
                          added_cond_kwargs=added).sample
    wanted = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    if instances is None:
        return F.mse_loss(prediction.float(), wanted.float())
    return (F.mse_loss(prediction[:instances].float(), wanted[:instances].float())
            + prior_loss_weight * F.mse_loss(prediction[instances:].float(), wanted[instances:].float()))


def _flow_indices(scheduler, config: TrainingSettings, count: int, generator) -> torch.Tensor:
    """Indices into the flow-matching scheduler's training timesteps and sigmas, drawn as diffusers'
    flow trainers draw them (compute_density_for_timestep_sampling, scaled to the timestep count)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(config.weighting_scheme, count, logit_mean=config.logit_mean,
                                              logit_std=config.logit_std, mode_scale=config.mode_scale,
                                              generator=generator)
    return (u * scheduler.config.num_train_timesteps).long().clamp(max=scheduler.config.num_train_timesteps - 1)


def _flow_loss(family: Family, transformer, encoders, scheduler, prediction_type: str, frozen, token_ids, time_ids,
               rows, latents, noise, indices, target, weight_dtype, instances: int | None,
               prior_loss_weight: float, config: TrainingSettings = None) -> torch.Tensor:
    """Rectified-flow loss of one micro-batch on packed latents (diffusers' klein trainer):
    x_t = (1 - sigma) x0 + sigma noise, the transformer predicts noise - x0 at timestep / 1000."""
    from diffusers import Flux2KleinPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    timesteps = scheduler.timesteps[indices.cpu()].to(target)
    sigmas = scheduler.sigmas[indices.cpu()].to(target, latents.dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    packed = Flux2KleinPipeline._pack_latents(noisy)  # (B, C, H, W) -> (B, H*W, C)
    latent_ids = Flux2KleinPipeline._prepare_latent_ids(latents).to(target)
    states, text_ids = frozen[0][rows].to(target), frozen[1][rows].to(target)
    guidance = torch.full((len(rows),), config.guidance_scale, device=target) \
        if transformer.config.guidance_embeds else None
    with _autocast(target, weight_dtype):
        prediction = transformer(hidden_states=packed.to(weight_dtype), timestep=timesteps / 1000, guidance=guidance,
                                 encoder_hidden_states=states.to(weight_dtype), txt_ids=text_ids, img_ids=latent_ids,
                                 return_dict=False)[0]
    prediction = Flux2KleinPipeline._unpack_latents_with_ids(prediction[:, :packed.size(1)], latent_ids)
    weighting = compute_loss_weighting_for_sd3(config.weighting_scheme, sigmas)
    errors = (weighting.float() * (prediction.float() - (noise - latents).float()) ** 2).reshape(len(rows), -1)
    per_row = errors.mean(dim=1)
    if instances is None:
        return per_row.mean()
    return per_row[:instances].mean() + prior_loss_weight * per_row[instances:].mean()


def sdxl_time_ids(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """SDXL's size conditioning per training image, as diffusers' SDXL trainers compute it:
    (original height, original width, crop top, crop left, target height, target width). The
    original size is the photo's before resizing; `training_pixels` pads rather than crops, so
    the crop corner is (0, 0). Generation passes the target size as the original size, crop
    (0, 0): diffusers' default, "a full, uncropped image at least this large"."""
    return torch.tensor([[image.height, image.width, 0, 0, resolution, resolution] for image in images],
                        dtype=torch.float32)


def training_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """An image as the model sees it in training, in [-1, 1]: udfs.imaging.padded_square (long
    side resized, short side padded with the border colour, so products keep their ends)."""
    array = torch.from_numpy(np.asarray(padded_square(image, resolution)).copy())
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


def _encoded_latents(vae, images: list[Image.Image], config: TrainingSettings,
                     device: torch.device, flow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's latent distribution (mean, std), scaled, on the CPU: encoded once, in
    micro-batches of `vae_batch_size`, in fp32 (SDXL's VAE overflows in fp16). FLUX.2's are
    2x2-patchified and normalised by the VAE's batch-norm statistics, as its pipelines do."""
    dtype = vae.dtype
    vae.to(torch.float32)
    means, stds = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(images), config.vae_batch_size):
                pixels = torch.stack([training_pixels(i, config.resolution)
                                      for i in images[start:start + config.vae_batch_size]])
                dist = vae.encode(pixels.to(device)).latent_dist
                means.append(dist.mean.cpu())
                stds.append(dist.std.cpu())
    finally:
        vae.to(dtype)
    if flow:
        from diffusers import Flux2KleinPipeline

        bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).float().cpu()
        bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float().cpu() + vae.config.batch_norm_eps)
        return ((Flux2KleinPipeline._patchify_latents(torch.cat(means)) - bn_mean) / bn_std,
                Flux2KleinPipeline._patchify_latents(torch.cat(stds)) / bn_std)
    factor = vae.config.scaling_factor
    return torch.cat(means) * factor, torch.cat(stds) * factor


def _encode(family: Family, encoders, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text states for the UNet's cross-attention (and SDXL's pooled embedding): SD uses the
    encoder's last layer; SDXL concatenates both encoders' penultimate layers and pools the
    second's projection, as diffusers' SDXL trainer does."""
    if not family.added_conditions:
        return encoders[0](token_ids[0])[0], None
    states, pooled = [], None
    for encoder, ids in zip(encoders, token_ids):
        output = encoder(ids, output_hidden_states=True)
        pooled = output[0]
        states.append(output.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


def _autocast(device: torch.device, weight_dtype: torch.dtype):
    if device.type != "cuda" or weight_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=weight_dtype)


def _save_adapter(pipeline, trained: dict, adapter_dir: Path) -> None:
    """diffusers' LoRA format, by the pipeline class's own writer (SDXL's adds text_encoder_2),
    with each module's LoRA config (rank, alpha, target modules) as the file's adapter metadata,
    as diffusers' trainers write it: without it `load_lora_weights` takes alpha = rank, and an
    adapter trained with another alpha would load at another scale than it was trained at."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    family = FAMILIES[type(pipeline).__name__]
    convert = convert_state_dict_to_diffusers if family.lora_keys == "diffusers" else dict
    layers = {f"{name}_lora_layers": convert(get_peft_model_state_dict(module)) for name, module in trained.items()}
    metadata = {f"{name}_lora_adapter_metadata": module.peft_config["default"].to_dict()
                for name, module in trained.items()}
    scratch = adapter_dir.with_name(".adapter-tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    type(pipeline).save_lora_weights(scratch, **layers, **metadata)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    scratch.rename(adapter_dir)


def _lora_state(trained: dict) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {f"{name}.{k}": v.detach().cpu().contiguous() for name, module in trained.items()
            for k, v in get_peft_model_state_dict(module).items()}


def _checkpoint(out_dir: Path, step: int, trained: dict, optimizer, lr_scheduler, scaler, generator,
                result: TrainResult, config: TrainingSettings) -> None:
    """checkpoint-<step>/: LoRA weights, optimizer, scheduler, scaler and generator state, history.
    Written to a scratch folder and renamed, so a kill mid-write never leaves a half checkpoint;
    then all but the newest `checkpoints_keep` are deleted."""
    final = out_dir / "checkpoints" / f"checkpoint-{step:06d}"
    scratch = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    save_file(_lora_state(trained), scratch / "lora.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None}, scratch / "optimizer.pt")
    save_file({"state": generator.get_state()}, scratch / "generator.safetensors")
    history = {"step": step, "losses": result.losses, "validations": result.validations,
               "learning_rates": result.learning_rates, "grad_norms": result.grad_norms}
    (scratch / "state.json").write_text(json.dumps(history))
    shutil.rmtree(final, ignore_errors=True)
    scratch.rename(final)
    for old in checkpoints(out_dir)[:-max(1, config.checkpoints_keep)]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(out_dir: Path) -> list[Path]:
    """A run's complete checkpoints, oldest first."""
    folder = Path(out_dir) / "checkpoints"
    return sorted(folder.glob("checkpoint-*")) if folder.is_dir() else []


def _resume(out_dir: Path, trained: dict, optimizer, lr_scheduler, scaler, generator, result: TrainResult) -> int:
    from peft.utils import set_peft_model_state_dict

    found = checkpoints(out_dir)
    if not found:
        return 0
    latest = found[-1]
    weights = load_file(latest / "lora.safetensors")
    for name, module in trained.items():
        prefix = f"{name}."
        set_peft_model_state_dict(module, {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    states = torch.load(latest / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    lr_scheduler.load_state_dict(states["lr_scheduler"])
    if scaler and states["scaler"]:
        scaler.load_state_dict(states["scaler"])
    generator.set_state(load_file(latest / "generator.safetensors")["state"])
    history = json.loads((latest / "state.json").read_text())
    for name in ("losses", "validations", "learning_rates", "grad_norms"):
        getattr(result, name).extend(history[name])
    return history["step"]
