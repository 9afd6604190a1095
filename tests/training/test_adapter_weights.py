"""What an adapter does to the worker's shared base pipeline: nothing that outlives it. After
many fuse/unfuse cycles of different adapters on a bf16 pipeline (what a GPU worker's generation
and the service do) the base weights are bit-identical to a fresh load; a trained adapter carries
its LoRA config, so it loads at its training scale in a fresh process."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open

from core.settings import Settings, TrainingSettings
from random_adapters import random_adapter
from sample_images import product_shot
from training.lora import ADAPTER_FILE, Example, instance_prompt, train_lora
from udfs.diffusion import adapter_loaded, load_pipeline
from udfs.zoo import ModelZoo


@pytest.fixture(scope="module")
def base_path(tiny_models):
    zoo = ModelZoo.from_settings(Settings.load(tiny_models / "unused", models={
        "tiny_dir": str(tiny_models), "device": "cpu"}))
    zoo.check("text2img")
    return zoo.path("text2img")


def test_base_weights_are_bit_identical_after_200_fused_adapters(base_path, tmp_path):
    maker = load_pipeline("text2img", base_path, "cpu")
    adapters = [random_adapter(maker, tmp_path / f"adapter-{i}", seed=i, strength=[0.01, 0.05][i % 2],
                               text_encoder=i == 0) for i in range(6)]
    shared = load_pipeline("text2img", base_path, "cpu", dtype=torch.bfloat16)  # a GPU worker's base
    probe = shared.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    before = probe.detach().clone()
    for cycle in range(200):
        with adapter_loaded(shared, adapters[cycle % len(adapters)], fuse=True):
            if cycle == 0:
                assert not torch.equal(probe, before)  # fused: the adapter is in the weights
    fresh = load_pipeline("text2img", base_path, "cpu", dtype=torch.bfloat16)
    for name in ("unet", "text_encoder", "vae"):
        got, want = getattr(shared, name).state_dict(), getattr(fresh, name).state_dict()
        assert got.keys() == want.keys()
        changed = [k for k in want if not torch.equal(got[k], want[k])]
        assert not changed, f"{name}: {len(changed)} tensors differ from a fresh load, e.g. {changed[:3]}"


EXAMPLES = [Example(product_shot(96, 96, seed=i), instance_prompt("mmes", "mug")) for i in range(2)]
PROMPT, SIZE, STEPS = "a photo of mmes mug", 64, 4


def image(pipeline) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    return np.asarray(pipeline(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generator,
                               output_type="np").images[0])


def test_an_adapter_with_alpha_apart_from_rank_generates_in_a_fresh_process_as_in_training(base_path, tmp_path):
    pipeline = load_pipeline("text2img", base_path, "cpu")
    plain = image(pipeline)
    seen = {}
    config = TrainingSettings(rank=4, alpha=1, steps=12, learning_rate=5e-2, checkpoint_every=1000,
                              validate_every=12)

    def validate(trained, step):  # the training-time model: peft layers at alpha / rank
        seen["validation"] = image(trained)
        return {}

    adapter = train_lora(pipeline, EXAMPLES, config, tmp_path, validate=validate).adapter_dir
    with safe_open(str(adapter / ADAPTER_FILE), "pt") as f:  # diffusers' metadata: the LoRA config
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 1
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({str(base_path)!r}, local_files_only=True,
                                                       safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights({str(adapter)!r})
        g = torch.Generator("cpu").manual_seed(0)
        out = pipe({PROMPT!r}, num_inference_steps={STEPS}, height={SIZE}, width={SIZE}, generator=g,
                   output_type="np").images[0]
        np.save({str(tmp_path / "fresh.npy")!r}, out)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    fresh, trained = np.load(tmp_path / "fresh.npy"), seen["validation"]
    effect = np.abs(trained - plain).max()
    assert effect > 1e-2  # the adapter matters, so a wrong scale would show
    assert np.abs(fresh - trained).max() < effect / 100


def test_an_adapter_saved_without_metadata_still_loads(base_path, tmp_path):
    """Adapters registered before the metadata was written: diffusers takes alpha = rank."""
    from safetensors.torch import load_file, save_file

    adapter = random_adapter(load_pipeline("text2img", base_path, "cpu"), tmp_path / "new", seed=1, strength=0.05,
                             text_encoder=False)
    pipeline = load_pipeline("text2img", base_path, "cpu")
    old = tmp_path / "old"
    old.mkdir()
    save_file(load_file(adapter / ADAPTER_FILE), old / ADAPTER_FILE)  # tensors only, no metadata
    plain = image(pipeline)
    with adapter_loaded(pipeline, old) as loaded:
        with_old = image(loaded)
    with adapter_loaded(pipeline, adapter) as loaded:
        with_new = image(loaded)
    assert np.abs(with_old - plain).max() > 1e-3
    np.testing.assert_allclose(with_old, with_new, atol=1e-6)  # rank 4, alpha 4: the same scale
