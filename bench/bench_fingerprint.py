"""Benchmark: the cost of content-hashing model weights for fingerprints (udfs/zoo.py), at the
size of an SDXL base snapshot.

    python bench/bench_fingerprint.py                  # SDXL fp16 file sizes (~6.9 GB), then deleted
    python bench/bench_fingerprint.py --scale 0.1      # a tenth of that

Writes a folder with the file sizes of stable-diffusion-xl-base-1.0's fp16 safetensors (UNet,
two text encoders, VAE; random bytes, since the hash's cost does not depend on them) and times
`weights_digest` on it: cold (each file's pages dropped from the page cache first with
posix_fadvise, so it is read from disk), warm (pages cached, a new process: no digest cache),
again in the same process (the in-process cache), and in a new process with the home's
`weight-digests.json` (what every later run pays). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from udfs import zoo  # noqa: E402

# stable-diffusion-xl-base-1.0, variant fp16: the four weight files' sizes in bytes.
SDXL_FP16 = {"unet/diffusion_pytorch_model.fp16.safetensors": 5_135_149_760,
             "text_encoder/model.fp16.safetensors": 246_144_152,
             "text_encoder_2/model.fp16.safetensors": 1_389_382_176,
             "vae/diffusion_pytorch_model.fp16.safetensors": 167_335_342}


def write_snapshot(root: Path, scale: float) -> int:
    block = os.urandom(64 << 20)
    total = 0
    for name, size in SDXL_FP16.items():
        size = int(size * scale)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        with open(root / name, "wb") as out:
            for start in range(0, size, len(block)):
                out.write(block[:min(len(block), size - start)])
            out.flush()
            os.fsync(out.fileno())
        total += size
    return total


def drop_pages(root: Path) -> None:
    for file in root.rglob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return round(time.perf_counter() - start, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--dir", help="where to write the snapshot (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        snapshot, cache = work / "sdxl", work / "models" / zoo.DIGEST_CACHE
        size = write_snapshot(snapshot, args.scale)
        drop_pages(snapshot)
        cold = timed(lambda: zoo.weights_digest(snapshot))
        zoo._DIGESTS.clear()  # a new process, pages cached
        warm = timed(lambda: zoo.weights_digest(snapshot, cache))
        again = timed(lambda: zoo.weights_digest(snapshot, cache))
        zoo._DIGESTS.clear()  # a new process with the home's digest cache
        cached = timed(lambda: zoo.weights_digest(snapshot, cache))
        print(json.dumps({"bytes": size, "files": len(SDXL_FP16), "cold_s": cold,
                          "cold_mb_per_s": round(size / 2**20 / cold, 1), "warm_no_cache_s": warm,
                          "same_process_s": again, "new_process_with_cache_s": cached,
                          "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
