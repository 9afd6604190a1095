"""The zero-shot arm's generation: the base family's reference pipeline conditioned on product
photos, with no adapter; refused, naming why, for a family without one; `--arms` parsing."""

import numpy as np
import pytest

from core.settings import Settings
from core.errors import UserError
from jobs.cli import _with_arms
from sample_images import product_shot
from test_lora import tiny_zoo
from udfs.diffusion import render


def pixels(image):
    return np.asarray(image, dtype=float)


def test_reference_photos_condition_the_image(tiny_models):
    pipeline = tiny_zoo(tiny_models, "flux2-klein").load("text2img")
    prompt, photos = ["a photo of a mug, on a kitchen table"], [product_shot(96, 96, seed=i) for i in range(3)]

    def made(references):
        return pixels(render(pipeline, prompt, [0], 2, 4.0, 64, 1, references=references)[0])

    with_photos = made(photos[:2])
    assert np.array_equal(with_photos, made(photos[:2]))  # seeded: the same photos, the same image
    assert np.abs(with_photos - made(photos[1:])).mean() > 0.01  # other photos, another image
    assert np.abs(with_photos - made(None)).mean() > 0.01  # the photos are used at all


def test_a_family_without_a_reference_pipeline_is_refused(tiny_models):
    pipeline = tiny_zoo(tiny_models, "sd").load("text2img")
    with pytest.raises(UserError, match="takes no reference photos.*flux2-klein"):
        render(pipeline, ["a mug"], [0], 2, 4.0, 64, 1, references=[product_shot(96, 96)])


def test_arms_choose_the_compared_arms(tmp_path):
    settings = Settings.load(tmp_path)
    chosen = _with_arms(settings, "ours, zero_shot").evaluation
    assert (chosen.baseline, chosen.zero_shot) == (False, True)
    chosen = _with_arms(settings, "ours,baseline,zero_shot").evaluation
    assert (chosen.baseline, chosen.zero_shot) == (True, True)
    for wrong in ("baseline,zero_shot", "ours,dreambooth"):
        with pytest.raises(UserError, match="name ours"):
            _with_arms(settings, wrong)
