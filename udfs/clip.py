"""CLIP (open_clip): image and text towers, loaded from an open_clip `local-dir:` folder.

A folder holds `open_clip_config.json` and `open_clip_model.safetensors`, the layout of an
open_clip Hugging Face snapshot; real weights are a folder swap, never a code change.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from udfs.device import autocast, pick_device


TINY_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711]},
}


class ClipModel:
    def __init__(self, path: str | Path, device: str = "auto"):
        import open_clip

        self.device = pick_device(device)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
        self.model.eval().to(self.device)
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")

    @torch.no_grad()
    def embed_images(self, images) -> np.ndarray:
        batch = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        with autocast(self.device):
            features = self.model.encode_image(batch)
        return _unit(features)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        with autocast(self.device):
            features = self.model.encode_text(tokens)
        return _unit(features)


def _unit(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True)).cpu().numpy()


def build_tiny(path: Path, seed: int = 0):
    """A random-weight CLIP with the real architecture, written in open_clip's local-dir layout."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CONFIG["model_cfg"])
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "open_clip_model.safetensors")
    return model


def load(path, models):
    """The zoo's loader (udfs/zoo.py ROLES): the CLIP from a local folder."""
    return ClipModel(path, models.device)
