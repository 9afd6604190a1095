"""The pipeline's shared vocabularies, each spelled once: the metric columns (which are
evaluated in Table 2, and the weighted aggregate) and the kinds of image.

Dependency-free on purpose: `core/tables.py` declares columns from it, and the metrics job, the
filter, the ranking, the evaluation and the report read it. The augmentation kinds themselves
(model role, positive or negative, how each is generated) are one table in
`udfs/augmentation.py`, beside the code that generates them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # column name in image_metrics (and evaluation_metrics when evaluated)
    label: str  # as the paper and reports print it
    comment: str  # column comment


# The per-image metrics, in image_metrics' column order (NOTES.md 4 for the definitions).
METRICS: tuple[Metric, ...] = (
    Metric("clip_i", "CLIP-I", "mean CLIP cosine to the product's reference images (DreamBooth CLIP-I)"),
    Metric("dino_i", "DINO-I", "mean DINO cosine to the product's reference images (DreamBooth DINO)"),
    Metric("clip_t", "CLIP-T", "CLIP cosine between the image and its text (DreamBooth CLIP-T)"),
    Metric("seg_clip_i", "Seg CLIP-I", "clip_i on segmented products (MultiBooth)"),
    Metric("seg_dino_i", "Seg DINO-I", "dino_i on segmented products (MultiBooth)"),
    Metric("seg_clip_t", "Seg CLIP-T", "clip_t with the image segmented (MultiBooth)"),
    Metric("mask_iou", "mask IoU", "IoU of the image's mask with its source mask"),
)
METRIC_COLUMNS: tuple[str, ...] = tuple(m.name for m in METRICS)
# The columns of the paper's Table 2, in its order (mask IoU is a filter, not an evaluation).
EVALUATED: tuple[str, ...] = ("clip_i", "clip_t", "dino_i", "seg_clip_i", "seg_clip_t", "seg_dino_i")
# What the report shows beside each generated image: the ranking's default aggregate.
RANKING_METRICS: tuple[str, ...] = ("clip_t", "clip_i", "dino_i")
LABELS: dict[str, str] = {m.name: m.label for m in METRICS}
assert set(EVALUATED) <= set(METRIC_COLUMNS) and set(RANKING_METRICS) <= set(METRIC_COLUMNS)


def aggregate_score(frame, weights: dict):
    """The automatic aggregate of a pandas frame of metric columns: the weighted sum, a missing
    metric counting 0. The filter (training.score_weights), the ranking and the evaluation
    (generation.rank_weights) all use it."""
    unknown = set(weights) - set(METRIC_COLUMNS)
    if unknown:
        raise ValueError(f"unknown metric(s) in weights: {', '.join(sorted(unknown))}; "
                         f"metrics: {', '.join(METRIC_COLUMNS)}")
    return sum(w * frame[m].astype(float).fillna(0.0) for m, w in weights.items())


# Kinds of image: catalog photos, what augmentation makes (udfs/augmentation.py KINDS), and
# what an adapter generates.
REFERENCE = "reference"
GENERATED = "generated"

# Where a generation came from: the batch pipeline's approved target prompts, or a request
# (`recontext imagine`, the serving model). Batch ranking and Table 2 read the bank's only.
BANK, ON_DEMAND = "bank", "on_demand"


def from_bank(alias: str) -> str:
    """SQL predicate on `alias`.origin: the prompt bank's rows (rows written before the column
    existed read NULL, and all of those came from the bank)."""
    return f"coalesce({alias}.origin, '{BANK}') = '{BANK}'"
