"""Augmentation on tiny models: kinds, lineage, kept pixels, the 2:1 ratio, idempotence,
incrementality and determinism. Prompts come from a reviewed CSV (no LLM needed)."""

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable
from PIL import Image, ImageFilter

from etl.augment import _run_tasks, _task
from core.settings import Settings
from etl.ingest import ingest
from etl.lakehouse import Lakehouse
from jobs.steps import run_steps
from etl.prompt_bank import import_csv
from core.tables import TABLES
from jobs.graph import steps_for
from sample_images import encode, product_shot, write_files
from udfs.augmentation import resized_inputs, run_task
from udfs.imaging import encode_png
from udfs.zoo import ModelZoo

AUGMENTATION = steps_for("augment")

SCENES = ["a marble kitchen counter in soft light", "a wooden cafe table by a window",
          "a picnic blanket in a green park", "a rejected scene that must never be used"]


def _catalog(root, products):
    for product_id, seeds in products.items():
        write_files(root / product_id, {f"{s}.png": encode(product_shot(160, 120, seed=s), "PNG") for s in seeds})
        (root / product_id / "product.json").write_text(json.dumps({"product_type": "mug"}))


@pytest.fixture(scope="module")
def augmented(tmp_path_factory, tiny_models):
    home = tmp_path_factory.mktemp("augment")
    lake = Lakehouse(Settings.load(home, models={"tiny_dir": str(tiny_models)}))
    _catalog(home / "catalog", {"mug-a": [1, 2], "mug-b": [3]})
    ingest(lake, home / "catalog")
    prompts = pd.DataFrame({"product_type": "mug", "purpose": "scene", "text": SCENES,
                            "status": ["approved", "approved", "pending", "rejected"]})
    prompts = pd.concat([prompts, pd.DataFrame({"product_type": ["mug"], "purpose": ["target"],
                                                "text": ["a mug of tea on a desk"], "status": ["approved"]})])
    prompts.to_csv(home / "prompts.csv", index=False)
    import_csv(lake, home / "prompts.csv")
    first = run_steps(lake, AUGMENTATION, progress=lambda _: None)
    return lake, home, first


def table(lake, name):
    return DeltaTable(lake.location(name)).to_pandas()


def test_every_kind_with_lineage(augmented):
    lake = augmented[0]
    synthetic = table(lake, "synthetic_images")
    assert set(synthetic.kind) == {"novel_view", "outpaint", "negative", "counterfactual"}
    known = set(table(lake, "product_images").image_id) | set(synthetic.image_id)
    derived = synthetic[synthetic.kind != "negative"]
    assert derived.parent_image_id.isin(known).all() and synthetic[synthetic.kind == "negative"].parent_image_id.isna().all()
    assert (synthetic.seed >= 0).all() and synthetic.task_key.str.len().eq(64).all()
    assert set(synthetic.model) == {"tiny-image2video", "tiny-inpaint", "tiny-text2img"}
    for row in synthetic.itertuples():
        image = Image.open(io.BytesIO(row.image))
        assert image.size == (row.width, row.height) and json.loads(row.parameters)["resolution"] == 64
    views = synthetic[synthetic.kind == "novel_view"]
    assert views.groupby("parent_image_id").size().eq(2).all()  # two frames kept per reference clip


def test_only_approved_scenes_are_used(augmented):
    lake = augmented[0]
    bank = table(lake, "prompt_bank").set_index("prompt_id")
    outpaints = table(lake, "synthetic_images").query("kind == 'outpaint'")
    assert len(outpaints) and (bank.loc[outpaints.prompt_id, "status"] == "approved").all()
    assert set(outpaints.prompt_id) == set(bank[(bank.status == "approved") & (bank.purpose == "scene")].index)
    assert outpaints.prompt.str.startswith("a photo of a mug, ").all()


def test_outpaints_keep_product_pixels_and_counterfactuals_keep_the_background(augmented):
    lake = augmented[0]
    synthetic = table(lake, "synthetic_images")
    sources = {**dict(zip(table(lake, "product_images").image_id, table(lake, "product_images").image)),
               **dict(zip(synthetic.image_id, synthetic.image))}
    masks = table(lake, "masks").query("method == 'u2netp'").set_index("image_id")["mask"]
    checked = {"outpaint": 0, "counterfactual": 0}
    for row in synthetic[synthetic.kind.isin(list(checked))].itertuples():
        parent, mask = resized_inputs(sources[row.parent_image_id], masks[row.parent_image_id], 64)
        product = np.asarray(mask) >= 128
        out, before = np.asarray(Image.open(io.BytesIO(row.image)).convert("RGB")), np.asarray(parent)
        if row.kind == "outpaint":
            assert product.any() and np.array_equal(out[product], before[product])
            assert not np.array_equal(out[~product], before[~product])  # the background was repainted
        else:
            grown = np.asarray(mask.filter(ImageFilter.MaxFilter(5))) >= 128
            assert np.array_equal(out[~grown], before[~grown])
        checked[row.kind] += 1
    assert all(checked.values())


def test_positive_to_negative_ratio_per_product(augmented):
    synthetic = table(augmented[0], "synthetic_images")
    references = table(augmented[0], "product_images").groupby("product_id").size()
    rejected = table(augmented[0], "quarantine").query("reason_code == 'counterfactual_unchanged'")
    for product_id, group in synthetic.groupby("product_id"):
        positives = references[product_id] + group.kind.isin(["novel_view", "outpaint"]).sum()
        negatives = group.kind.isin(["negative", "counterfactual"]).sum()
        # planned at the ratio; a counterfactual that came out as its parent is rejected, not kept
        assert negatives + (rejected.product_id == product_id).sum() == math.ceil(positives / 2), product_id


def test_counterfactuals_come_from_references_too(augmented):
    synthetic = table(augmented[0], "synthetic_images")
    references = set(table(augmented[0], "product_images").image_id)
    parents = set(synthetic[synthetic.kind == "counterfactual"].parent_image_id)
    assert parents & references and parents - references  # references and outpainted scenes


def test_a_counterfactual_that_leaves_the_product_unchanged_is_rejected(tiny_models):
    from udfs.augmentation import Rejected

    zoo = ModelZoo.from_settings(Settings.load(tiny_models / "unused", models={"tiny_dir": str(tiny_models)}))
    zoo.check("inpaint")
    params = {"resolution": 64, "steps": 2, "guidance_scale": 5.0}
    image = encode(product_shot(seed=5), "PNG")
    empty = encode_png(Image.new("L", (160, 120), 0))  # a parent whose mask found no product
    task = {"kind": "counterfactual", "prompt": "a photo of a different mug", "seed": 1,
            "parameters": json.dumps(params), "image": image, "mask": empty}
    with pytest.raises(Rejected, match="counterfactual_unchanged: the parent's product mask is empty"):
        run_task(zoo, task)
    with pytest.raises(Rejected, match=r"changed by [\d.]+ on average \(minimum 1000.0\)"):
        run_task(zoo, {**task, "mask": encode_png(Image.new("L", (160, 120), 255)),
                       "parameters": json.dumps({**params, "min_change": 1000.0})})


def test_captions_masks_and_metrics_cover_synthetic_images(augmented):
    lake = augmented[0]
    synthetic = table(lake, "synthetic_images")
    assert set(synthetic.image_id) <= set(table(lake, "captions").image_id)
    assert set(synthetic.image_id) <= set(table(lake, "masks").image_id)
    metrics = table(lake, "image_metrics").set_index("image_id")
    outpaint = metrics.loc[synthetic[synthetic.kind == "outpaint"].image_id]
    assert (outpaint.text_source == "prompt").all() and outpaint.iou_against.str.startswith("parent:").all()
    assert outpaint.clip_i.notna().all() and outpaint.mask_iou.notna().all()


def test_rerun_writes_nothing(augmented):
    lake = augmented[0]
    versions = {t: DeltaTable(lake.location(t)).version() for t in TABLES}
    again = run_steps(lake, AUGMENTATION, progress=lambda _: None)
    assert all(n == 0 for stage in again.values() for n in stage.values()), again
    assert {t: DeltaTable(lake.location(t)).version() for t in TABLES} == versions


def test_same_task_same_bytes(augmented):
    lake = augmented[0]
    zoo = ModelZoo.from_settings(lake.settings)
    synthetic = table(lake, "synthetic_images")
    sources = {**dict(zip(table(lake, "product_images").image_id, table(lake, "product_images").image)),
               **dict(zip(synthetic.image_id, synthetic.image))}
    masks = table(lake, "masks").query("method == 'u2netp'").set_index("image_id")["mask"]
    for kind in ("outpaint", "novel_view", "negative"):
        row = synthetic[synthetic.kind == kind].iloc[0]
        params = json.loads(row.parameters)
        for extra in ("frame", "size"):
            params.pop(extra, None)
        task = {"kind": kind, "prompt": row.prompt, "seed": row.seed, "parameters": json.dumps(params),
                "image": sources.get(row.parent_image_id), "mask": masks.get(row.parent_image_id)}
        images = run_task(zoo, task)
        assert row.image in [encode_png(image) for image, _ in images], kind


def test_new_product_is_augmented_alone(augmented):
    lake, home, _ = augmented
    before = table(lake, "synthetic_images")
    _catalog(home / "catalog", {"mug-c": [9]})
    ingest(lake, home / "catalog")
    run_steps(lake, AUGMENTATION, progress=lambda _: None)
    after = table(lake, "synthetic_images")
    added = after[~after.task_key.isin(before.task_key)]
    assert set(added.product_id) == {"mug-c"} and len(added) > 0
    kept = after[after.task_key.isin(before.task_key)].sort_values("task_key").reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, before.sort_values("task_key").reset_index(drop=True))


def test_a_failed_generation_is_quarantined_and_the_rest_kept(lake):
    zoo = ModelZoo.from_settings(lake.settings)
    params = {"resolution": 64, "steps": 2, "guidance_scale": 5.0}
    tasks = [_task("outpaint", "p", "no-such-image", None, "a photo of a mug", "tiny-inpaint", 1, params),
             _task("negative", "p", None, None, "a photo of a mug", "tiny-text2img", 2, params)]
    written = _run_tasks(lake, zoo, tasks)
    assert written == {"synthetic_images": 1, "quarantine": 1}
    row = table(lake, "quarantine").iloc[0]
    assert (row.stage, row.product_id, row.reason_code) == ("augment", "p", "generation_failed")
    assert "parent image is missing" in row.reason


def test_a_mirrored_reference_is_made_only_for_the_types_that_ask_for_it(augmented):
    """The mirror kind is off by default: none under the defaults, none for a type not listed in
    augment.kinds_for_types; for a listed type, every reference once, flipped pixel for pixel."""
    import dataclasses

    from etl.augment import NOVEL_VIEWS

    lake, _, _ = augmented
    assert "mirror" not in set(table(lake, "synthetic_images").kind)

    def with_mirrors_for(types):
        augment = dataclasses.replace(lake.settings.augment, kinds_for_types={"mirror": types})
        scoped = Lakehouse(dataclasses.replace(lake.settings, augment=augment), spark=lake.spark)
        return run_steps(scoped, ["novel_views"], progress=lambda _: None)["novel_views"]

    assert with_mirrors_for(["bottle"])["synthetic_images"] == 0
    references = table(lake, "product_images")
    assert with_mirrors_for(["mug"])["synthetic_images"] == len(references)
    mirrors = table(lake, "synthetic_images").query("kind == 'mirror'").set_index("parent_image_id")
    assert sorted(mirrors.index) == sorted(references.image_id)
    for reference in references.itertuples():
        flipped = np.asarray(Image.open(io.BytesIO(reference.image)).convert("RGB"))[:, ::-1]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(mirrors.loc[reference.image_id, "image"]))), flipped)
    assert with_mirrors_for(["mug"])["synthetic_images"] == 0  # done once
    # Its step reads the product types it needs and loads no model for it; its filter quota defaults from its row.
    assert {"products", "product_classes"} <= set(NOVEL_VIEWS.reads) and NOVEL_VIEWS.roles == ("image2video",)
    assert Settings.load(lake.settings.home).training.positives_per_kind == {"novel_view": 12, "outpaint": 12,
                                                                             "mirror": 4}
