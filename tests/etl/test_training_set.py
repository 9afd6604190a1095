"""The filter on a constructed set where the right answer is known."""

import math

import numpy as np
import pandas as pd

from core.settings import TrainingSettings
from etl.training_set import select_training_images


def _rows():
    rows = [("ref1", "reference", 0.9, None), ("ref2", "reference", 0.8, None)]
    rows += [(f"out{i}", "outpaint", 0.5 + i / 100, iou) for i, iou in enumerate([0.9, 0.2, np.nan, 0.7, 0.8, 0.95])]
    rows += [("view1", "novel_view", 0.1, None), ("view2", "novel_view", -5.0, None)]
    rows += [(f"neg{i}", "negative", 0.0, None) for i in range(4)] + [(f"cf{i}", "counterfactual", 0.0, None)
                                                                      for i in range(4)]
    return pd.DataFrame({"image_id": [r[0] for r in rows], "product_id": "p", "kind": [r[1] for r in rows],
                         "clip_i": [r[2] for r in rows], "dino_i": 0.0, "clip_t": 0.0, "seg_clip_i": 0.0,
                         "seg_dino_i": 0.0, "seg_clip_t": 0.0, "mask_iou": [r[3] for r in rows], "caption": "c"})


def test_reasons_and_quotas():
    config = TrainingSettings(iou_threshold=0.5, min_score=-1.0, min_score_vs_references=0.0,
                              positives_per_kind={"outpaint": 3, "novel_view": 1}, score_weights={"clip_i": 1.0})
    out = select_training_images(_rows(), config, positives_per_negative=2.0).set_index("image_id")
    assert out.loc[["ref1", "ref2"], "selected"].all()
    assert out.loc["out1", "reason"] == "mask IoU 0.20 below 0.5 (product lost or hallucinated)"
    assert out.loc["out2", "reason"] == "no mask IoU (no product mask found)"
    assert out.loc["view2", "reason"] == "score -5.000 below -1.000 (training.min_score)"
    # eligible outpaints by score: out5 .55, out4 .54, out3 .53, out0 .50; novel views: view1 .10
    outpaints = out[out.selected & (out.kind == "outpaint")].sort_values("rank")
    assert list(outpaints.index) == ["out5", "out4", "out3"]
    assert out.loc["out0", "reason"] == "over the outpaint quota (rank 4, keeping 3)"
    assert out.loc["view1", "selected"] and out.loc["view1", "rank"] == 1  # ranked within its own kind
    positives = int((out.selected & out.is_positive).sum())
    assert positives == 6
    negatives = out[~out.is_positive]
    assert negatives.selected.sum() == math.ceil(positives / 2) == 3
    assert list(negatives[negatives.selected].sort_values("rank").index) == ["cf0", "neg0", "cf1"]
    assert negatives[~negatives.selected].reason.str.startswith("over quota (negative").all()
    assert out[out.selected].reason.isna().all()


def test_the_default_bar_rejects_and_twins_never_train_as_positives():
    """The default bar is a share of the references' mean score, so it rejects on any model
    scale; an image that is also a negative of the product is not a positive."""
    rows = _rows().assign(twin=False)
    rows.loc[rows.image_id == "out5", "twin"] = True
    config = TrainingSettings(iou_threshold=0.5, score_weights={"clip_i": 1.0})  # defaults otherwise
    out = select_training_images(rows, config, positives_per_negative=2.0).set_index("image_id")
    bar = 0.75 * (0.9 + 0.8) / 2  # 0.6375: the outpaints (.50-.55) and novel views fall below it
    assert out.loc["out5", "reason"] == "also a negative of this product (the same pixels from two lineages)"
    assert out.loc["out4", "reason"] == f"score 0.540 below {bar:.3f} (0.75 x the references' mean 0.850)"
    assert not out.loc[["out0", "out3", "out4", "out5", "view1", "view2"], "selected"].any()
    assert out.loc[["ref1", "ref2"], "selected"].all()
