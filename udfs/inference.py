"""Pandas UDFs that run the model zoo inside Spark tasks.

Each UDF is an `Iterator[...] -> Iterator[pd.DataFrame]` pandas UDF: the model is loaded once per
worker process (ModelZoo.load caches it) and every Arrow batch is re-batched to
`models.batch_size` images per forward pass. Every output is a struct with an `error` field: a
row whose image cannot be decoded or whose model call fails yields nulls plus the error, and the
rest of the batch is still scored. Tasks never fail on a bad row.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pandas as pd
from pyspark.sql.functions import pandas_udf

from core.vocabulary import EMBEDDING_VARIANTS, resolve
from udfs.imaging import alpha_mask, decode_mask, decode_rgb, encode_mask
from udfs.zoo import ModelZoo

EMBEDDING = "struct<vector: array<float>, error: string>"
MASK = "struct<mask: binary, area_fraction: double, bbox: array<int>, score: double, error: string>"
CAPTION = "struct<caption: string, error: string>"


def _run_batched(items: list, prepare: Callable, infer: Callable, batch_size: int) -> list[tuple]:
    """[(output, error)] per item: prepare each item alone, infer in batches, isolate failures."""
    results: list[tuple] = [(None, None)] * len(items)
    ready: list[tuple[int, object]] = []
    for i, item in enumerate(items):
        try:
            ready.append((i, prepare(item)))
        except Exception as err:  # noqa: BLE001 - one bad row never fails the task
            results[i] = (None, f"{type(err).__name__}: {err}")
    for start in range(0, len(ready), batch_size):
        chunk = ready[start:start + batch_size]
        try:
            outputs = infer([x for _, x in chunk])
        except Exception:  # noqa: BLE001 - retry one by one to find the row that breaks the batch
            outputs = []
            for i, x in chunk:
                try:
                    outputs.extend(infer([x]))
                except Exception as err:  # noqa: BLE001
                    outputs.append(err)
        for (i, _), out in zip(chunk, outputs):
            results[i] = (None, f"{type(out).__name__}: {out}") if isinstance(out, Exception) else (out, None)
    return results


def variant_image(variant: str, image, mask: np.ndarray | None):
    """The image an embedding variant embeds (core.vocabulary.EMBEDDING_VARIANTS), prepared with
    the product mask when the variant asks for one. The embeddings job and `imagine` share it."""
    prepare = EMBEDDING_VARIANTS[variant].prepare
    if prepare is None:
        return image
    if mask is None:
        raise ValueError(f"the {variant} variant needs a product mask")
    return resolve(prepare)(image, mask)


def _prepare_image(variant: str, data: bytes | None, mask: bytes | None):
    if data is None:
        raise ValueError("no image bytes")
    return variant_image(variant, decode_rgb(data), None if mask is None else decode_mask(mask))


def image_embedding_udf(zoo: ModelZoo, role: str, variant: str):
    """(image, mask) -> unit-norm embedding from role 'clip' or 'dino' of the variant's image."""
    batch_size = zoo.models.batch_size
    prepare = lambda item: _prepare_image(variant, *item)  # noqa: E731

    @pandas_udf(EMBEDDING)
    def embed(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        model = zoo.load(role)
        for images, masks in batches:
            items = list(zip(images, masks.where(masks.notna(), None)))
            results = _run_batched(items, prepare, lambda xs: list(model.embed_images(xs)), batch_size)
            yield _frame(results, lambda v: np.asarray(v, dtype=np.float32).tolist(), "vector")

    return embed


def text_embedding_udf(zoo: ModelZoo):
    batch_size = zoo.models.batch_size

    @pandas_udf(EMBEDDING)
    def embed(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        model = zoo.load("clip")
        for texts in batches:
            def prepare(text):
                if not isinstance(text, str) or not text.strip():
                    raise ValueError("empty text")
                return text

            results = _run_batched(list(texts), prepare, lambda xs: list(model.embed_texts(xs)), batch_size)
            yield _frame(results, lambda v: np.asarray(v, dtype=np.float32).tolist(), "vector")

    return embed


def mask_udf(zoo: ModelZoo, method: str):
    """image -> product mask (PNG), area fraction, [x0, y0, x1, y1] box (NULL when empty), score.

    method: 'u2netp' (salient object), 'sam' (box-prompted with the whole image), or 'alpha'
    (the image's own alpha channel, no model: a ground-truth hint where the catalog has one).
    """
    batch_size = zoo.models.batch_size

    @pandas_udf(MASK)
    def masks(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        if method == "alpha":
            infer = lambda xs: xs  # noqa: E731 - the prepared item already is the mask
            prepare = _alpha_result
        else:
            model = zoo.load(method)
            infer, prepare = model.segment, decode_rgb
        for images in batches:
            results = _run_batched(list(images), prepare, infer, batch_size)
            rows = []
            for result, error in results:
                if result is None:
                    rows.append((None, None, None, None, error))
                else:  # an empty mask is a result (no product found: area 0, no box), not an error
                    rows.append((encode_mask(result.mask), result.area_fraction, result.box, result.score, None))
            yield pd.DataFrame(rows, columns=["mask", "area_fraction", "bbox", "score", "error"])

    return masks


def _alpha_result(data: bytes):
    from udfs.segmenter import MaskResult

    mask = alpha_mask(data)
    if mask is None:
        raise ValueError("the image has no alpha channel")
    return MaskResult(mask, 1.0)


def caption_udf(zoo: ModelZoo, prompt: str):
    batch_size = zoo.models.batch_size

    @pandas_udf(CAPTION)
    def captions(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        model = zoo.load("captioner")
        for images in batches:
            results = _run_batched(list(images), decode_rgb, lambda xs: model.caption(xs, prompt), batch_size)
            yield _frame(results, str, "caption")

    return captions


def _frame(results: list[tuple], convert: Callable, name: str) -> pd.DataFrame:
    return pd.DataFrame(
        [(convert(out) if out is not None else None, err) for out, err in results], columns=[name, "error"]
    )
