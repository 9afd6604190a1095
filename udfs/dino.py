"""DINO image embeddings (transformers DINO/DINOv2) from a Hugging Face snapshot folder.

The embedding is the CLS token of the last layer, the feature DreamBooth's DINO metric uses
(ViT-S/16 DINO: `facebook/dino-vits16`; DINOv2 snapshots load the same way).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from transformers.utils.logging import disable_progress_bar

from udfs.device import autocast, pick_device



class DinoModel:
    def __init__(self, path: str | Path, device: str = "auto"):
        from transformers import AutoImageProcessor, AutoModel

        disable_progress_bar()
        self.device = pick_device(device)
        self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval().to(self.device)

    @torch.no_grad()
    def embed_images(self, images) -> np.ndarray:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        with autocast(self.device):
            cls = self.model(**inputs).last_hidden_state[:, 0]
        cls = cls.float()
        return (cls / cls.norm(dim=-1, keepdim=True)).cpu().numpy()


def build_tiny(path: Path, seed: int = 0):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=56, patch_size=14)
    model = Dinov2Model(config).eval()
    model.save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return model


def load(path, models):
    """The zoo's loader (udfs/zoo.py ROLES): the DINO from a local folder."""
    return DinoModel(path, models.device)
