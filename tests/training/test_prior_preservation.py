"""The prior-preservation loss (the baseline arm's DreamBooth) on the tiny UNet: it changes the
gradient by exactly its weight times the prior examples' own gradient, and weight 0 is no prior.
The reference is computed independently: the loss of each example alone, through the same UNet."""

import pytest
import torch
from diffusers import DDPMScheduler

from core.settings import Settings
from training.lora import FAMILIES, _encode, _loss
from udfs.zoo import ModelZoo


@pytest.fixture(scope="module")
def base(tiny_models):
    zoo = ModelZoo.from_settings(Settings.load(tiny_models / "unused", models={"tiny_dir": str(tiny_models),
                                                                                 "device": "cpu"}))
    zoo.check("text2img")  # builds the tiny model on first use
    return zoo.load("text2img")


def test_the_prior_loss_adds_its_weighted_gradient_and_weight_zero_is_no_prior(base):
    family = FAMILIES[type(base).__name__]
    unet, encoders = base.unet, [getattr(base, name) for name in family.text_encoders]
    token_ids = [getattr(base, name)(["a photo of sks mug, on a desk", "a photo of a mug"], padding="max_length",
                                     max_length=getattr(base, name).model_max_length, truncation=True,
                                     return_tensors="pt").input_ids for name in family.tokenizers]
    with torch.no_grad():
        frozen = _encode(family, encoders, token_ids)
    generator = torch.Generator().manual_seed(0)
    shape = (2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    timesteps = torch.tensor([100, 700])
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    parameter = unet.conv_in.weight
    parameter.requires_grad_(True)

    def gradient(rows, instances, weight=1.0):
        rows = torch.tensor(rows)
        loss = _loss(family, unet, encoders, scheduler, "epsilon", frozen, token_ids, None, rows, latents[rows],
                     noise[rows], timesteps[rows], torch.device("cpu"), torch.float32, instances, weight)
        return torch.autograd.grad(loss, parameter)[0]

    try:
        instance_alone, prior_alone = gradient([0], None), gradient([1], None)  # row 1 is the class example
        assert prior_alone.abs().sum() > 0
        assert torch.allclose(gradient([0, 1], 1, 0.0), instance_alone, atol=1e-7)  # weight 0 = no prior
        for weight in (1.0, 0.5):
            with_prior = gradient([0, 1], 1, weight)
            assert torch.allclose(with_prior, instance_alone + weight * prior_alone, rtol=1e-4, atol=1e-7)
            assert not torch.allclose(with_prior, instance_alone, rtol=1e-3)
    finally:
        parameter.requires_grad_(False)
