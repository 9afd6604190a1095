"""Zero-shot typing with controlled embeddings: reference-image vectors are constructed so that
their scores against the tiny CLIP's own text embeddings of "a photo of a <type>" are exactly
what each case needs (confident, below the score threshold, too small a margin)."""

import numpy as np
import pandas as pd
import pytest

from etl.prompt_bank import UNKNOWN, _zero_shot
from core.tables import TABLES
from udfs.zoo import ModelZoo

KNOWN = ["mug", "lamp", "sofa"]
CASES = {  # product: wanted mean cosine to each known type
    "confident": (0.5, 0.1, 0.0),
    "faint": (0.15, 0.0, -0.1),  # best below min_zero_shot_score (0.2)
    "close": (0.5, 0.495, 0.1),  # 0.005 ahead of the runner-up, below min_zero_shot_margin (0.01)
    "lamp-ish": (0.1, 0.45, 0.3),
}


def _rows(table: str, **values) -> pd.DataFrame:
    frame = pd.DataFrame(values)
    for column in TABLES[table].data_columns:
        if column not in frame:
            frame[column] = None
    return frame


def test_confident_below_threshold_and_small_margin(lake):
    zoo = ModelZoo.from_settings(lake.settings)
    zoo.check("clip")
    texts = zoo.load("clip").embed_texts([f"a photo of a {t}" for t in KNOWN]).astype(np.float64)
    rng = np.random.default_rng(0)
    images, vectors = [], []
    for product_id, wanted in CASES.items():
        mean = np.linalg.lstsq(texts, np.array(wanted), rcond=None)[0]  # texts @ mean = wanted
        # Two references whose mean is `mean`: they differ along a direction the texts do not see.
        spread = rng.normal(size=mean.shape)
        spread -= np.linalg.lstsq(texts, texts @ spread, rcond=None)[0]
        for n, vector in enumerate((mean + spread, mean - spread)):
            images.append((f"{product_id}-{n}", product_id))
            vectors.append(vector.astype(np.float32).tolist())
    ids, products = zip(*images)
    lake.upsert_rows("product_images", _rows("product_images", image_id=ids, product_id=products, role="reference"))
    lake.upsert_rows("embeddings", _rows("embeddings", image_id=ids, backbone=zoo.name("clip"), role="clip",
                                         variant="full", mask_method="", vector=vectors))
    failures = []
    rows = {r[0]: r for r in _zero_shot(lake, zoo, list(CASES), KNOWN, failures)}
    assert rows["confident"][1:4] == ("mug", "clip_zero_shot", pytest.approx(0.5, abs=1e-4))
    assert rows["lamp-ish"][1] == "lamp"
    assert rows["faint"][1] == rows["close"][1] == UNKNOWN
    reasons = {product_id: reason for product_id, code, reason in failures if code == "unknown_type"}
    assert set(reasons) == {"faint", "close"}
    assert "scored 0.150 (minimum 0.2)" in reasons["faint"]
    assert "0.005 ahead of the next (minimum 0.01)" in reasons["close"]
