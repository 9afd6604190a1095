"""Generation with the champion adapter from the registry, and post-finetuning ranking."""

import json

import pandas as pd
import pytest
from deltalake import DeltaTable

from etl.config import GenerationSettings, Settings
from etl.ingest import ingest
from etl.lakehouse import Lakehouse
from etl.pipeline import GENERATION, SCORING, run_stages
from etl.prompt_bank import import_csv
from sample_images import encode, product_shot, write_files
from training import tracking
from training.generate import rank_generations
from training.train_job import run_training
from udfs.zoo import ModelZoo


def test_ranking_order_threshold_and_top_n():
    scores = pd.DataFrame({
        "product_id": ["a"] * 5 + ["b"] * 2, "image_id": ["a1", "a2", "a3", "a4", "a5", "b1", "b2"],
        "adapter_version": "1", "clip_t": [0.3, 0.1, 0.2, 0.25, -2.0, 0.0, 0.5],
        "clip_i": [0.5, 0.5, 0.5, 0.5, 0.5, 0.9, 0.1], "dino_i": [0.4, 0.4, 0.4, 0.4, 0.4, 0.2, 0.2]})
    ranked = rank_generations(scores, GenerationSettings(min_score=0.0, keep_top=2)).set_index("image_id")
    assert ranked.loc["a5", "reason"] == "score -1.100 below 0.0" and pd.isna(ranked.loc["a5", "rank"])
    assert list(ranked.loc[["a1", "a4", "a3", "a2"], "rank"]) == [1, 2, 3, 4]  # sum of the three metrics
    assert list(ranked[ranked.kept].index) == ["a1", "a4", "b1", "b2"]
    assert ranked.loc["a3", "reason"] == "over the top 2 (rank 3)"
    assert ranked.loc["a1", "score"] == pytest.approx(1.2)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, tiny_models):
    home = tmp_path_factory.mktemp("generate")
    training = {"token_candidates": 1, "steps": 4, "checkpoint_every": 2, "validate_every": 100,
                "validation_images": 1, "learning_rate": 0.05}
    settings = Settings.load(home, models={"tiny_dir": str(tiny_models)}, training=training,
                             generation={"prompts_per_product": 1, "seeds_per_prompt": 2, "steps": 3})
    lake = Lakehouse(settings)
    write_files(home / "catalog" / "mug-a", {"1.png": encode(product_shot(seed=1), "PNG")})
    (home / "catalog" / "mug-a" / "product.json").write_text(json.dumps({"product_type": "mug"}))
    ingest(lake, home / "catalog")
    pd.DataFrame({"product_type": ["mug"], "purpose": ["target"], "text": ["on a desk"],
                  "status": ["approved"]}).to_csv(home / "p.csv", index=False)
    import_csv(lake, home / "p.csv")
    zoo = ModelZoo.from_settings(settings)
    run_stages(lake, [*SCORING, "training_set"], zoo, progress=lambda _: None)
    run_training(lake, zoo, progress=lambda _: None)
    # A second version: the same training set with another config.
    lake2 = Lakehouse(Settings.load(home, models={"tiny_dir": str(tiny_models)}, training={**training, "steps": 6},
                                    generation={"prompts_per_product": 1, "seeds_per_prompt": 2, "steps": 3}))
    run_training(lake2, zoo, progress=lambda _: None)
    return lake2, zoo


def test_generation_follows_the_champion(two_versions):
    lake, zoo = two_versions
    assert run_stages(lake, ["generate"], zoo, progress=lambda _: None)["generate"]["generations"] == 0  # no champion
    tracking.promote(lake.settings, "mug-a", "1")
    run_stages(lake, GENERATION, zoo, progress=lambda _: None)
    first = DeltaTable(lake.location("generations")).to_pandas()
    assert set(first.adapter_version) == {"1"} and len(first) == 2
    assert first.generation_prompt.str.startswith("a photo of ").all()
    assert (first.prompt == "a photo of a mug, on a desk").all() and set(first.seed) == {0, 1}
    tracking.promote(lake.settings, "mug-a", "2")
    written = run_stages(lake, GENERATION, zoo, progress=lambda _: None)
    assert written["generate"]["generations"] == 2
    after = DeltaTable(lake.location("generations")).to_pandas()
    second = after[after.adapter_version == "2"]
    assert len(second) == 2 and not set(second.image_id) & set(first.image_id)
    ranked = DeltaTable(lake.location("ranked_generations")).to_pandas()
    assert set(ranked.image_id) == set(after.image_id) and ranked.kept.sum() == 4
    metrics = DeltaTable(lake.location("image_metrics")).to_pandas().set_index("image_id")
    assert (metrics.loc[list(after.image_id), "kind"] == "generated").all()
    assert (metrics.loc[list(after.image_id), "text_source"] == "prompt").all()
    assert run_stages(lake, GENERATION, zoo, progress=lambda _: None)["generate"] == {"generations": 0,
                                                                                    "quarantine": 0}
