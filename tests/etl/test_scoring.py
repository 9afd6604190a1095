"""Masks, captions, embeddings and metrics on the sample catalog, checked against numpy on the
stored tables read independently with delta-rs."""

import io

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable
from PIL import Image

from core.settings import Settings
from etl.ingest import ingest
from etl.lakehouse import Lakehouse
from etl.masks import run_masks
from etl.metrics import cosine, mask_iou, score_product
from etl.sample_catalog import write_sample_catalog
from jobs.steps import run_scoring
from core.tables import TABLES
from sample_images import encode


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_models):
    home = tmp_path_factory.mktemp("scored")
    lake = Lakehouse(Settings.load(home, models={"tiny_dir": str(tiny_models)}))
    catalog = write_sample_catalog(home / "catalog")
    ingest(lake, catalog)
    first = run_scoring(lake, progress=lambda _: None)
    return lake, catalog, first


def delta(lake, name) -> pd.DataFrame:
    return DeltaTable(lake.location(name)).to_pandas()


def test_every_image_gets_masks_captions_embeddings_metrics(scored):
    lake, _, first = scored
    assert first["masks"]["masks"] == 5 + 1  # u2netp for all five, alpha for the gift box
    assert first["captions"]["captions"] == 5
    # clip, dino x full, segmented; clip of the background
    assert first["embeddings"]["embeddings"] == 5 * 2 * 2 + 5
    assert first["metrics"]["image_metrics"] == 5
    metrics = delta(lake, "image_metrics")
    assert set(metrics.clip_backbone) == {"tiny-clip"} and set(metrics.dino_backbone) == {"tiny-dino"}
    assert set(metrics.mask_method) == {"u2netp"}
    assert metrics.clip_t.notna().all() and metrics.seg_clip_t.notna().all()


def test_metrics_match_numpy_on_the_stored_vectors(scored):
    lake = scored[0]
    emb = delta(lake, "embeddings")
    vec = {(r.image_id, r.role, r.variant): np.asarray(r.vector, dtype=np.float64) for r in emb.itertuples()}
    text = {r.text: np.asarray(r.vector, dtype=np.float64) for r in delta(lake, "text_embeddings").itertuples()}
    captions = delta(lake, "captions").set_index("image_id").caption
    metrics = delta(lake, "image_metrics").set_index("image_id")

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    bike = sorted(metrics[metrics.product_id == "motorcycle"].index)
    assert len(bike) == 2
    for me, other in (bike, bike[::-1]):
        row = metrics.loc[me]
        assert row.n_references == 1  # leave-one-out: compared with the other view
        assert np.isclose(row.clip_i, cos(vec[me, "clip", "full"], vec[other, "clip", "full"]), atol=1e-6)
        assert np.isclose(row.dino_i, cos(vec[me, "dino", "full"], vec[other, "dino", "full"]), atol=1e-6)
        assert np.isclose(row.seg_clip_i, cos(vec[me, "clip", "segmented"], vec[other, "clip", "segmented"]),
                          atol=1e-6)
        assert np.isclose(row.seg_dino_i, cos(vec[me, "dino", "segmented"], vec[other, "dino", "segmented"]),
                          atol=1e-6)
    for image_id, row in metrics.iterrows():
        t = text[captions[image_id]]
        assert row.text == captions[image_id] and row.text_source == "caption"
        assert np.isclose(row.clip_t, cos(vec[image_id, "clip", "full"], t), atol=1e-6)
        assert np.isclose(row.seg_clip_t, cos(vec[image_id, "clip", "segmented"], t), atol=1e-6)
        assert np.isclose(row.bg_clip_t, cos(vec[image_id, "clip", "background"], t), atol=1e-6)


def test_the_background_variant_masks_the_product_out(scored):
    """The background vector is CLIP of the photo with the product's (dilated) mask filled with
    the mean colour of the rest: rebuilt here with numpy from the stored mask and image."""
    from udfs.zoo import ModelZoo

    lake = scored[0]
    images = delta(lake, "product_images").drop_duplicates("image_id").set_index("image_id")
    masks = delta(lake, "masks").query("method == 'u2netp'").set_index("image_id")
    emb = delta(lake, "embeddings").query("variant == 'background'").set_index("image_id")
    image_id = sorted(emb.index)[0]
    photo = np.asarray(Image.open(io.BytesIO(images.loc[image_id, "image"])).convert("RGB")).astype(np.float64)
    mask = np.asarray(Image.open(io.BytesIO(masks.loc[image_id, "mask"]))) >= 128
    grow = max(1, round(0.02 * max(mask.shape)))
    product = mask.copy()
    for _ in range(grow):  # a cross-shaped dilation, one pixel per step
        grown = product.copy()
        grown[1:] |= product[:-1]; grown[:-1] |= product[1:]; grown[:, 1:] |= product[:, :-1]; grown[:, :-1] |= product[:, 1:]
        product = grown
    photo[product] = np.round(photo[~product].mean(axis=0))
    clip = ModelZoo.from_settings(lake.settings).load("clip")
    expected = clip.embed_images([Image.fromarray(photo.astype(np.uint8))])[0]
    assert emb.loc[image_id, "mask_method"] == "u2netp"
    assert np.allclose(np.asarray(emb.loc[image_id, "vector"]), expected, atol=1e-5)


def test_single_reference_products_get_null_image_similarity(scored):
    metrics = delta(scored[0], "image_metrics").set_index("product_id")
    for product in ("coffee-cup", "rocket", "gift-box"):
        assert metrics.loc[product, "n_references"] == 0 and pd.isna(metrics.loc[product, "clip_i"])


def test_gift_box_mask_matches_its_alpha_channel(scored):
    lake = scored[0]
    metrics = delta(lake, "image_metrics").set_index("product_id")
    assert metrics.loc["gift-box", "iou_against"] == "alpha"
    assert metrics.loc["gift-box", "mask_iou"] >= 0.9
    masks = delta(lake, "masks")
    gift = masks[masks.image_id == metrics.loc["gift-box", "image_id"]].set_index("method")
    u2, alpha = (np.asarray(Image.open(io.BytesIO(gift.loc[m, "mask"]))) >= 128 for m in ("u2netp", "alpha"))
    assert np.isclose(metrics.loc["gift-box", "mask_iou"], (u2 & alpha).sum() / (u2 | alpha).sum())
    assert list(gift.loc["u2netp", "bbox"]) == [int(v) for v in _box(u2)]


def _box(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_rerun_adds_nothing_and_recomputes_nothing(scored):
    lake = scored[0]
    versions = {t: DeltaTable(lake.location(t)).version() for t in TABLES}
    again = run_scoring(lake, progress=lambda _: None)
    assert all(n == 0 for stage in again.values() for n in stage.values()), again
    assert {t: DeltaTable(lake.location(t)).version() for t in TABLES} == versions


def test_a_new_view_rescores_only_its_product(scored):
    lake, catalog, _ = scored
    before = delta(lake, "image_metrics").set_index("image_id")
    flipped = Image.open(catalog / "motorcycle" / "left.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    (catalog / "motorcycle" / "flipped.png").write_bytes(encode(flipped, "PNG"))
    ingest(lake, catalog)
    written = run_scoring(lake, progress=lambda _: None)
    assert written["masks"]["masks"] == 1 and written["embeddings"]["embeddings"] == 5
    assert written["metrics"]["image_metrics"] == 3  # the motorcycle's three views, nothing else
    after = delta(lake, "image_metrics").set_index("image_id")
    others = before[before.product_id != "motorcycle"].index
    pd.testing.assert_frame_equal(after.loc[others].sort_index(), before.loc[others].sort_index())
    assert (after[after.product_id == "motorcycle"].n_references == 2).all()


def test_undecodable_stored_image_is_quarantined_and_the_rest_scored(lake):
    rows = lake.spark.createDataFrame(pd.DataFrame({
        "image_id": ["bad", "good"], "product_id": ["p", "p"], "role": ["reference"] * 2,
        "image": [b"\x89PNG corrupted on disk", _object_png()], "format": ["PNG"] * 2,
        "width": [96, 96], "height": [96, 96], "has_alpha": [False, False], "original_format": ["PNG"] * 2,
        "normalization": ["", ""], "source_uri": ["x", "y"], "ingested_at": [pd.Timestamp.now()] * 2,
    }))
    lake.upsert("product_images", rows)
    written = run_masks(lake, _zoo(lake))
    assert written == {"masks": 1, "quarantine": 1}
    quarantined = delta(lake, "quarantine").iloc[0]
    assert (quarantined.stage, quarantined.product_id, quarantined.source_uri) == ("masks", "p", "image:bad")
    assert quarantined.reason_code == "model_error" and "cannot identify image" in quarantined.reason


def _object_png():
    from sample_images import product_shot

    return encode(product_shot(96, 96), "PNG")


def _zoo(lake):
    from udfs.zoo import ModelZoo

    return ModelZoo.from_settings(lake.settings)


def test_metric_definitions_on_constructed_vectors():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.6, 0.8, 0.0])
    assert np.isclose(cosine(a[None], a[None])[0, 0], 1.0)
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:6] = True
    assert mask_iou(mask, mask) == 1.0 and mask_iou(mask, ~mask) == 0.0
    rows = pd.DataFrame({
        "image_id": ["ref1", "ref2", "gen"], "product_id": ["p"] * 3,
        "kind": ["reference", "reference", "generated"], "is_reference": [True, True, False],
        "clip_full_vector": [a, b, a], "dino_full_vector": [a, b, a], "clip_segmented_vector": [a, b, None],
        "dino_segmented_vector": [a, b, None], "clip_background_vector": [None, None, a],
        "text": [None, None, "x"], "text_source": ["caption"] * 3,
        "text_vector": [None, None, b], "mask": [None, None, None], "source_mask": [None, None, None],
        "iou_against": [None, None, None],
    })
    out = score_product(rows, {"clip_backbone": "c", "dino_backbone": "d", "mask_method": "m"}).set_index("image_id")
    assert np.isclose(out.loc["ref1", "clip_i"], 0.6)  # leave-one-out: only ref2
    assert np.isclose(out.loc["gen", "clip_i"], (1.0 + 0.6) / 2)  # identical to ref1 counts 1.0
    assert out.loc["gen", "n_references"] == 2 and np.isclose(out.loc["gen", "clip_t"], 0.6)
    assert pd.isna(out.loc["gen", "seg_clip_i"]) and pd.isna(out.loc["ref1", "clip_t"])
    assert np.isclose(out.loc["gen", "bg_clip_t"], 0.6) and pd.isna(out.loc["ref1", "bg_clip_t"])


def test_a_raised_metric_version_recomputes_stored_rows(scored, monkeypatch):
    """A metric whose definition changes (its row's version raised) recomputes every stored row
    once, and each row then names the versions it was computed by."""
    import dataclasses

    import core.vocabulary as vocabulary
    import etl.metrics

    lake = scored[0]
    raised = tuple(dataclasses.replace(m, version=2) if m.name == "bg_clip_t" else m for m in vocabulary.METRICS)
    versions = ",".join(f"{m.name}={m.version}" for m in sorted(raised, key=lambda m: m.name))
    monkeypatch.setattr(etl.metrics, "METRICS", raised)
    monkeypatch.setattr(etl.metrics, "METRIC_VERSIONS", versions)
    stored = len(delta(lake, "image_metrics"))
    assert run_scoring(lake, progress=lambda _: None)["metrics"]["image_metrics"] == stored
    assert set(delta(lake, "image_metrics").metric_versions) == {versions} and "bg_clip_t=2" in versions
    assert run_scoring(lake, progress=lambda _: None)["metrics"]["image_metrics"] == 0


def test_new_weights_rescore_everything_and_rows_name_them(scored, tmp_path):
    """Swap the CLIP model (a second tiny one at another path): embeddings are recomputed with
    it, and every image_metrics row then names it; nothing keeps the old scores silently."""
    from udfs.clip import build_tiny

    lake = scored[0]
    build_tiny(tmp_path / "clip-b", seed=7)
    swapped = Lakehouse(Settings.load(lake.settings.home, models={"tiny_dir": lake.settings.models.tiny_dir,
                                                                  "clip": {"path": str(tmp_path / "clip-b")}}),
                        spark=lake.spark)
    written = run_scoring(swapped, progress=lambda _: None)
    metrics = delta(swapped, "image_metrics")
    assert written["metrics"]["image_metrics"] == len(metrics)  # every row recomputed
    assert set(metrics.clip_backbone) == {"clip-b"} and metrics.models.str.startswith("clip-b@").all()
    assert set(delta(swapped, "embeddings").query("role == 'clip'").backbone) >= {"clip-b"}
    assert run_scoring(swapped, progress=lambda _: None)["metrics"]["image_metrics"] == 0  # and then stable
