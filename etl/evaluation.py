"""Evaluation: the paper's Table 2 per evaluation, arm, dataset and product, with the human pass
rates and their correlation with the metric aggregate (appendix A.3). The questions and ratings
live in etl/ratings.py, the rating package people fill in in etl/rating_package.py.

An evaluation is a pinned plan (etl/plans.py): the same products, prompts, seeds and generation
settings for every arm, each arm's adapter version frozen. Each arm is measured on exactly the
planned images, selection `all`; ours is also measured on the images its ranking of those
images kept, selection `ranked`, and the ranking gain (pass rate of the kept images / pass rate
of all - 1, the paper's +30.9%) follows. An evaluation with a planned image missing in any arm
has no figures (`recontext evaluations` says what is missing): arms are never compared on
unequal sets. On-demand generations (`recontext imagine`) are never evaluated.

An image's verdict needs `evaluation.raters_per_image` raters (NULL until then). Under the
default `evaluation.pass_rule = "all_questions"` (the paper: "a series of 8 questions all needed
to pass and we took a majority vote over 3 raters") a rater passes an image when all eight
answers are yes, and the image passes when a majority of its raters pass it; "per_question"
passes it when every question has a yes from a majority. The per-product pass rate is the
fraction of rated products with at least one passing image. Every row says whether its ratings
came from people or from synthetic raters (`ratings_source`), the training settings of its arm,
and whether a version it evaluates was promoted after results of the product were seen
(`selected_after_results`): figures from synthetic ratings say nothing about quality.

    SELECT * FROM evaluation_metrics WHERE product_id = '(all)' ORDER BY evaluation_id, dataset, arm, selection
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd

from etl import tracking
from core.errors import UserError
from etl.lakehouse import Lakehouse
from etl.plans import describe_training, pin, pinned, planned_images, status
from etl.ratings import QUESTIONS
from etl.step import CHAMPIONS, Step
from core.tables import TABLES, sql_list, sql_literal
from core.vocabulary import EVALUATED, aggregate_score

ALL = "(all)"
# SQL: ours, the baseline, the zero-shot arm, then any other arm by name
ARM_ORDER = (f"CASE arm WHEN '{tracking.OURS}' THEN 0 WHEN '{tracking.BASELINE}' THEN 1 "
             f"WHEN '{tracking.ZERO_SHOT}' THEN 2 ELSE 3 END, arm")
PASS_RULES = ("all_questions", "per_question")
SELECTIONS = ("all", "ranked")


# --- arithmetic (pure pandas/numpy; the tests check it against hand-made tables and scipy) ---

def verdicts(ratings: pd.DataFrame, raters_needed: int, rule: str = "all_questions") -> pd.DataFrame:
    """ratings (rater, image_id, question, answer[, source]) -> image_id, raters, passed,
    failed_questions, ratings_source. An unanswered question counts as not yes. `passed` is None
    below `raters_needed` raters. failed_questions: questions without a yes from a majority."""
    if rule not in PASS_RULES:
        raise UserError(f"evaluation.pass_rule must be one of {', '.join(PASS_RULES)}, not {rule!r}")
    rows = []
    for image_id, image in ratings.groupby("image_id"):
        raters = image.rater.nunique()
        yes = image[image.answer == "yes"]
        failed = [q for q in QUESTIONS if 2 * int(yes.groupby("question").rater.nunique().get(q, 0)) <= raters]
        if rule == "per_question":
            passed = not failed
        else:  # a rater passes the image when every question is a yes
            passing_raters = int((yes.groupby("rater").question.nunique() == len(QUESTIONS)).sum())
            passed = 2 * passing_raters > raters
        sources = set(image.source) if "source" in image else {"human"}
        rows.append({"image_id": image_id, "raters": raters, "passed": None if raters < raters_needed else passed,
                     "failed_questions": ",".join(failed) if raters >= raters_needed else None,
                     "ratings_source": sources.pop() if len(sources) == 1 else "mixed"})
    return pd.DataFrame(rows, columns=["image_id", "raters", "passed", "failed_questions", "ratings_source"])


def pearson(x, y) -> float | None:
    """Pearson correlation; None when it is undefined (fewer than 2 points or a constant side)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def summarize(images: pd.DataFrame) -> dict:
    """One evaluation_metrics row's values from its images (metric columns, score, passed[,
    ratings_source]); the Pearson is over every rated image given."""
    rated = images[images.passed.notna()]
    passed = rated.passed.astype(bool)
    per_product = rated.assign(passed=passed).groupby("product_id").passed.any()
    sources = set(rated.ratings_source.dropna()) if "ratings_source" in rated else set()

    def mean(column):
        value = images[column].astype(float).mean()
        return None if np.isnan(value) else float(value)

    return {"products": int(images.product_id.nunique()), "images": len(images),
            **{m: mean(m) for m in [*EVALUATED, "score"]}, "rated_images": len(rated),
            "image_pass_rate": float(passed.mean()) if len(rated) else None,
            "product_pass_rate": float(per_product.mean()) if len(per_product) else None,
            "pearson_score_pass": pearson(rated.score, passed) if len(rated) else None,
            "ratings_source": (sources.pop() if len(sources) == 1 else "mixed") if sources else None,
            "training": describe_training(images.drop_duplicates("product_id").training) if "training" in images
            else None,
            "selected_after_results": bool(images.selected_after_results.any())
            if "selected_after_results" in images else None}


def evaluation_rows(images: pd.DataFrame) -> pd.DataFrame:
    """Per arm, selection and dataset: one '(all)' row and one row per product. `images` has a
    `kept` column: selection 'all' takes every image, 'ranked' the kept ones of a ranked arm."""
    if "kept" not in images:
        images = images.assign(kept=False)
    rows = []
    for (arm, dataset), group in images.groupby(["arm", "dataset"]):
        selections = [("all", group)] + ([("ranked", group[group.kept.astype(bool)])]
                                         if group.kept.astype(bool).any() else [])
        for selection, chosen in selections:
            key = {"arm": arm, "selection": selection, "dataset": dataset}
            rows.append({**key, "product_id": ALL, **summarize(chosen)})
            rows += [{**key, "product_id": product_id, **summarize(product)}
                     for product_id, product in chosen.groupby("product_id")]
    table = pd.DataFrame(rows, columns=TABLES["evaluation_metrics"].data_columns)
    every = table[table.selection == "all"].set_index(["arm", "dataset", "product_id"]).image_pass_rate
    for index, row in table[table.selection == "ranked"].iterrows():
        base = every.get((row.arm, row.dataset, row.product_id))
        if row.image_pass_rate is not None and not pd.isna(row.image_pass_rate) and base:
            table.loc[index, "ranking_gain"] = row.image_pass_rate / base - 1
    return table


# --- the evaluate stage ---

def evaluated_images(lake: Lakehouse, plans: pd.DataFrame | None = None) -> pd.DataFrame:
    """The planned images of complete evaluations (or of the plan rows given), one row per
    evaluation, arm and planned slot, with its dataset, prompt, the arm's training settings and
    metrics (no image bytes)."""
    if plans is None:
        plans = pinned(lake)
        states = status(lake, plans)
        plans = plans[plans.evaluation_id.isin(states[states.complete.astype(bool)].evaluation_id)]
    slots = planned_images(lake, plans)
    slots = slots[slots.image_id.notna()]
    if slots.empty:
        return pd.DataFrame(columns=["evaluation_id", "arm", "dataset", "product_id", "image_id", "prompt", *EVALUATED])
    metrics = ", ".join(f"m.{c}" for c in EVALUATED)
    scored = lake.spark.sql(
        f"""SELECT m.image_id, m.product_id, p.source AS dataset, {metrics}
            FROM image_metrics m JOIN products p ON p.product_id = m.product_id
            WHERE m.image_id IN ({sql_list(sorted(set(slots.image_id)))})""").toPandas()
    columns = ["evaluation_id", "arm", "product_id", "prompt_id", "seed", "image_id", "prompt", "adapter_version",
               "training", "scoring"]
    # One order whatever the engine returns: the same images give bit-identical means.
    return (slots[columns].merge(scored, on=["image_id", "product_id"])
            .sort_values(["evaluation_id", "arm", "product_id", "prompt_id", "seed"]).reset_index(drop=True))


def selected_after_results(lake: Lakehouse, plans: pd.DataFrame) -> set[tuple[str, str]]:
    """(evaluation_id, product_id) pairs whose figures were selected after seeing results: an
    adapter version the evaluation pinned for the product was promoted (`recontext promote`) while
    another evaluation of the product already existed."""
    promoted = lake.spark.sql("SELECT product_id, arm, model_version, after_evaluations FROM promotions "
                              "WHERE after_evaluations <> ''").toPandas()
    flagged = set()
    for row in promoted.itertuples():
        seen = set(row.after_evaluations.split(","))
        using = plans[(plans.product_id == row.product_id) & (plans.arm == row.arm)
                      & (plans.adapter_version == row.model_version) & ~plans.evaluation_id.isin(seen)]
        flagged |= {(e, row.product_id) for e in using.evaluation_id}
    return flagged


def promote(lake: Lakehouse, product_id: str, version: str, arm: str) -> list[str]:
    """Make `version` the arm's champion and record it (`recontext promote`, the review console);
    returns the product's evaluations that existed then (see selected_after_results)."""
    tracking.promote(lake.settings, product_id, version, arm)
    return record_promotion(lake, product_id, arm, version)


def record_promotion(lake: Lakehouse, product_id: str, arm: str, version: str) -> list[str]:
    """Record a promotion with the evaluations of the product that existed then; returns them."""
    existing = sorted(r["evaluation_id"] for r in lake.spark.sql(
        f"SELECT DISTINCT evaluation_id FROM evaluation_plans WHERE product_id = {sql_literal(product_id)}").collect())
    lake.upsert_rows("promotions", pd.DataFrame([{"product_id": product_id, "arm": arm, "model_version": str(version),
                                                  "after_evaluations": ",".join(existing)}]))
    return existing


def run_evaluation(lake: Lakehouse, zoo=None) -> dict[str, int]:
    """Pin the current plan as an evaluation (if new), then compute Table 2 for every complete
    evaluation, each with the scoring settings it was pinned with; incomplete ones get no rows."""
    from etl.ranking import configured_ranker, rank_generations  # etl.ranker imports this module

    settings = lake.settings
    written = {"evaluation_plans": pin(lake)[1]}
    images = evaluated_images(lake)
    if images.empty:
        return {**written, "evaluation_metrics": 0}
    flagged = selected_after_results(lake, pinned(lake, sorted(set(images.evaluation_id))))
    images["selected_after_results"] = [(e, p) in flagged for e, p in zip(images.evaluation_id, images.product_id)]
    ratings = lake.spark.sql("SELECT rater, image_id, question, answer, source FROM human_ratings").toPandas()
    tables, rated = [], []
    for evaluation, own in images.groupby("evaluation_id"):
        scoring = json.loads(own.scoring.iloc[0])
        generation = dataclasses.replace(settings.generation, **scoring["generation"])
        own = own.assign(score=aggregate_score(own, generation.rank_weights))
        judged = verdicts(ratings, scoring["raters_per_image"], scoring["pass_rule"])
        own = own.merge(judged, on="image_id", how="left")
        ours = own[own.arm == tracking.OURS]
        kept = set()
        if len(ours):  # the ranking of the evaluation's own images of ours
            ranked = rank_generations(ours, generation, configured_ranker(lake, generation.rank_aggregate))
            kept = set(ranked[ranked.kept.astype(bool)].image_id)
        own["kept"] = (own.arm == tracking.OURS) & own.image_id.isin(kept)
        rated.append(own[own.raters.notna()].drop_duplicates(["arm", "product_id", "image_id"]))
        tables.append(evaluation_rows(own).assign(evaluation_id=evaluation))
    rated = pd.concat(rated, ignore_index=True)
    if not rated.empty:
        written["rated_images"] = lake.upsert_rows("rated_images", rated.astype({"raters": "int32"}))
    table = pd.concat(tables, ignore_index=True).astype({"products": "int32", "images": "int32",
                                                         "rated_images": "int32"})
    written["evaluation_metrics"] = lake.upsert_rows("evaluation_metrics", table)
    return written


def comparison(lake: Lakehouse, evaluation_id: str | None = None) -> pd.DataFrame:
    """The arms side by side per dataset and selection for one evaluation (default: the latest
    complete one), with each arm's training settings: the table `recontext evaluate` prints."""
    evaluation_id = evaluation_id or latest_complete(lake)
    if evaluation_id is None:
        return pd.DataFrame()
    columns = ", ".join(f"round({c}, 3) AS {c}" for c in [*EVALUATED, "image_pass_rate", "product_pass_rate",
                                                              "pearson_score_pass", "ranking_gain"])
    return lake.spark.sql(
        f"SELECT evaluation_id, dataset, arm, selection, products, images, {columns}, rated_images, ratings_source, "
        f"selected_after_results, training FROM evaluation_metrics WHERE product_id = '{ALL}' "
        f"AND evaluation_id = {sql_literal(evaluation_id)} ORDER BY dataset, {ARM_ORDER}, selection").toPandas()


def arm_by_product_type(lake: Lakehouse, evaluation_id: str | None = None,
                        products: list[str] | None = None) -> pd.DataFrame:
    """The decision a user makes, per product type: each arm's image pass rate over the type's
    products (selection 'all', the same planned prompts and seeds for every arm; only `products`
    when given, as a report restricted to them), its training device seconds per product, and the
    arm that passes more often (ties: the cheaper arm, listed first). Empty until an evaluation
    is complete and rated."""
    from etl.prompt_bank import resolved_types

    evaluation_id = evaluation_id or latest_complete(lake)
    if evaluation_id is None:
        return pd.DataFrame()
    images = lake.spark.sql(f"""SELECT r.arm, r.product_id, r.passed, r.ratings_source FROM rated_images r
                                WHERE r.evaluation_id = {sql_literal(evaluation_id)}""").toPandas()
    if products is not None:
        images = images[images.product_id.isin(products)]
    if images.empty:
        return pd.DataFrame()
    types = dict(resolved_types(lake).toPandas().itertuples(index=False))
    plans = pinned(lake, [evaluation_id]).assign(product_type=lambda f: f.product_id.map(types).fillna(UNTYPED))
    images["product_type"] = images.product_id.map(types).fillna(UNTYPED)  # no product left out
    rows = []
    for product_type, group in images.groupby("product_type"):
        rates = group.groupby("arm").passed.mean()
        own = plans[plans.product_type == product_type]
        seconds = {arm: _train_seconds(runs.training) for arm, runs in own.groupby("arm")}
        best = min(rates.index, key=lambda arm: (-rates[arm], seconds.get(arm) or 0.0, arm))
        rows.append({"product_type": product_type, "products": int(group.product_id.nunique()),
                     **{f"{arm}_pass_rate": round(float(rate), 3) for arm, rate in rates.items()},
                     **{f"{arm}_train_s_per_product": seconds.get(arm) for arm in rates.index},
                     "passes_more_often": best, "ratings_source": ",".join(sorted(set(group.ratings_source)))})
    return pd.DataFrame(rows)


UNTYPED = "(untyped)"


def _train_seconds(training: pd.Series) -> float | None:
    """Mean training device seconds per product from an arm's plan rows (0 for the zero-shot arm)."""
    values = [json.loads(t).get("train_seconds") for t in training.dropna().unique()]
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 1) if values else None


def latest_complete(lake: Lakehouse) -> str | None:
    """The most recently pinned evaluation that has figures."""
    states = status(lake)
    computed = {r["evaluation_id"] for r in lake.spark.sql(
        "SELECT DISTINCT evaluation_id FROM evaluation_metrics").collect()}
    done = states[states.complete.astype(bool) & states.evaluation_id.isin(computed)]
    return done.evaluation_id.iloc[-1] if len(done) else None


EVALUATE = Step("evaluate", run_evaluation,
                reads=("generations", "image_metrics", "products", "human_ratings", "adapters", "prompt_bank",
                       "product_classes", "evaluation_plans", "promotions", "product_images", CHAMPIONS),
                writes=("evaluation_plans", "rated_images", "evaluation_metrics"),
                description="pin the evaluation plan; Table 2 per evaluation, arm, selection, dataset and product")
