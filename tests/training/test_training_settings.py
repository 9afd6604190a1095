"""Real-weight training settings on the tiny models: the scheduler, clipping and accumulation reach
the optimizer, wide images keep their width, checkpoints are pruned, an unknown prediction type
is named, the shared base pipeline is left as it was; and the SDXL family round trip (adapter
saved, reloaded in a fresh process by diffusers, changes the output; exact resume)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.settings import TrainingSettings
from sample_images import product_shot
from training.lora import ADAPTER_FILE, Example, checkpoints, instance_prompt, train_lora, training_pixels
from udfs.diffusion import load_pipeline

from test_lora import kill_and_resume_is_exact, tiny_zoo

EXAMPLES = [Example(product_shot(96, 96, seed=i), instance_prompt("mmes", "mug", f"caption {i}")) for i in range(3)]


@pytest.fixture(scope="module")
def base(tiny_models):
    return tiny_zoo(tiny_models).load("text2img")


@pytest.fixture(scope="module")
def sdxl(tiny_models):
    zoo = tiny_zoo(tiny_models, "sdxl")
    return zoo.path("text2img"), zoo.load("text2img")


def _image(pipeline, prompt="a photo of mmes mug"):
    generator = torch.Generator("cpu").manual_seed(0)
    return np.asarray(pipeline(prompt, num_inference_steps=3, height=64, width=64, generator=generator,
                               output_type="np").images[0])


def test_warmup_then_linear_decay_reach_the_optimizer(base, tmp_path):
    config = TrainingSettings(steps=6, learning_rate=1e-3, lr_scheduler="linear", lr_warmup_steps=2,
                              checkpoint_every=1000)
    rates = train_lora(base, EXAMPLES, config, tmp_path).learning_rates
    # after step s: warm-up s/2 of the rate, then linear decay to 0 at step 6 (recomputed by hand)
    expected = [1e-3 * min(s / 2, (6 - s) / 4) for s in range(1, 7)]
    assert rates == pytest.approx(expected)


def test_clipping_bounds_the_update(base, tmp_path):
    def moved(max_grad_norm):
        config = TrainingSettings(steps=2, learning_rate=1e-2, max_grad_norm=max_grad_norm, checkpoint_every=1000)
        result = train_lora(base, EXAMPLES, config, tmp_path / str(max_grad_norm))
        weights = load_file(result.adapter_dir / ADAPTER_FILE)
        ups = [w for k, w in weights.items() if "lora_B" in k or "lora.up" in k]
        return float(sum(w.abs().sum() for w in ups)), result.grad_norms  # lora_B starts at zero

    free, norms = moved(0.0)
    clipped, _ = moved(1e-9)  # Adam divides by the gradient's scale, until eps dominates it
    assert min(norms) > 1e-6
    assert clipped < free / 10


def test_accumulating_micro_batches_equals_one_large_batch(base, tmp_path):
    def first_step(batch_size, accumulation):
        config = TrainingSettings(steps=1, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                  max_grad_norm=0.0, checkpoint_every=1000)
        result = train_lora(base, EXAMPLES, config, tmp_path / f"{batch_size}x{accumulation}")
        return result.losses[0], result.grad_norms[0]  # the same examples and noise: the same gradient

    large, accumulated, small = first_step(4, 1), first_step(2, 2), first_step(2, 1)
    assert accumulated == pytest.approx(large, rel=1e-4)
    assert small[1] != pytest.approx(large[1], rel=1e-2)


def test_a_wide_image_keeps_its_full_width():
    wide = Image.new("RGB", (400, 100), (255, 255, 255))
    wide.paste((255, 0, 0), (0, 30, 40, 70))  # a red end and a blue end
    wide.paste((0, 0, 255), (360, 30, 400, 70))
    pixels = ((training_pixels(wide, 64) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert pixels.shape == (64, 64, 3)
    row = pixels[32]
    assert row[1][0] > 200 and row[1][2] < 60  # red at the left edge
    assert row[62][2] > 200 and row[62][0] < 60  # blue at the right edge
    assert (pixels[2] > 240).all()  # padding above takes the white border colour


def test_only_the_newest_checkpoints_are_kept(base, tmp_path):
    config = TrainingSettings(steps=6, checkpoint_every=2, checkpoints_keep=2)
    train_lora(base, EXAMPLES, config, tmp_path)
    assert [c.name for c in checkpoints(tmp_path)] == ["checkpoint-000004", "checkpoint-000006"]


def test_the_shared_base_pipeline_is_left_as_it_was(base):
    before = _image(base)
    with pytest.raises(RuntimeError):
        train_lora(base, EXAMPLES, TrainingSettings(steps=3, checkpoint_every=1000), "/dev/null/cannot",
                   on_step=lambda step, loss: (_ for _ in ()).throw(RuntimeError("killed")))
    assert not getattr(base.unet, "peft_config", None) and not base.unet.training
    assert np.array_equal(_image(base), before)


def test_an_unknown_prediction_type_is_named(tiny_models, tmp_path):
    pipeline = load_pipeline("text2img", tiny_zoo(tiny_models).path("text2img"), "cpu")
    pipeline.scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        train_lora(pipeline, EXAMPLES, TrainingSettings(steps=1), tmp_path)


def test_sdxl_adapter_round_trip_in_a_fresh_process(sdxl, tmp_path):
    path, pipeline = sdxl
    config = TrainingSettings(steps=12, learning_rate=1e-2, train_text_encoder=True, checkpoint_every=1000)
    adapter = train_lora(pipeline, EXAMPLES, config, tmp_path).adapter_dir
    keys = load_file(adapter / ADAPTER_FILE).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    script = textwrap.dedent(f"""
        import json, numpy as np, torch
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained({str(path)!r}, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        def run():
            g = torch.Generator("cpu").manual_seed(0)
            return pipe("a photo of mmes mug", num_inference_steps=3, height=64, width=64, generator=g,
                        output_type="np").images[0]
        before = run()
        pipe.load_lora_weights({str(adapter)!r})
        print(json.dumps({{"diff": float(np.abs(run() - before).mean())}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["diff"] > 1e-4


def test_sdxl_kill_and_resume_gives_the_same_weights(sdxl, tmp_path):
    _, pipeline = sdxl
    kill_and_resume_is_exact(pipeline, TrainingSettings(steps=6, checkpoint_every=3, sample_latents=True),
                             tmp_path, 5, 3)


def test_sdxl_size_conditioning_is_each_images_own(sdxl, tmp_path):
    """As diffusers' SDXL trainer: (original height, width, crop top, left, target height, width)
    per image; padding crops nothing, so the crop corner is (0, 0)."""
    _, pipeline = sdxl
    sizes = [(96, 150), (200, 80), (64, 64)]  # (width, height)
    examples = [Example(product_shot(w, h, seed=i), instance_prompt("mmes", "mug")) for i, (w, h) in enumerate(sizes)]
    seen = []
    hook = pipeline.unet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.extend(map(tuple, kwargs["added_cond_kwargs"]["time_ids"].tolist())),
        with_kwargs=True)
    try:
        train_lora(pipeline, examples, TrainingSettings(steps=6, batch_size=3, resolution=64, checkpoint_every=1000),
                   tmp_path)
    finally:
        hook.remove()
    expected = {(float(h), float(w), 0.0, 0.0, 64.0, 64.0) for w, h in sizes}
    assert len(seen) == 18 and set(seen) <= expected and len(set(seen)) >= 2
