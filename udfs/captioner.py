"""Captioner: a transformers vision-language model driven by an instruction prompt.

Loaded with AutoProcessor + AutoModelForImageTextToText from a snapshot folder, so BLIP,
BLIP-2, LLaVA-style or Qwen-VL snapshots are a folder swap. Models whose processor has a chat
template get the prompt as a user turn; BLIP-style models get it as the caption's prefix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from transformers.utils.logging import disable_progress_bar

from udfs.device import pick_device

TINY_VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] a an the photo of on in with and product white black red green "
    "blue yellow silver gold wooden metal ceramic glass plastic leather fabric cup box bottle bag "
    "shoe chair table lamp motorcycle rocket gift saucer background studio light soft shadow left "
    "right center top bottom front side shiny matte logo handle wheel . ,"
).split()


class Captioner:
    def __init__(self, path: str | Path, device: str = "auto", max_new_tokens: int = 40):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        disable_progress_bar()
        self.device = pick_device(device)
        self.processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True)
        self.model.eval().to(self.device)
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def caption(self, images, prompt: str) -> list[str]:
        images = list(images)
        if getattr(self.processor, "chat_template", None):
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = [self.processor.apply_chat_template(turn, add_generation_prompt=True)] * len(images)
        else:
            text = [prompt] * len(images)
        inputs = self.processor(images=images, text=text, return_tensors="pt", padding=True).to(self.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if not self.model.config.is_encoder_decoder and "input_ids" in inputs and not _is_blip(self.model):
            output = output[:, inputs["input_ids"].shape[1]:]  # decoder-only models echo the prompt
        return [c.strip() for c in self.processor.batch_decode(output, skip_special_tokens=True)]


def _is_blip(model) -> bool:
    return model.config.model_type == "blip"


def build_tiny(path: Path, seed: int = 0):
    """A random-weight BLIP captioner (real architecture) with a small WordPiece vocabulary."""
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(TINY_VOCAB)}, do_lower_case=True)
    if len(tokenizer) < len(TINY_VOCAB):  # transformers can silently build a near-empty vocabulary
        raise RuntimeError(f"tiny captioner tokenizer has {len(tokenizer)} tokens, expected {len(TINY_VOCAB)}")
    tokenizer.add_special_tokens({"bos_token": "[CLS]", "eos_token": "[SEP]"})
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
        text_config={"vocab_size": len(TINY_VOCAB), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "encoder_hidden_size": 32,
                     "bos_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
                     "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id},
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}),
                              tokenizer=tokenizer)
    processor.save_pretrained(path)
    return model


def load(path, models):
    """The zoo's loader (udfs/zoo.py ROLES): the captioner from a local folder."""
    return Captioner(path, models.device)
