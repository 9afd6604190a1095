"""The flow-matching family (FLUX.2 [klein]) on its tiny random-weight snapshot: detected from
model_index.json, its offline tokenizer round-trips, LoRA training lowers the flow-matching loss,
resumes exactly, and writes diffusers' klein trainer's adapter format, which diffusers' own
Flux2KleinPipeline loads completely."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.settings import TrainingSettings
from test_lora import EXAMPLES, kill_and_resume_is_exact, tiny_zoo
from training.lora import ADAPTER_FILE, train_lora
from udfs.diffusion import FLUX2_KLEIN, family_of, render


@pytest.fixture(scope="module")
def zoo(tiny_models):
    return tiny_zoo(tiny_models, "flux2-klein")


@pytest.fixture(scope="module")
def base(zoo):
    return zoo.load("text2img")


def test_the_tiny_snapshot_is_diffusers_layout_and_detected(zoo):
    path = zoo.path("text2img")
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    assert family_of(path) is FLUX2_KLEIN
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    text = "a photo of zq7 café mug"  # bytes outside the training corpus still tokenize
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert chat.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_flow_matching_loss_goes_down(base, tmp_path):
    config = TrainingSettings(steps=60, learning_rate=1e-2, batch_size=4, rank=8, checkpoint_every=1000)
    losses = train_lora(base, EXAMPLES[:2], config, tmp_path).losses
    assert np.mean(losses[-15:]) < np.mean(losses[:15]) - 0.1


def test_kill_and_resume_gives_the_same_weights(base, tmp_path):
    kill_and_resume_is_exact(base, TrainingSettings(steps=8, checkpoint_every=3), tmp_path, 5, 3)


def test_adapter_has_the_klein_trainers_keys_and_loads_in_diffusers(base, zoo, tmp_path):
    from diffusers import Flux2KleinPipeline
    from peft.utils import get_peft_model_state_dict

    adapter = train_lora(base, EXAMPLES, TrainingSettings(steps=20, learning_rate=1e-2, checkpoint_every=1000),
                         tmp_path).adapter_dir
    weights = load_file(adapter / ADAPTER_FILE)
    # peft's key names under "transformer.", on the double blocks' attention and the single
    # block's fused projection and attention output, as diffusers' klein trainer targets them
    modules = {k.rsplit(".lora_", 1)[0] for k in weights}
    assert modules == {f"transformer.transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")} \
        | {f"transformer.single_transformer_blocks.0.attn.{m}" for m in ("to_qkv_mlp_proj", "to_out")}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    pipeline = Flux2KleinPipeline.from_pretrained(str(zoo.path("text2img")), local_files_only=True)
    before = np.asarray(render(pipeline, ["a photo of mmes mug"], [0], 2, 4.0, 64, 1)[0], dtype=float)
    pipeline.load_lora_weights(str(adapter))
    name = next(iter(pipeline.transformer.peft_config))  # load_lora_weights names it default_0
    state = get_peft_model_state_dict(pipeline.transformer, adapter_name=name)
    inside = {f"transformer.{k}": v for k, v in state.items()}
    assert inside.keys() == weights.keys() and all(torch.equal(inside[k], weights[k]) for k in weights)
    after = np.asarray(render(pipeline, ["a photo of mmes mug"], [0], 2, 4.0, 64, 1)[0], dtype=float)
    assert np.abs(after - before).mean() > 0.01


def test_the_settings_accept_exactly_the_families_the_code_has():
    """core.settings cannot import udfs (layers): its list of tiny families is checked here."""
    from core.settings import CHOICES
    from udfs.diffusion import BY_NAME

    assert set(CHOICES["models", "tiny_family"]) == set(BY_NAME)
