"""The pipeline's shared vocabularies, each spelled once, as rows that carry their behaviour: the
metrics (METRICS: inputs, compute function, version; which are evaluated in Table 2; the
weighted aggregate), the embedding variants they read, the kinds of image and the augmentation
kinds (AUGMENT_KINDS).

Dependency-free on purpose: `core/tables.py` declares columns from it, and the metrics job, the
filter, the ranking, the evaluation and the report read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddingVariant:
    """What part of an image the embeddings job embeds. `prepare` is "module:function"
    (image, mask) -> image, resolved when used; None embeds the whole image and needs no mask."""

    name: str  # embeddings.variant
    prepare: str | None
    description: str

    def mask_method(self, segmenter: str) -> str:
        """embeddings.mask_method of its vectors: the segmenter whose mask prepared it, '' if none."""
        return "" if self.prepare is None else segmenter


EMBEDDING_VARIANTS: dict[str, EmbeddingVariant] = {v.name: v for v in (
    EmbeddingVariant("full", None, "the whole image"),
    EmbeddingVariant("segmented", "udfs.imaging:segment",
                     "the product alone: background white, cropped to the mask's box (MultiBooth)"),
    EmbeddingVariant("background", "udfs.imaging:without_product",
                     "the scene alone: the product's pixels (its mask, dilated) filled with the scene's mean colour"),
)}


@dataclass(frozen=True)
class Metric:
    """A per-image metric and its behaviour. The metrics job and `recontext imagine` both compute
    it by calling `compute` on the inputs it names; stored rows computed by another `version`
    are recomputed. Inputs: "<role>:<variant>" (a stored embedding: role clip or dino, variant
    from EMBEDDING_VARIANTS), "text" (the CLIP text vector of the image's prompt, else its
    caption), "mask" and "source_mask" (the image's product mask and its source's)."""

    name: str  # column name in image_metrics (and evaluation_metrics when evaluated)
    label: str  # as the paper and reports print it
    comment: str  # column comment
    # "module:function" (inputs, image, references) -> float or None: `image` and each of
    # `references` (the product's references, the image itself left out) map input -> value
    compute: str
    inputs: tuple[str, ...]
    version: int = 1  # raise it when the definition changes: stored rows are recomputed
    evaluated: bool = True  # a column of the paper's Table 2 and a feature of the learned ranker


# The per-image metrics, in image_metrics' column order (docs/metrics.md for the definitions).
METRICS: tuple[Metric, ...] = (
    Metric("clip_i", "CLIP-I", "mean CLIP cosine to the product's reference images (DreamBooth CLIP-I)",
           "etl.metrics:mean_cosine_to_references", ("clip:full",)),
    Metric("dino_i", "DINO-I", "mean DINO cosine to the product's reference images (DreamBooth DINO)",
           "etl.metrics:mean_cosine_to_references", ("dino:full",)),
    Metric("clip_t", "CLIP-T", "CLIP cosine between the image and its text (DreamBooth CLIP-T)",
           "etl.metrics:cosine_of_pair", ("clip:full", "text")),
    Metric("seg_clip_i", "Seg CLIP-I", "clip_i on segmented products (MultiBooth)",
           "etl.metrics:mean_cosine_to_references", ("clip:segmented",)),
    Metric("seg_dino_i", "Seg DINO-I", "dino_i on segmented products (MultiBooth)",
           "etl.metrics:mean_cosine_to_references", ("dino:segmented",)),
    Metric("seg_clip_t", "Seg CLIP-T", "clip_t with the image segmented (MultiBooth)",
           "etl.metrics:cosine_of_pair", ("clip:segmented", "text")),
    Metric("mask_iou", "mask IoU", "IoU of the image's mask with its source mask",
           "etl.metrics:iou_of_masks", ("mask", "source_mask"), evaluated=False),  # a filter, not an evaluation
    Metric("bg_clip_t", "Background CLIP-T", "clip_t with the product masked out: how well the scene alone "
           "matches the text (scene adherence apart from the product)",
           "etl.metrics:cosine_of_pair", ("clip:background", "text"), evaluated=False),
)
METRIC_COLUMNS: tuple[str, ...] = tuple(m.name for m in METRICS)
# The columns of the paper's Table 2, in its order; the learned ranker's features.
EVALUATED: tuple[str, ...] = ("clip_i", "clip_t", "dino_i", "seg_clip_i", "seg_clip_t", "seg_dino_i")
# What the report shows beside each generated image: the ranking's default aggregate.
RANKING_METRICS: tuple[str, ...] = ("clip_t", "clip_i", "dino_i")
LABELS: dict[str, str] = {m.name: m.label for m in METRICS}
assert set(EVALUATED) == {m.name for m in METRICS if m.evaluated} and set(RANKING_METRICS) <= set(METRIC_COLUMNS)
# What a stored image_metrics row was computed by: a row with another value is recomputed.
METRIC_VERSIONS = ",".join(f"{m.name}={m.version}" for m in sorted(METRICS, key=lambda m: m.name))


def vector_inputs() -> list[tuple[str, str]]:
    """(role, variant) of every stored embedding some metric reads, in first-use order: what the
    embeddings job makes and what the metrics join."""
    pairs = [tuple(i.split(":")) for m in METRICS for i in m.inputs if ":" in i]
    return list(dict.fromkeys(pairs))


def aggregate_score(frame, weights: dict):
    """The automatic aggregate of a pandas frame of metric columns: the weighted sum, a missing
    metric counting 0. The filter (training.score_weights), the ranking and the evaluation
    (generation.rank_weights) all use it."""
    unknown = set(weights) - set(METRIC_COLUMNS)
    if unknown:
        raise ValueError(f"unknown metric(s) in weights: {', '.join(sorted(unknown))}; "
                         f"metrics: {', '.join(METRIC_COLUMNS)}")
    return sum(w * frame[m].astype(float).fillna(0.0) for m, w in weights.items())


# Kinds of image: catalog photos, what augmentation makes (AUGMENT_KINDS), and what an adapter
# generates.
REFERENCE = "reference"
GENERATED = "generated"


@dataclass(frozen=True)
class AugmentKind:
    """An augmentation kind and its behaviour. The planner, the UDF, the training-set filter, the
    settings and the report ask this row; no other code names a kind. Behaviour is named
    "module:function" (resolved when used, as udfs/zoo.py ROLES names loaders)."""

    name: str
    positive: bool  # trains as the product (True) or as "not the product"
    step: str  # the pipeline step that plans and makes it (etl/augment.py)
    # (lake, zoo, AugmentSettings) -> (tasks, quarantine rows); kinds sharing a planner are planned together
    planner: str
    # (pipeline or None, task, parameters, generator) -> [(image, extra parameters)]
    generate: str
    role: str | None  # the model role that makes it (udfs/zoo.py ROLES); None: no model
    description: str
    quota: int = 0  # default of training.positives_per_kind: the best-scoring kept per product (positives)
    masked: bool = False  # its tasks get the parent's product mask
    min_iou: bool = False  # the filter drops it when its mask IoU with its source is below training.iou_threshold
    default_on: bool = True  # False: made only for the product types augment.kinds_for_types lists for it


AUGMENT_KINDS: dict[str, AugmentKind] = {k.name: k for k in (
    AugmentKind("novel_view", True, "novel_views", "etl.augment:plan_novel_views", "udfs.augmentation:novel_view",
                "image2video", "image-to-video clip from a reference; chosen frames become new viewpoints",
                quota=12),
    AugmentKind("outpaint", True, "outpaint", "etl.augment:plan_outpaints", "udfs.augmentation:outpaint",
                "inpaint", "everything outside the product mask repainted from an approved scene prompt; the "
                "product's pixels are copied back from the source, so they are unchanged exactly",
                quota=12, masked=True, min_iou=True),
    AugmentKind("negative", False, "negatives", "etl.augment:plan_negatives", "udfs.augmentation:negative",
                "text2img", "text-to-image of the class noun in a caption's scene (an in-class negative)"),
    AugmentKind("counterfactual", False, "negatives", "etl.augment:plan_negatives",
                "udfs.augmentation:counterfactual", "inpaint",
                "the (slightly dilated) product region repainted with another object of the class; pixels "
                "outside it are copied back (same background)", masked=True),
    AugmentKind("mirror", True, "novel_views", "etl.augment:plan_mirrors", "udfs.augmentation:mirror", None,
                "a reference flipped left to right, pixel for pixel: a new viewpoint for products whose mirror "
                "image is still faithful (no text or logo, symmetric shape), so off unless a type asks for it",
                quota=4, default_on=False),
)}
AUGMENTED_POSITIVES = tuple(k.name for k in AUGMENT_KINDS.values() if k.positive)
AUGMENTED_NEGATIVES = tuple(k.name for k in AUGMENT_KINDS.values() if not k.positive)


def resolve(reference: str):
    """The function a row names as "module:function" (imported when first used)."""
    import importlib

    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)

# Where a generation came from: the batch pipeline's approved target prompts, or a request
# (`recontext imagine`, the serving model). Batch ranking and Table 2 read the bank's only.
BANK, ON_DEMAND = "bank", "on_demand"


def from_bank(alias: str) -> str:
    """SQL predicate on `alias`.origin: the prompt bank's rows (rows written before the column
    existed read NULL, and all of those came from the bank)."""
    return f"coalesce({alias}.origin, '{BANK}') = '{BANK}'"
