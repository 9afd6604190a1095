"""LoRA training on the tiny pipeline: loss goes down, kill-and-resume is exact, the saved adapter
loads in a fresh process with diffusers' load_lora_weights and changes the output."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.settings import Settings, TrainingSettings
from sample_images import product_shot
from training.lora import ADAPTER_FILE, Example, instance_prompt, train_lora
from training.tokens import _pool, by_association, edit_distance, rare_token_candidates
from udfs.zoo import ModelZoo, packaged_weights


def tiny_zoo(tiny_models, family: str = "sd") -> ModelZoo:
    zoo = ModelZoo.from_settings(Settings.load(tiny_models / "unused", models={
        "tiny_dir": str(tiny_models), "device": "cpu", "tiny_family": family}))
    zoo.check("text2img")
    return zoo


@pytest.fixture(scope="module")
def base_path(tiny_models):
    return tiny_zoo(tiny_models).path("text2img")


@pytest.fixture(scope="module")
def base(tiny_models):
    """The worker's one loaded base pipeline, shared by every training below (as in a stage)."""
    return tiny_zoo(tiny_models).load("text2img")


EXAMPLES = [Example(product_shot(96, 96, seed=i), instance_prompt("mmes", "mug", f"caption {i}")) for i in range(3)]


def test_loss_goes_down(base, tmp_path):
    config = TrainingSettings(steps=80, learning_rate=1e-2, batch_size=4, rank=8, checkpoint_every=1000)
    losses = train_lora(base, EXAMPLES[:2], config, tmp_path).losses
    assert len(losses) == 80
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.03


def kill_and_resume_is_exact(pipeline, config: TrainingSettings, tmp_path, kill_after: int, resumed_from: int):
    """Train straight through; train again, killed after step `kill_after`, and resume: the
    resumed run starts at its last checkpoint and ends with the same losses and tensors."""
    straight = train_lora(pipeline, EXAMPLES, config, tmp_path / "straight")

    class Killed(Exception):
        pass

    def crash(step, loss):
        if step == kill_after:
            raise Killed

    with pytest.raises(Killed):
        train_lora(pipeline, EXAMPLES, config, tmp_path / "resumed", on_step=crash)
    resumed = train_lora(pipeline, EXAMPLES, config, tmp_path / "resumed")
    assert resumed.resumed_from == resumed_from and resumed.losses == straight.losses
    a, b = (load_file(r.adapter_dir / ADAPTER_FILE) for r in (straight, resumed))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_and_resume_gives_the_same_weights(base, tmp_path):
    # killed after checkpoint 5, before checkpoint 10: steps 6-8 are lost
    kill_and_resume_is_exact(base, TrainingSettings(steps=12, checkpoint_every=5), tmp_path, 8, 5)


def test_adapter_loads_in_a_fresh_process_and_changes_the_output(base, base_path, tmp_path):
    config = TrainingSettings(steps=20, learning_rate=1e-2, checkpoint_every=1000)
    adapter = train_lora(base, EXAMPLES, config, tmp_path).adapter_dir
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({str(base_path)!r}, local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        def run():
            g = torch.Generator("cpu").manual_seed(0)
            return np.asarray(pipe("a photo of mmes mug", num_inference_steps=4, height=64, width=64,
                                   generator=g, output_type="np").images[0])
        before = run()
        pipe.load_lora_weights({str(adapter)!r})
        after = run()
        print("DIFF", float(np.abs(after - before).mean()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    diff = float(result.stdout.split("DIFF")[-1])
    assert diff > 1e-4


def test_token_is_rare_not_a_word_and_not_the_product_name():
    dictionary = {w.strip() for w in (packaged_weights("sentence") / "vocab.txt").read_text().splitlines()}
    name = ["ceramic", "coffee", "cup", "mug"]
    tokens = rare_token_candidates("coffee-cup", name, 5)
    assert tokens == rare_token_candidates("coffee-cup", name, 5)  # deterministic
    assert len(tokens) == 5 and not set(tokens) & dictionary
    assert all(edit_distance(t, w) >= 2 for t in tokens for w in name)
    assert "cup" not in _pool() and "mug" not in _pool()
    close = rare_token_candidates("x", ["gued"], 4000)
    assert "gued" not in close and all(edit_distance(t, "gued") >= 2 for t in close)


def test_text_encoder_lora_is_saved_with_the_unet_lora(base, base_path, tmp_path):
    config = TrainingSettings(steps=3, train_text_encoder=True, checkpoint_every=2)
    adapter = train_lora(base, EXAMPLES, config, tmp_path).adapter_dir
    weights = load_file(adapter / ADAPTER_FILE)
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    from udfs.diffusion import load_pipeline

    pipeline = load_pipeline("text2img", base_path, "cpu")
    tokens = torch.tensor([[49406, 320, 1125, 49407]])
    before = pipeline.text_encoder(tokens)[0].detach().clone()
    pipeline.load_lora_weights(str(adapter))  # diffusers' own loader applies the text-encoder LoRA
    assert not torch.allclose(pipeline.text_encoder(tokens)[0], before)
    resumed = train_lora(base, EXAMPLES, TrainingSettings(steps=4, train_text_encoder=True, checkpoint_every=2),
                         tmp_path)
    assert resumed.resumed_from == 3


def test_tokens_are_tried_by_association_with_the_title(tiny_models):
    zoo = ModelZoo.from_settings(Settings.load(tiny_models / "unused", models={"tiny_dir": str(tiny_models)}))
    zoo.check("clip")
    clip = zoo.load("clip")
    tokens = rare_token_candidates("mug-a", ["blue", "ceramic", "mug"], 12)
    ranked = by_association(tokens, "mug", "Blue ceramic mug", clip.embed_texts)
    assert sorted(t for t, _ in ranked) == sorted(tokens)
    similarities = [s for _, s in ranked]
    assert similarities == sorted(similarities, reverse=True)
    for token, similarity in ranked[:3]:  # recomputed independently
        prompt, title = clip.embed_texts([f"a photo of {token} mug", "Blue ceramic mug"]).astype(np.float64)
        assert similarity == pytest.approx(float(prompt @ title / np.linalg.norm(prompt) / np.linalg.norm(title)),
                                           abs=1e-5)

