"""Generation with the champion adapter from the registry, post-finetuning ranking, and pinned
evaluations."""

import json
import re

import pandas as pd
import pytest
from deltalake import DeltaTable

from core.settings import GenerationSettings, Settings
from etl.ingest import ingest
from etl.lakehouse import Lakehouse
from jobs.steps import SCORING, run_steps
from jobs.graph import steps_for
from etl.evaluation import record_promotion
from etl.plans import status
from core.tables import TABLES
from etl.prompt_bank import import_csv
from etl.step import REGISTERED_MODELS
from sample_images import encode, product_shot, write_files
from etl import tracking
from etl.ranking import rank_generations
from training.train_job import run_training
from udfs.zoo import ModelZoo

PLAN_KEY = TABLES["evaluation_plans"].key
TRAINING = {"token_candidates": 1, "steps": 4, "checkpoint_every": 2, "validate_every": 100, "validation_images": 1,
            "learning_rate": 0.05}
GENERATION = {"prompts_per_product": 1, "seeds_per_prompt": 2, "steps": 3}


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
    settings = Settings.load(home, models={"tiny_dir": str(tiny_models)}, training=TRAINING, generation=GENERATION)
    lake = Lakehouse(settings)
    write_files(home / "catalog" / "mug-a", {"1.png": encode(product_shot(seed=1), "PNG")})
    (home / "catalog" / "mug-a" / "product.json").write_text(json.dumps({"product_type": "mug"}))
    ingest(lake, home / "catalog")
    pd.DataFrame({"product_type": ["mug"], "purpose": ["target"], "text": ["on a desk"],
                  "status": ["approved"]}).to_csv(home / "p.csv", index=False)
    import_csv(lake, home / "p.csv")
    zoo = ModelZoo.from_settings(settings)
    run_steps(lake, [*SCORING, "training_set"], zoo, progress=lambda _: None)
    run_training(lake, zoo, progress=lambda _: None)
    # A second version: the same training set with another config.
    lake2 = Lakehouse(Settings.load(home, models={"tiny_dir": str(tiny_models)}, training={**TRAINING, "steps": 6},
                                    generation=GENERATION))
    run_training(lake2, zoo, progress=lambda _: None)
    return lake2, zoo


def test_generation_follows_the_champion(two_versions):
    lake, zoo = two_versions
    assert run_steps(lake, ["generate"], zoo, progress=lambda _: None)["generate"]["generations"] == 0  # no champion
    tracking.promote(lake.settings, "mug-a", "1")
    run_steps(lake, steps_for("generate"), zoo, progress=lambda _: None)
    first = DeltaTable(lake.location("generations")).to_pandas()
    assert set(first.adapter_version) == {"1"} and len(first) == 2
    assert first.generation_prompt.str.startswith("a photo of ").all()
    assert (first.prompt == "a photo of a mug, on a desk").all() and set(first.seed) == {0, 1}
    tracking.promote(lake.settings, "mug-a", "2")
    written = run_steps(lake, steps_for("generate"), zoo, progress=lambda _: None)
    assert written["generate"]["generations"] == 2
    after = DeltaTable(lake.location("generations")).to_pandas()
    second = after[after.adapter_version == "2"]
    assert len(second) == 2 and not set(second.image_id) & set(first.image_id)
    ranked = DeltaTable(lake.location("ranked_generations")).to_pandas().set_index("image_id")
    # Only the champion version's generations compete; version 1's stay for lineage, never kept.
    assert set(ranked.index) == set(after.image_id) and set(ranked[ranked.kept].index) == set(second.image_id)
    assert (ranked.loc[list(first.image_id), "reason"] == "not the champion version (v2); kept for lineage").all()
    metrics = DeltaTable(lake.location("image_metrics")).to_pandas().set_index("image_id")
    assert (metrics.loc[list(after.image_id), "kind"] == "generated").all()
    assert (metrics.loc[list(after.image_id), "text_source"] == "prompt").all()
    assert metrics.loc[list(after.image_id), "clip_t"].notna().all()  # the prompts were embedded
    assert run_steps(lake, steps_for("generate"), zoo, progress=lambda _: None)["generate"] == {"generations": 0,
                                                                                    "quarantine": 0}


def test_evaluation_compares_ours_with_the_baseline_and_uses_human_ratings(two_versions, tmp_path):
    from mlflow import MlflowClient
    from scipy.stats import pearsonr

    from etl.rating_package import export_package
    from etl.ratings import QUESTIONS, import_ratings

    lake, zoo = two_versions  # version 2 of mug-a is the champion (previous test)
    assert run_steps(lake, ["train_baseline"], zoo, progress=lambda _: None)["train_baseline"]["adapters"] == 1
    # One champion policy for both arms: without auto_promote the baseline waits for a promotion too.
    assert "champion" not in MlflowClient().get_registered_model("recontext-mug-a-baseline").aliases
    run_steps(lake, ["evaluate"], zoo, progress=lambda _: None)
    (first,) = status(lake).itertuples()
    assert not first.complete and any(m.startswith("baseline mug-a: no @champion") for m in first.missing)
    assert DeltaTable(lake.location("evaluation_metrics")).to_pandas().empty  # never computed on unequal sets
    tracking.promote(lake.settings, "mug-a", "1", arm="baseline")
    assert record_promotion(lake, "mug-a", "baseline", "1") == [first.evaluation_id]
    written = run_steps(lake, steps_for("evaluate"), zoo, progress=lambda _: None)
    assert written["train_baseline"]["adapters"] == 0 and written["fit_ranker"] == {REGISTERED_MODELS: 0}
    adapters = DeltaTable(lake.location("adapters")).to_pandas()
    baseline = adapters[adapters.arm == "baseline"].iloc[0]
    assert baseline.model_name == "recontext-mug-a-baseline" and baseline.images == 1  # the one reference
    # The baseline is DreamBooth + LoRA (Rank=64) with the prior-preservation loss: its own settings.
    params = MlflowClient().get_run(baseline.run_id).data.params
    assert (params["rank"], params["lora_alpha"], params["baseline.prior_preservation"]) == ("64", "64", "True")
    assert params["steps"] == str(lake.settings.baseline.steps)
    generations = DeltaTable(lake.location("generations")).to_pandas()
    ours, base = generations[generations.adapter_version == "2"], generations[generations.arm == "baseline"]
    assert sorted(zip(base.prompt_id, base.seed)) == sorted(zip(ours.prompt_id, ours.seed))  # same prompts, seeds
    ranked = DeltaTable(lake.location("ranked_generations")).to_pandas()
    assert set(ranked.arm) == {"ours"}  # the baseline is not ranked

    # Both arms on the pinned plan (same prompts x seeds, same count); ours also on the ranked
    # (kept) subset. The evaluation with the baseline's champion is a new one: the first, pinned
    # without it, stays incomplete.
    states = status(lake).set_index("evaluation_id")
    assert len(states) == 2 and states.loc[first.evaluation_id, "complete"] == False  # noqa: E712
    (evaluation,) = states[states.complete].index
    assert json.loads(states.loc[evaluation, "planned"]) == {"ours": 2, "baseline": 2}
    table = DeltaTable(lake.location("evaluation_metrics")).to_pandas()
    assert set(table.evaluation_id) == {evaluation}
    table = table.set_index(["arm", "selection", "product_id"])
    metrics = DeltaTable(lake.location("image_metrics")).to_pandas().set_index("image_id")
    assert set(table.index.get_level_values("selection")) == {"all", "ranked"}
    assert table.loc[("baseline", "all", "(all)"), "images"] == table.loc[("ours", "all", "(all)"), "images"] == 2
    assert table.loc[("baseline", "all", "(all)"), "clip_i"] == pytest.approx(
        metrics.loc[list(base.image_id), "clip_i"].mean())
    assert table.loc[("ours", "ranked", "(all)"), "images"] == ranked[ranked.adapter_version == "2"].kept.sum()
    assert ("baseline", "ranked", "(all)") not in table.index
    # Each arm's training settings beside its figures, from its adapter's MLflow run.
    assert re.fullmatch(re.escape(
        f"{lake.settings.baseline.steps} steps, rank 64, alpha 64, lr {lake.settings.baseline.learning_rate}, "
        f"prior weight 1.0 x {lake.settings.baseline.class_images} class images, 1 examples, ")
        + r"[0-9.]+ device s per product \(training run wall time\)", table.loc[("baseline", "all", "(all)"), "training"])
    assert table.loc[("ours", "all", "(all)"), "training"].startswith("6 steps, rank 4, alpha 4, lr 0.05, prior none")
    # The baseline's version was promoted after the first evaluation of mug-a existed: recorded, marked.
    assert table.selected_after_results.all()

    evaluated = set(ours.image_id) | set(base.image_id)  # version 1's images are lineage, not evaluated
    index, images = export_package(lake, tmp_path / "package")
    assert images == 4 and len(pd.read_csv(tmp_path / "package" / "ratings_template.csv")) == 4 * len(QUESTIONS)
    assert all((tmp_path / "package" / "img" / f"{i}.png").exists() for i in evaluated)
    assert "baseline" not in index.read_text() and "kept" not in index.read_text()  # blind to arm and selection

    # Three raters: the baseline images and one of ours fail product fidelity by majority.
    failing = set(base.image_id) | {sorted(ours.image_id)[0]}
    rows = [{"rater": f"r{r}", "image_id": i, "question": q,
             "answer": "no" if (i in failing and q == "product_fidelity" and r < 2) else "yes"}
            for i in generations.image_id for r in range(3) for q in QUESTIONS]
    rows += [{"rater": "r0", "image_id": "not-an-image", "question": "safety", "answer": "yes"},
             {"rater": "r0", "image_id": generations.image_id.iloc[0], "question": "safety", "answer": "perhaps"}]
    pd.DataFrame(rows).to_csv(tmp_path / "ratings.csv", index=False)
    assert import_ratings(lake, tmp_path / "ratings.csv") == (len(generations) * 3 * len(QUESTIONS), 2)
    reasons = DeltaTable(lake.location("quarantine")).to_pandas().query("stage == 'ratings'")
    assert sorted(reasons.reason_code) == ["bad_answer", "unknown_image"]  # the valid earlier answer stands
    assert import_ratings(lake, tmp_path / "ratings.csv")[0] == 0  # a re-import writes nothing

    lake.settings.evaluation.__dict__.update(ranker_min_images=4)  # frozen dataclass; tiny test data
    written = run_steps(lake, ["evaluate", "fit_ranker"], zoo, progress=lambda _: None)
    assert written["fit_ranker"] == {REGISTERED_MODELS: 1}
    rated = DeltaTable(lake.location("rated_images")).to_pandas().set_index("image_id")
    assert set(rated.index) == evaluated and set(rated[~rated.passed].index) == failing
    assert set(rated.ratings_source) == {"human"}
    table = DeltaTable(lake.location("evaluation_metrics")).to_pandas().set_index(["arm", "selection", "product_id"])
    assert table.loc[("baseline", "all", "(all)"), "image_pass_rate"] == 0.0
    assert table.loc[("ours", "all", "(all)"), "image_pass_rate"] == pytest.approx(1 / 2)
    assert table.loc[("ours", "all", "(all)"), "product_pass_rate"] == 1.0
    assert table.loc[("ours", "all", "(all)"), "ratings_source"] == "human"
    ours_rated = rated[rated.arm == "ours"]  # Pearson over every rated image, kept or not
    assert table.loc[("ours", "all", "(all)"), "pearson_score_pass"] == pytest.approx(
        pearsonr(ours_rated.score, ours_rated.passed.astype(float)).statistic)
    kept = ours_rated[ours_rated.kept]
    assert table.loc[("ours", "ranked", "(all)"), "ranking_gain"] == pytest.approx(
        kept.passed.mean() / ours_rated.passed.mean() - 1)

    # Synthetic raters flip the failing image of ours: the refit ranker stays @candidate, and every
    # figure says its ratings are mixed.
    before = MlflowClient().get_registered_model("recontext-ranker").aliases.get("champion")
    pd.DataFrame([{"rater": f"s{r}", "image_id": i, "question": q, "answer": "yes"}
                  for i in ours.image_id for r in range(3) for q in QUESTIONS]).to_csv(tmp_path / "s.csv", index=False)
    assert import_ratings(lake, tmp_path / "s.csv", source="synthetic")[0] == 2 * 3 * len(QUESTIONS)
    written = run_steps(lake, ["evaluate", "fit_ranker"], zoo, progress=lambda _: None)
    assert written["fit_ranker"] == {REGISTERED_MODELS: 1}
    assert MlflowClient().get_registered_model("recontext-ranker").aliases.get("champion") == before
    table = DeltaTable(lake.location("evaluation_metrics")).to_pandas().set_index(["arm", "selection", "product_id"])
    assert table.loc[("ours", "all", "(all)"), "ratings_source"] == "mixed"
    assert table.loc[("baseline", "all", "(all)"), "ratings_source"] == "human"

    # The learned ranker ranks when asked to, if it became the champion; else a clear error.
    lake.settings.generation.__dict__.update(rank_aggregate="learned")
    try:
        has_champion = bool(MlflowClient().get_registered_model("recontext-ranker").aliases.get("champion"))
        if has_champion:
            run_steps(lake, ["rank"], zoo, progress=lambda _: None)
            ranked = DeltaTable(lake.location("ranked_generations")).to_pandas()
            assert ranked.ranked_by.str.startswith("recontext-ranker v").all()
            assert ranked.score.between(0, 1).all()
        else:
            with pytest.raises(Exception, match="no @champion"):
                run_steps(lake, ["rank"], zoo, progress=lambda _: None)
    finally:
        lake.settings.generation.__dict__.update(rank_aggregate="sum")


def test_a_retrained_arm_and_a_changed_bank_make_a_new_paired_evaluation(two_versions, tmp_path):
    """Re-train the baseline, change the prompt bank, evaluate again: the new evaluation pairs both
    arms on its own plan, the old one is unchanged, and no Table 2 row compares different prompts."""
    from sample_images import recontext

    lake, zoo = two_versions  # evaluated, rated (previous test)
    plans_before = DeltaTable(lake.location("evaluation_plans")).to_pandas()
    metrics_before = DeltaTable(lake.location("evaluation_metrics")).to_pandas()
    (old,) = set(metrics_before.evaluation_id)
    retrained = Lakehouse(Settings.load(lake.settings.home, models={"tiny_dir": lake.settings.models.tiny_dir},
                                        training={**TRAINING, "steps": 6}, baseline={"steps": 3},
                                        generation=GENERATION), spark=lake.spark)
    assert run_steps(retrained, ["train_baseline"], zoo, progress=lambda _: None)["train_baseline"]["adapters"] == 1
    tracking.promote(retrained.settings, "mug-a", "2", arm="baseline")
    record_promotion(retrained, "mug-a", "baseline", "2")
    bank = DeltaTable(lake.location("prompt_bank")).to_pandas()
    (desk,) = bank[bank.text == "on a desk"].prompt_id
    pd.DataFrame({"prompt_id": [desk, ""], "product_type": ["mug", "mug"], "purpose": ["target", "target"],
                  "text": ["on a desk", "on a sunlit kitchen shelf"], "status": ["rejected", "approved"],
                  "reason": ["replaced", ""]}).to_csv(tmp_path / "bank.csv", index=False)
    import_csv(retrained, tmp_path / "bank.csv")
    run_steps(retrained, steps_for("evaluate"), zoo, progress=lambda _: None)

    plans = DeltaTable(lake.location("evaluation_plans")).to_pandas()
    (new,) = set(plans.evaluation_id) - set(plans_before.evaluation_id)
    pinned = plans[plans.evaluation_id == new]
    slots = {arm: sorted(zip(group.prompt_id, group.seed)) for arm, group in pinned.groupby("arm")}
    assert slots["ours"] == slots["baseline"] and {p for p, _ in slots["ours"]} != {desk}
    assert dict(zip(pinned.arm, pinned.adapter_version)) == {"ours": "2", "baseline": "2"}
    # The old evaluation is as it was: its plan and its figures.
    kept_plan = plans[plans.evaluation_id.isin(plans_before.evaluation_id)].sort_values(list(PLAN_KEY))
    assert kept_plan.reset_index(drop=True).equals(plans_before.sort_values(list(PLAN_KEY)).reset_index(drop=True))
    metrics = DeltaTable(lake.location("evaluation_metrics")).to_pandas()
    columns = [c for c in metrics.columns if c != "computed_at"]
    key = ["arm", "selection", "dataset", "product_id"]
    # (New images of the product make the metrics job recompute its image_metrics rows, which can
    # move a mean in its last bit: the same images and settings, not the same float sums.)
    now = metrics[metrics.evaluation_id == old][columns].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(now, metrics_before[columns].sort_values(key).reset_index(drop=True), rtol=1e-12)
    table = metrics[(metrics.evaluation_id == new) & (metrics.product_id == "(all)")].set_index(["arm", "selection"])
    assert table.loc[("ours", "all"), "images"] == table.loc[("baseline", "all"), "images"] == 2
    assert table.loc[("baseline", "all"), "training"].startswith("3 steps, rank 64")
    # No Table 2 row, of any evaluation, compares different prompt sets: the images behind each
    # evaluation's rows came from the same prompts and seeds in every arm.
    generations = DeltaTable(lake.location("generations")).to_pandas()
    for evaluation in set(metrics.evaluation_id):
        made = plans[plans.evaluation_id == evaluation].merge(generations[["task_key", "prompt_id", "seed"]],
                                                             on="task_key", suffixes=("", "_made"))
        made_by_arm = {a: sorted(zip(g.prompt_id_made, g.seed_made)) for a, g in made.groupby("arm")}
        assert made_by_arm["ours"] == made_by_arm["baseline"]
        images = metrics[(metrics.evaluation_id == evaluation) & (metrics.selection == "all")]
        assert images.groupby(["dataset", "product_id"]).images.nunique().eq(1).all()

    listed = recontext("evaluations", "--format", "json", home=lake.settings.home)
    assert listed.returncode == 0, listed.stderr
    by_id = {e["evaluation_id"]: e for e in json.loads(listed.stdout)}
    assert set(by_id) == set(plans.evaluation_id) and len(by_id) == 3
    assert by_id[new]["status"] == "complete" and by_id[new]["planned_images"] == {"ours": 2, "baseline": 2}
    assert by_id[new]["missing"] == []
    (incomplete,) = [e for e in by_id.values() if e["status"] == "incomplete"]
    assert incomplete["missing"][0].startswith("baseline mug-a: no @champion adapter")


def test_identical_pixels_from_two_tasks_are_one_ranked_row_whatever_the_order():
    """Two prompts (or seeds) that yield the same pixels: one row per (product, arm, image), the
    champion version's, then the lowest task key; the same choice in any input order."""
    scores = pd.DataFrame({
        "product_id": "a", "image_id": ["same", "same", "same", "other"], "task_key": ["t2", "t1", "t0", "t3"],
        "adapter_version": ["2", "2", "1", "2"], "clip_t": [0.3, 0.3, 0.3, 0.1], "clip_i": 0.5, "dino_i": 0.4})
    champions = {"a": "2"}
    first = rank_generations(scores, GenerationSettings(keep_top=1), champions=champions)
    again = rank_generations(scores.iloc[::-1], GenerationSettings(keep_top=1), champions=champions)
    assert first.equals(again) and len(first) == 2
    same = first.set_index("image_id").loc["same"]
    assert same.adapter_version == "2" and same.kept and same.arm == "ours"  # not the stale version 1's row
    # The key says so: the lakehouse refuses two rows per key, and arms never share one.
    assert TABLES["ranked_generations"].key == ("product_id", "arm", "image_id")
    assert {"arm", "evaluation_id"} <= set(TABLES["rated_images"].key)
    assert {"arm", "evaluation_id"} <= set(TABLES["evaluation_metrics"].key)
