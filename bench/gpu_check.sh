#!/usr/bin/env bash
# The one prepared GPU check: the GPU test tier, then the project's trainer at full size with the
# sd15 and sdxl profiles' own settings and generation unfused and fused, into ONE JSON of figures
# named after the card ($OUT/gpu_check.json, else bench/out/gpu_check.json). Random weights at
# real sizes: timings and memory only. Sized to finish within 8 minutes on an H100/H200.
#
# It expects a GPU machine without network whose Python has torch, transformers, peft and
# accelerate (and pytest, onnxruntime, torchvision, timm, as the lent H200 image has) but no
# diffusers or open_clip: their wheels travel in the git-ignored .gpu_wheels/ (about 6 MiB, far
# within the 64 MiB a run may carry), filled once on a machine with PyPI:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .gpu_wheels \
#       diffusers==0.42.1 open_clip_torch ftfy wcwidth importlib_metadata
#   cp "$(python -c 'from udfs.zoo import packaged_weights; print(packaged_weights("u2netp"))')" .gpu_wheels/
#
# and carried with the run (device tool: carry [".gpu_wheels"]; command: bash bench/gpu_check.sh).
# Without CUDA it says so in one line, after running what it can (the tier, collected and
# skipped), and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-bench/out}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    "$python" -m pytest -q -m gpu tests/gpu -p no:cacheprovider >"$out/gpu_tier.log" 2>&1
    echo "gpu_check: no CUDA device here: the GPU tier was collected and skipped (pytest exit $?), no figures taken"
    exit 0
fi

site=/tmp/recontext-gpu-wheels
if ! "$python" -c "import diffusers, open_clip" 2>/dev/null; then
    ls .gpu_wheels/*.whl >/dev/null 2>&1 || { echo "gpu_check: diffusers/open_clip missing and no .gpu_wheels/*.whl to install (see this script's header)"; exit 1; }
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu_wheels/*.whl || exit 1
fi
export PYTHONPATH="$site:$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
[ -f .gpu_wheels/u2netp.onnx ] && export RECONTEXT_U2NETP_ONNX="$PWD/.gpu_wheels/u2netp.onnx"

started=$(date +%s)
echo "gpu_check: GPU tier"
timeout 210 "$python" -m pytest -q -m gpu tests/gpu -p no:cacheprovider --junitxml="$out/gpu_tier.xml" \
    >"$out/gpu_tier.log" 2>&1
tail -n 5 "$out/gpu_tier.log"
echo "gpu_check: trainer and generation, sd15 profile"
timeout 110 "$python" bench/bench_gpu_trainer.py --profile sd15 --steps 40 --out "$out/trainer_sd15.json" \
    >"$out/trainer_sd15.log" 2>&1 || tail -n 5 "$out/trainer_sd15.log"
echo "gpu_check: trainer and generation, sdxl profile"
timeout 170 "$python" bench/bench_gpu_trainer.py --profile sdxl --steps 10 --out "$out/trainer_sdxl.json" \
    >"$out/trainer_sdxl.log" 2>&1 || tail -n 5 "$out/trainer_sdxl.log"

"$python" - "$out" "$(( $(date +%s) - started ))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "wall_s": seconds,
          "weights": "random, real sizes: timings and memory only"}
try:
    suite = ET.parse(out / "gpu_tier.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    report["gpu_tier"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError) as error:
    report["gpu_tier"] = {"error": f"no report ({error}); see gpu_tier.log"}
targets = {"sd15": (180, 4.5), "sdxl": (420, 0.85)}  # issue 22: s per 1,000 steps, images/s with the adapter
for profile, (train_s, images_per_s) in targets.items():
    path = out / f"trainer_{profile}.json"
    if not path.exists():
        report[profile] = {"error": f"no figures; see trainer_{profile}.log"}
        continue
    figures = json.loads(path.read_text())
    generate = figures.get("generate", {})
    best = max(generate.get("fused_images_per_s", 0), generate.get("unfused_images_per_s", 0))
    figures["targets"] = {"s_per_1000_steps_at_most": train_s,
                          "train_met": figures["train"]["s_per_1000_steps"] <= train_s,
                          "images_per_s_at_least": images_per_s, "generate_met": best >= images_per_s}
    report[profile] = figures
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
EOF
