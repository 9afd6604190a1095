"""Benchmark: the image-embedding UDF through Spark vs the same model in a plain batched loop.

    python bench/bench_embeddings.py [--models tiny-clip vit-b-32] [--images 256] [--device auto]

Both paths decode the same PNG bytes and run the same loaded model (udfs.zoo loaders) with the
same batch size; the ratio spark_s / direct_s is the engine's overhead (target <= 1.25 on CPU).
Models are random-weight, built into the loaders' own layouts: tiny-clip (the test model),
vit-b-32 and vit-l-14 (full-size open_clip CLIP), dino-vits16 (full-size DINO ViT-S/16).
On a GPU machine: `--device cuda --models vit-b-32 vit-l-14 dino-vits16 --images 4096`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from sample_images import encode, product_shot  # noqa: E402

MODELS = {"tiny-clip": "clip", "vit-b-32": "clip", "vit-l-14": "clip", "dino-vits16": "dino"}


def build(name: str, path: Path) -> None:
    if name == "tiny-clip":
        from udfs.clip import build_tiny

        build_tiny(path)
    elif name in ("vit-b-32", "vit-l-14"):
        import open_clip
        from safetensors.torch import save_file

        arch = {"vit-b-32": "ViT-B-32", "vit-l-14": "ViT-L-14"}[name]
        model = open_clip.create_model(arch)  # random weights, the real architecture
        path.mkdir(parents=True)
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(arch)}))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "open_clip_model.safetensors")
    else:  # DINO ViT-S/16, as facebook/dino-vits16
        from transformers import ViTConfig, ViTImageProcessor, ViTModel

        ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                           patch_size=16, image_size=224), add_pooling_layer=False).save_pretrained(path)
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["tiny-clip", "vit-b-32"], choices=list(MODELS))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from core.settings import Settings
    from etl.lakehouse import Lakehouse
    from udfs.imaging import decode_rgb
    from udfs.inference import image_embedding_udf
    from udfs.zoo import ModelZoo

    work = Path(tempfile.mkdtemp(prefix="recontext-bench-emb-"))
    images = [encode(product_shot(320, 240, seed=i), "PNG") for i in range(args.images)]
    results = {"machine": f"{platform.machine()}, torch {torch.__version__}, "
                          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
                          f"{torch.get_num_threads()} threads",
               "images": args.images, "batch_size": args.batch_size}
    for name in args.models:
        role = MODELS[name]
        build(name, work / name)
        settings = Settings.load(work / "home", models={
            "device": args.device, "batch_size": args.batch_size, role: {"path": str(work / name), "name": name}})
        zoo = ModelZoo.from_settings(settings)
        model = zoo.load(role)
        lake = Lakehouse(settings)
        frame = lake.spark.createDataFrame(pd.DataFrame({"image": images}), "image binary")
        staged = work / f"{name}-input"
        frame.write.format("delta").mode("overwrite").save(str(staged))  # read from storage, like a job
        source = lake.spark.read.format("delta").load(str(staged))
        udf = image_embedding_udf(zoo, role, "full")

        def spark_path():
            rows = source.select(udf("image", F.lit(None).cast("binary")).alias("e")).select("e.vector").toPandas()
            assert len(rows) == args.images and rows.vector.notna().all()

        def direct_path():
            for start in range(0, len(images), args.batch_size):
                model.embed_images([decode_rgb(b) for b in images[start:start + args.batch_size]])

        direct_path()  # warm-up: first forward pass, allocator
        timings = {}
        for label, run in (("direct", direct_path), ("spark", spark_path)) * args.repeats:
            started = time.perf_counter()
            run()
            timings.setdefault(label, []).append(time.perf_counter() - started)
        direct_s, spark_s = min(timings["direct"]), min(timings["spark"])
        results[name] = {"direct_images_per_s": round(args.images / direct_s, 1),
                         "spark_images_per_s": round(args.images / spark_s, 1),
                         "spark_over_direct_time": round(spark_s / direct_s, 3)}
        print(name, results[name], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
