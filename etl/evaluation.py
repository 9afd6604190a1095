"""Evaluation: the paper's Table 2 per arm, dataset and product, with the human pass rates and
their correlation with the metric aggregate (appendix A.3). The questions and ratings live in
etl/ratings.py, the rating package people fill in in etl/rating_package.py.

Both arms are measured alike: on the generations of their current `@champion` adapter version
(the same approved prompts x seeds, so the same image count), selection `all`; ours is also
measured on the images its ranking kept, selection `ranked`, and the ranking gain (pass rate of
the kept images / pass rate of all - 1, the paper's +30.9%) follows. Generations of older
versions stay in `generations` for lineage and are not evaluated, nor are on-demand generations
(`recontext imagine`: other prompts, other counts per product).

An image's verdict needs `evaluation.raters_per_image` raters (NULL until then). Under the
default `evaluation.pass_rule = "all_questions"` (the paper: "a series of 8 questions all needed
to pass and we took a majority vote over 3 raters") a rater passes an image when all eight
answers are yes, and the image passes when a majority of its raters pass it; "per_question"
passes it when every question has a yes from a majority. The per-product pass rate is the
fraction of rated products with at least one passing image. Every row says whether its ratings
came from people or from synthetic raters (`ratings_source`): figures from synthetic ratings
say nothing about quality.

    SELECT * FROM evaluation_metrics WHERE product_id = '(all)' ORDER BY dataset, arm, selection
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from etl import tracking
from etl.errors import UserError
from etl.lakehouse import Lakehouse
from etl.ratings import QUESTIONS
from etl.step import CHAMPIONS, Step
from etl.tables import TABLES
from etl.vocabulary import EVALUATED, aggregate_score, from_bank

ALL = "(all)"
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
            "ratings_source": (sources.pop() if len(sources) == 1 else "mixed") if sources else None}


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

def evaluated_images(lake: Lakehouse) -> pd.DataFrame:
    """Every prompt-bank generation of each product's current champion version per arm, with its arm,
    dataset, whether the ranking kept it, and its metrics (no image bytes)."""
    metrics = ", ".join(f"m.{c}" for c in EVALUATED)
    images = lake.spark.sql(
        f"""SELECT g.arm, p.source AS dataset, g.product_id, g.image_id, g.prompt, g.adapter_version,
                   coalesce(r.kept, false) AS kept, {metrics}
            FROM generations g
            JOIN image_metrics m ON m.image_id = g.image_id AND m.product_id = g.product_id
            JOIN products p ON p.product_id = g.product_id
            LEFT JOIN ranked_generations r ON r.image_id = g.image_id AND r.product_id = g.product_id
                                           AND g.arm = 'ours'
            WHERE {from_bank("g")}""").toPandas()
    images = images.drop_duplicates(["arm", "product_id", "image_id"])
    if images.empty:
        return images
    champions = tracking.champion_versions(lake.settings, zip(images.product_id, images.arm))
    current = [champions.get((p, a)) == v for p, a, v in zip(images.product_id, images.arm, images.adapter_version)]
    return images[current].reset_index(drop=True)


def run_evaluation(lake: Lakehouse, zoo=None) -> dict[str, int]:
    settings = lake.settings
    images = evaluated_images(lake)
    if images.empty:
        return {"evaluation_metrics": 0}
    images["score"] = aggregate_score(images, settings.generation.rank_weights)
    ratings = lake.spark.sql("SELECT rater, image_id, question, answer, source FROM human_ratings").toPandas()
    judged = verdicts(ratings, settings.evaluation.raters_per_image, settings.evaluation.pass_rule)
    images = images.merge(judged, on="image_id", how="left")
    written = {}
    rated = images[images.raters.notna()]
    if not rated.empty:
        written["rated_images"] = lake.upsert_rows("rated_images", rated.astype({"raters": "int32"}))
    table = evaluation_rows(images).astype({"products": "int32", "images": "int32", "rated_images": "int32"})
    written["evaluation_metrics"] = lake.upsert_rows("evaluation_metrics", table)
    return written


def comparison(lake: Lakehouse) -> pd.DataFrame:
    """Ours against the baseline per dataset and selection: the table `recontext evaluate` prints."""
    columns = ", ".join(f"round({c}, 3) AS {c}" for c in [*EVALUATED, "image_pass_rate", "product_pass_rate",
                                                              "pearson_score_pass", "ranking_gain"])
    return lake.spark.sql(
        f"SELECT dataset, arm, selection, products, images, {columns}, rated_images, ratings_source "
        f"FROM evaluation_metrics WHERE product_id = '{ALL}' ORDER BY dataset, arm DESC, selection").toPandas()


EVALUATE = Step("evaluate", run_evaluation,
                reads=("generations", "image_metrics", "products", "ranked_generations", "human_ratings", CHAMPIONS),
                writes=("rated_images", "evaluation_metrics"),
                description="Table 2 metrics per arm, selection, dataset and product; pass rates; ranking gain")
