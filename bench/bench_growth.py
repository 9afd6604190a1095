"""Benchmark: what 100 new products cost as the home grows (cost follows new work, not history).

    python bench/bench_growth.py                 # homes of 1k, 10k and 100k stored reference images
    python bench/bench_growth.py --sizes 1000 10000
    python bench/bench_growth.py --repeats 1      # one run per size (default 3, medians reported)

For each size a fresh home is populated with that many reference images (4 per product) and
the rows earlier runs would have left for them (product ids are random 16-hex-digit hashes, new
and stored alike, as real catalogs' ids are), written straight through the engine in the
declared schemas (TABLES), in commits of 10,000 rows as a home that grew over time and was
compacted would hold them: `products`, `product_images` (distinct 64x64 PNGs, image_id = the
pixel hash the pipeline uses), `masks` (the segmenter's method, a real box and mask PNG, the current weights'
fingerprint), `embeddings` (every role and variant a metric reads: CLIP and DINO full and
segmented, CLIP background; random unit vectors of the tiny models' widths and the current
fingerprints) and `image_metrics` (one row per image with the
current model fingerprints; metric values NULL). Then 100 new products (2 photos each, 160x120
PNG) go through ingest, masks (tiny SAM), embeddings (tiny CLIP/DINO) and metrics
normally, and each step is timed, on each of `--repeats` copies of the populated home; the
medians are reported (single runs swing by tens of percent on the 2-core box). One torch/ONNX thread.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from core.settings import Settings  # noqa: E402
from etl.embeddings import embedding_passes  # noqa: E402
from etl.ingest import ingest  # noqa: E402
from etl.lakehouse import Lakehouse  # noqa: E402
from core.tables import TABLES, sql_list  # noqa: E402
from core.vocabulary import METRIC_VERSIONS  # noqa: E402
from jobs.steps import run_steps  # noqa: E402
from sample_images import encode, product_shot, write_files  # noqa: E402
from udfs.imaging import encode_mask, pixel_hash  # noqa: E402
from udfs.zoo import ModelZoo  # noqa: E402

IMAGES_PER_PRODUCT, NEW_PRODUCTS, COMMIT_ROWS = 4, 100, 10_000
STEPS = ("masks", "embeddings", "metrics")
# Tiny random-weight SAM: U2-Net-p (real weights) runs at ~1-4 images/s on this box, and the 200
# new images' model time, the same at every size, would hide what the size of the home costs.
SEGMENTER = "sam"


def populate(lake: Lakehouse, zoo: ModelZoo, images: int) -> None:
    """`images` stored reference images and their rows, committed COMMIT_ROWS at a time."""
    rng = np.random.default_rng(0)
    segmenter = zoo.models.segmenter
    fingerprints = {role: zoo.fingerprint(role) for role in ("clip", "dino", segmenter, "captioner")}
    widths = {role: zoo.load(role).embed_images([Image.new("RGB", (64, 64))]).shape[1] for role in ("clip", "dino")}
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:56, 12:52] = True
    mask_png = encode_mask(mask)
    base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for start in range(0, images, COMMIT_ROWS):
        ids, blobs, products = [], [], []
        for n in range(start, min(images, start + COMMIT_ROWS)):
            pixels = base.copy()
            pixels[0, :4] = np.frombuffer(n.to_bytes(12, "little"), dtype=np.uint8).reshape(4, 3)  # distinct
            image = Image.fromarray(pixels)
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            ids.append(pixel_hash(image))
            blobs.append(buffer.getvalue())
            products.append(product_id("stored", n // IMAGES_PER_PRODUCT))
        count = len(ids)
        frames = {
            "products": pd.DataFrame({"product_id": sorted(set(products)), "title": "a stored mug",
                                      "product_type": "mug", "attributes": "{}", "source": "bench"}),
            "product_images": pd.DataFrame({
                "image_id": ids, "product_id": products, "role": "reference", "image": blobs, "format": "PNG",
                "width": 64, "height": 64, "has_alpha": False, "original_format": "PNG", "normalization": "",
                "source_uri": [f"bench://{i}.png" for i in ids]}),
            "masks": pd.DataFrame({"image_id": ids, "method": segmenter, "model": zoo.name(segmenter),
                                   "mask": [mask_png] * count, "area_fraction": float(mask.mean()),
                                   "bbox": [[12, 8, 52, 56]] * count, "score": 0.9,
                                   "model_fingerprint": fingerprints[segmenter]}),
            "embeddings": pd.concat([pd.DataFrame({  # every variant a metric reads
                "image_id": ids, "backbone": p.backbone, "role": p.role, "variant": p.variant,
                "mask_method": p.mask_method, "vector": list(_unit(rng, count, widths[p.role])),
                "model_fingerprint": p.model_fingerprint})
                for p in embedding_passes(zoo).itertuples()]),
            "image_metrics": pd.DataFrame({
                "image_id": ids, "product_id": products, "kind": "reference", "n_references": IMAGES_PER_PRODUCT - 1,
                "clip_backbone": zoo.name("clip"), "dino_backbone": zoo.name("dino"), "mask_method": segmenter,
                "models": ";".join(fingerprints[r] for r in ("clip", "dino", segmenter, "captioner")),
                "metric_versions": METRIC_VERSIONS}),
        }
        for name, frame in frames.items():
            table = TABLES[name]
            frame = frame.reindex(columns=table.data_columns)
            rows = lake.spark.createDataFrame(frame.astype(object).where(frame.notna(), None), table.data_schema())
            rows.selectExpr("*", *(f"current_timestamp() AS {c}" for c in table.audit)).write.format(
                "delta").mode("append").save(lake.location(name))


def product_id(kind: str, n: int) -> str:
    """Ids drawn at random, as real catalogs have them (hashes): new products interleave with the
    stored ones in every sort order, so no file is skipped for being outside their id range."""
    return hashlib.sha256(f"{kind}-{n}".encode()).hexdigest()[:16]


NEW_IDS = [product_id("new", n) for n in range(NEW_PRODUCTS)]


def _unit(rng, count: int, width: int):
    vectors = rng.standard_normal((count, width)).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).tolist()


def new_products(catalog: Path) -> None:
    for n, new_id in enumerate(NEW_IDS):
        folder = catalog / new_id
        write_files(folder, {f"{s}.png": encode(product_shot(seed=1000 + 2 * n + s), "PNG") for s in (0, 1)})
        (folder / "product.json").write_text(json.dumps({"product_type": "mug", "title": f"new mug {n}"}))


def measure(root: Path, tiny: Path, catalog: Path, images: int, repeats: int) -> dict[str, float]:
    """Each step's median seconds over `repeats` copies of one populated home."""
    models = {"tiny_dir": str(tiny), "segmenter": SEGMENTER}
    base = root / f"home-{images}"
    started = time.perf_counter()
    lake = Lakehouse(Settings.load(base, models=models))
    populate(lake, ModelZoo.from_settings(lake.settings), images)
    print(f"  home of {images} stored images populated in {time.perf_counter() - started:.0f} s", flush=True)
    runs = []
    for repeat in range(repeats):
        home = shutil.copytree(base, root / f"home-{images}-{repeat}")  # Delta logs hold relative paths
        lake = Lakehouse(Settings.load(home, models=models))
        zoo = ModelZoo.from_settings(lake.settings)
        seconds = {}
        started = time.perf_counter()
        summary = ingest(lake, catalog)
        seconds["ingest"] = time.perf_counter() - started
        assert summary.rows_written["product_images"] == 2 * NEW_PRODUCTS, summary
        for step in STEPS:
            started = time.perf_counter()
            written = run_steps(lake, [step], zoo, progress=lambda _: None)[step]
            seconds[step] = time.perf_counter() - started
            assert written[step if step != "metrics" else "image_metrics"] > 0, written
        metrics = lake.spark.sql(f"SELECT count(*) AS n FROM image_metrics WHERE product_id IN ({sql_list(NEW_IDS)}) "
                                 "AND clip_i IS NOT NULL").collect()[0]["n"]
        assert metrics == 2 * NEW_PRODUCTS, metrics
        seconds["total"] = sum(seconds.values())
        print(f"  {images} (run {repeat + 1}): " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), flush=True)
        runs.append(seconds)
        shutil.rmtree(home)
    median = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    print(f"  {images} (median of {repeats}): " + ", ".join(f"{k} {v:.1f} s" for k, v in median.items()), flush=True)
    return median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3, help="runs per size on copies of one home; medians reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="recontext-bench-growth-"))
    catalog, tiny = root / "catalog", root / "tiny"
    new_products(catalog)
    warm = Lakehouse(Settings.load(root / "warm", models={"tiny_dir": str(tiny)}))
    ModelZoo.from_settings(warm.settings).check("clip", "dino", "captioner", SEGMENTER)
    print("warm-up (model loads, first queries; not reported):", flush=True)
    measure(root, tiny, catalog, 0, 1)
    results = {size: measure(root, tiny, catalog, size, args.repeats) for size in args.sizes}
    first, last = results[args.sizes[0]]["total"], results[args.sizes[-1]]["total"]
    labels = ", ".join(f"{s // 1000}k" for s in args.sizes)
    print(f"growth: {NEW_PRODUCTS} new products at {labels} stored images (median of {args.repeats}): "
          + ", ".join(f"{results[s]['total']:.1f} s" for s in args.sizes) + f"; ratio C/A {last / first:.2f}")


if __name__ == "__main__":
    main()
