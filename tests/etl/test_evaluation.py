"""Human-evaluation arithmetic on hand-made tables, checked by hand and against scipy."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr

from etl.evaluation import evaluation_rows, pearson, summarize, verdicts
from etl.ratings import QUESTIONS


def _ratings(answers: dict[str, list[dict[str, str]]]) -> pd.DataFrame:
    """{image: [rater answers {question: answer}, ...]} -> rows; unspecified questions are yes."""
    return pd.DataFrame([{"rater": f"r{n}", "image_id": image, "question": q, "answer": given.get(q, "yes")}
                         for image, raters in answers.items() for n, given in enumerate(raters)
                         for q in QUESTIONS if given.get(q) != "skip"])


def test_per_question_rule_passes_when_every_question_has_a_yes_majority():
    table = verdicts(_ratings({
        "all-yes": [{}, {}, {}],
        "one-dissent-each": [{"safety": "no"}, {"placement": "maybe"}, {}],  # 2 of 3 yes everywhere
        "two-say-maybe": [{"logo_fidelity": "maybe"}, {"logo_fidelity": "unclear"}, {}],
        "one-skips": [{"business_use": "skip"}, {"business_use": "no"}, {}],  # 1 yes of 3 raters
        "two-raters": [{}, {}],
    }), raters_needed=3, rule="per_question").set_index("image_id")
    assert table.loc["all-yes", "passed"] and table.loc["one-dissent-each", "passed"]
    assert not table.loc["two-say-maybe", "passed"]
    assert table.loc["two-say-maybe", "failed_questions"] == "logo_fidelity"
    assert not table.loc["one-skips", "passed"] and table.loc["one-skips", "failed_questions"] == "business_use"
    assert table.loc["two-raters", "passed"] is None and table.loc["two-raters", "raters"] == 2


def test_the_papers_rule_needs_a_majority_of_raters_answering_all_yes():
    """The paper: all 8 questions must pass for a rater, majority over 3 raters. On an image where
    each of two raters doubts one different question, every question still has a yes majority."""
    ratings = _ratings({"one-dissent-each": [{"safety": "no"}, {"placement": "maybe"}, {}],
                        "one-rater-doubts": [{"safety": "no", "placement": "no"}, {}, {}],
                        "all-yes": [{}, {}, {}]}).assign(source="human")
    default = verdicts(ratings, raters_needed=3).set_index("image_id")  # rule="all_questions"
    per_question = verdicts(ratings, raters_needed=3, rule="per_question").set_index("image_id")
    assert not default.loc["one-dissent-each", "passed"] and per_question.loc["one-dissent-each", "passed"]
    assert default.loc["one-rater-doubts", "passed"] and default.loc["all-yes", "passed"]  # 2 of 3 raters pass
    assert set(default.ratings_source) == {"human"}
    with pytest.raises(Exception, match="pass_rule must be one of"):
        verdicts(ratings, raters_needed=3, rule="mean")


def test_selections_and_the_ranking_gain():
    """'all' takes every image of an arm, 'ranked' the kept ones; gain = pass(ranked)/pass(all) - 1."""
    images = pd.DataFrame({
        "arm": ["ours"] * 4 + ["baseline"] * 4, "dataset": "folder:x", "product_id": "a",
        "image_id": list("12345678"), "kept": [True, True, False, False] + [False] * 4,
        "passed": [True, False, False, False, True, False, False, False], "score": 0.0,
        "ratings_source": ["synthetic"] * 4 + ["human"] * 4,
        **{m: 0.5 for m in ["clip_i", "clip_t", "dino_i", "seg_clip_i", "seg_clip_t", "seg_dino_i"]}})
    table = evaluation_rows(images).set_index(["arm", "selection", "product_id"])
    assert table.loc[("ours", "all", "(all)"), "images"] == table.loc[("baseline", "all", "(all)"), "images"] == 4
    assert table.loc[("ours", "ranked", "(all)"), "images"] == 2 and ("baseline", "ranked", "(all)") not in table.index
    assert table.loc[("ours", "ranked", "(all)"), "ranking_gain"] == pytest.approx((1 / 2) / (1 / 4) - 1)
    assert pd.isna(table.loc[("ours", "all", "(all)"), "ranking_gain"])
    assert table.loc[("ours", "all", "(all)"), "ratings_source"] == "synthetic"
    assert table.loc[("baseline", "all", "(all)"), "ratings_source"] == "human"


def test_pass_rates_per_image_and_per_product():
    images = pd.DataFrame({
        "arm": "ours", "dataset": "folder:x", "product_id": ["a", "a", "a", "b", "b", "c"],
        "image_id": list("123456"), "passed": [True, False, False, False, False, None],
        "score": [1.0, 0.5, 0.2, 0.4, 0.1, 0.3], **{m: 0.5 for m in ["clip_i", "clip_t", "dino_i", "seg_clip_i",
                                                                       "seg_clip_t", "seg_dino_i"]}})
    row = summarize(images)
    assert row["rated_images"] == 5 and row["image_pass_rate"] == pytest.approx(1 / 5)
    assert row["product_pass_rate"] == pytest.approx(1 / 2)  # a passes; b does not; c is not rated
    assert row["products"] == 3 and row["images"] == 6
    table = evaluation_rows(images).set_index("product_id")
    assert list(table.index) == ["(all)", "a", "b", "c"] and set(table.selection) == {"all"}
    assert table.loc["a", "image_pass_rate"] == pytest.approx(1 / 3) and table.loc["b", "image_pass_rate"] == 0
    assert pd.isna(table.loc["c", "image_pass_rate"]) and table.loc["c", "rated_images"] == 0


def test_pearson_matches_scipy():
    rng = np.random.default_rng(3)
    score = rng.normal(size=40)
    passed = score + rng.normal(scale=1.0, size=40) > 0
    assert pearson(score, passed) == pytest.approx(pearsonr(score, passed.astype(float)).statistic, abs=1e-12)
    assert pearson([1, 2, 3], [1, 1, 1]) is None and pearson([1.0], [1.0]) is None


def test_krippendorffs_alpha_matches_the_krippendorff_package():
    """Nominal alpha over (image, question) units with missing answers, against the `krippendorff`
    package's reliability-matrix computation; perfect agreement is 1, none to decide is None."""
    import krippendorff

    from etl.ratings import ANSWERS, krippendorff_alpha

    rng = np.random.default_rng(3)
    rows = [{"rater": f"r{r}", "image_id": f"i{i}", "question": q,
             "answer": ANSWERS[0] if rng.random() < 0.6 else str(rng.choice(ANSWERS))}
            for i in range(7) for q in QUESTIONS for r in range(4) if rng.random() < 0.75]
    ratings = pd.DataFrame(rows)
    units = sorted(set(zip(ratings.image_id, ratings.question)))
    raters = sorted(set(ratings.rater))
    matrix = np.full((len(raters), len(units)), np.nan)
    for r in ratings.itertuples():
        matrix[raters.index(r.rater), units.index((r.image_id, r.question))] = ANSWERS.index(r.answer)
    expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal")
    assert krippendorff_alpha(ratings) == pytest.approx(expected, abs=1e-12)
    agreeing = ratings.assign(answer=[ANSWERS[len(i + q) % 2] for i, q in zip(ratings.image_id, ratings.question)])
    assert krippendorff_alpha(agreeing) == pytest.approx(1.0)
    assert krippendorff_alpha(ratings[ratings.rater == "r0"]) is None  # one rater: no pairs
