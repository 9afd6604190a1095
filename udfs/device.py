"""Where models run: CUDA when present (with bf16/fp16 autocast), else CPU."""

from __future__ import annotations

import contextlib
import threading

import torch

# Held while building or loading modules, and while seeding torch's global generator for an
# initialisation: loaders patch torch globally (empty-weight init on the meta device), and the
# embedded engine runs parallel tasks as threads of one process.
BUILDING = threading.RLock()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def autocast(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def task_device(configured: str, slot: int) -> str:
    """The device one fanned-out task (a product's training or generation) runs on.

    An explicit `models.device` (cpu, cuda:1) wins. With "auto": the GPU the engine assigned to
    the task (Spark with `spark.task.resource.gpu.amount=1` gives each task its own address),
    else a deterministic round-robin over the GPUs this process sees by the task's slot, else the
    CPU (the embedded engine never assigns resources)."""
    if configured != "auto":
        return configured
    from pyspark import TaskContext

    context = TaskContext.get()
    assigned = context.resources().get("gpu") if context is not None else None
    if assigned is not None and assigned.addresses:
        return f"cuda:{assigned.addresses[0]}"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{slot % count}" if count else "cpu"


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
