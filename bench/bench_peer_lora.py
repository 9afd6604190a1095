"""Peer check: our FLUX.2 [klein] LoRA adapter against the one diffusers' own DreamBooth LoRA
script for the family writes, on the tiny random-weight model.

    python bench/bench_peer_lora.py --reference path/to/train_dreambooth_lora_flux2_klein.py

Builds the tiny FLUX.2 [klein] snapshot (udfs/diffusion.py, diffusers' layout), trains our adapter
(training/lora.py) and runs the reference script on the same photos, rank and steps, then
  1. compares the two adapter files' keys and tensor shapes (the sets must be equal), and
  2. loads each in the other's pipeline: ours with diffusers' plain
     `Flux2KleinPipeline.load_lora_weights`, theirs through our generation path
     (udfs/diffusion.py adapter_loaded + render). A load counts only when every tensor of the file
     is in the transformer afterwards (no key silently skipped) and the output changes.
Without --reference only our adapter's keys are printed. Figures come from tiny random weights:
they show format compatibility, never quality. The script itself is not part of this repository
(copy it from diffusers' examples/dreambooth; it needs accelerate, torchvision).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from core.settings import TrainingSettings  # noqa: E402
from sample_images import product_shot  # noqa: E402
from training.lora import ADAPTER_FILE, Example, train_lora  # noqa: E402
from udfs.diffusion import adapter_loaded, build_tiny_text2img, load_pipeline, render  # noqa: E402

PROMPT = "a photo of sks mug"
RANK, STEPS, RESOLUTION = 4, 2, 64


def run_reference(script: Path, base: Path, photos: Path, out: Path) -> Path:
    """diffusers' trainer on the tiny snapshot, fp32 on the CPU, no validation."""
    command = [sys.executable, str(script), "--pretrained_model_name_or_path", str(base),
               "--instance_data_dir", str(photos), "--instance_prompt", PROMPT, "--output_dir", str(out),
               "--resolution", str(RESOLUTION), "--train_batch_size", "1", "--max_train_steps", str(STEPS),
               "--rank", str(RANK), "--learning_rate", "1e-3", "--mixed_precision", "no", "--seed", "0",
               # the pipelines' text layers (9, 18, 27), which generation and our trainer use; the script's
               # own default, 10 20 30, differs from its pipeline's (and a tiny Qwen3 has 27 layers)
               "--text_encoder_out_layers", "9", "18", "27",
               "--report_to", "mlflow"]  # accelerate has no "none"; MLflow is installed, its store kept in `out`
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=out, env=env)
    if done.returncode:
        raise SystemExit(f"the reference script failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return out / ADAPTER_FILE


def shapes(path: Path) -> dict[str, tuple]:
    return {key: tuple(tensor.shape) for key, tensor in load_file(path).items()}


def loaded_completely(pipeline, adapter: Path) -> bool:
    """Every tensor of the file is in the pipeline's transformer after loading, value for value."""
    from peft.utils import get_peft_model_state_dict

    name = next(iter(pipeline.transformer.peft_config))
    state = get_peft_model_state_dict(pipeline.transformer, adapter_name=name)
    inside = {f"transformer.{k}": v for k, v in state.items()}
    file = load_file(adapter)
    return set(inside) == set(file) and all(torch.equal(inside[k].cpu(), file[k]) for k in file)


def cross_load(base: Path, adapter: Path, ours_path: bool) -> dict:
    """Load `adapter` on the base snapshot, by diffusers' plain API or through our generation path."""
    from diffusers import Flux2KleinPipeline

    pipeline = load_pipeline("text2img", base, "cpu") if ours_path else \
        Flux2KleinPipeline.from_pretrained(str(base), local_files_only=True)
    before = np.asarray(render(pipeline, [PROMPT], [0], 2, 4.0, RESOLUTION, 1)[0], dtype=float)
    if ours_path:
        with adapter_loaded(pipeline, adapter) as adapted:
            complete = loaded_completely(adapted, adapter)
            after = np.asarray(render(adapted, [PROMPT], [0], 2, 4.0, RESOLUTION, 1)[0], dtype=float)
    else:
        pipeline.load_lora_weights(str(adapter))
        complete = loaded_completely(pipeline, adapter)
        after = np.asarray(render(pipeline, [PROMPT], [0], 2, 4.0, RESOLUTION, 1)[0], dtype=float)
    return {"all_tensors_loaded": complete, "output_change": round(float(np.abs(after - before).mean()), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="diffusers' train_dreambooth_lora_flux2_klein.py")
    parser.add_argument("--work", type=Path, help="keep the snapshot, photos and adapters here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="peer-lora-"))
    base, photos = work / "tiny-flux2-klein", work / "photos"
    if not base.exists():
        build_tiny_text2img(base, family="flux2-klein")
    photos.mkdir(parents=True, exist_ok=True)
    images = [product_shot(96, 96, seed=i) for i in range(2)]
    for i, image in enumerate(images):
        image.save(photos / f"{i}.png")

    # Ours with the reference's settings: lr 1e-3 and lr schedule constant, LoRA alpha = rank.
    config = TrainingSettings(rank=RANK, steps=STEPS, batch_size=1, resolution=RESOLUTION, learning_rate=1e-3,
                              checkpoint_every=1000)
    ours = train_lora(load_pipeline("text2img", base, "cpu"), [Example(i, PROMPT) for i in images], config,
                      work / "ours").adapter_dir / ADAPTER_FILE
    result = {"weights": "tiny random weights (format check only)", "ours": str(ours), "ours_keys": len(shapes(ours))}
    if args.reference:
        theirs = run_reference(args.reference, base, photos, work / "reference")
        mine, their = shapes(ours), shapes(theirs)
        result.update({
            "reference": str(theirs), "reference_keys": len(their),
            "key_sets_equal": set(mine) == set(their),
            "shapes_equal": set(mine) == set(their) and all(mine[k] == their[k] for k in mine),
            "only_ours": sorted(set(mine) - set(their)), "only_reference": sorted(set(their) - set(mine)),
            "ours_in_diffusers_pipeline": cross_load(base, ours, ours_path=False),
            "reference_in_our_pipeline": cross_load(base, theirs, ours_path=True),
        })
    print(json.dumps(result, indent=2))
    ok = not args.reference or (result["shapes_equal"] and result["ours_in_diffusers_pipeline"]["all_tensors_loaded"]
                                and result["reference_in_our_pipeline"]["all_tensors_loaded"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
