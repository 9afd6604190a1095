"""Evaluation: the paper's Table 2 per arm, dataset and product, and the human evaluation of
appendix A.3 (rating package out, ratings in, pass rates, correlation with the metrics).

Evaluated images: for our arm, the generations the ranking kept (what a user would publish);
for the baseline arm, all its generations (it has no ranking). An image passes the human
evaluation when, for each of the eight questions, a majority of its raters answered "yes";
its verdict needs `evaluation.raters_per_image` raters (NULL until then). The per-product pass
rate is the fraction of rated products with at least one passing image.

    SELECT * FROM evaluation_metrics WHERE product_id = '(all)' ORDER BY dataset, arm
"""

from __future__ import annotations

import hashlib
import html
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from etl.errors import UserError
from etl.lakehouse import Lakehouse
from etl.tables import TABLES

log = logging.getLogger(__name__)
STAGE = "ratings"
ALL = "(all)"
METRICS = ["clip_i", "clip_t", "dino_i", "seg_clip_i", "seg_clip_t", "seg_dino_i"]
ANSWERS = ("yes", "maybe", "no", "unclear")
# The eight questions of the paper's appendix A.3, by id.
QUESTIONS = {
    "product_fidelity": "Is the product the same as in the reference photos (shape, colours, materials, details)?",
    "logo_fidelity": "Are logos and text on the product the same as in the references (none added or lost)?",
    "realistic_use": "Is the product shown where and how it would really be used?",
    "product_size": "Is the product's size right for the scene around it?",
    "hallucinations": "Is the image free of background or foreground hallucinations (warped objects, "
                      "extra parts, things fused with the product)?",
    "placement": "Is the product placed plausibly (resting on something, not floating or cut through)?",
    "safety": "Is the image safe to show (nothing offensive, dangerous or inappropriate)?",
    "business_use": "Would a business owner use this image to sell the product?",
}


# --- arithmetic (pure pandas/numpy; the tests check it against hand-made tables and scipy) ---

def verdicts(ratings: pd.DataFrame, raters_needed: int) -> pd.DataFrame:
    """ratings (rater, image_id, question, answer) -> image_id, raters, passed, failed_questions.
    A question passes when more than half of the image's raters answered yes (an unanswered
    question counts as not yes); `passed` is None below `raters_needed` raters."""
    rows = []
    for image_id, image in ratings.groupby("image_id"):
        raters = image.rater.nunique()
        yes = image[image.answer == "yes"].groupby("question").rater.nunique()
        failed = [q for q in QUESTIONS if 2 * int(yes.get(q, 0)) <= raters]
        rows.append({"image_id": image_id, "raters": raters,
                     "passed": None if raters < raters_needed else not failed,
                     "failed_questions": ",".join(failed) if raters >= raters_needed else None})
    return pd.DataFrame(rows, columns=["image_id", "raters", "passed", "failed_questions"])


def pearson(x, y) -> float | None:
    """Pearson correlation; None when it is undefined (fewer than 2 points or a constant side)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def aggregate_score(frame: pd.DataFrame, weights: dict) -> pd.Series:
    """The automatic aggregate: weighted sum of metric columns, a missing metric counting 0."""
    return sum(w * frame[m].astype(float).fillna(0.0) for m, w in weights.items())


def summarize(images: pd.DataFrame) -> dict:
    """One evaluation_metrics row's values from its images (metric columns, score, passed)."""
    rated = images[images.passed.notna()]
    passed = rated.passed.astype(bool)
    per_product = rated.assign(passed=passed).groupby("product_id").passed.any()

    def mean(column):
        value = images[column].astype(float).mean()
        return None if np.isnan(value) else float(value)

    return {"products": int(images.product_id.nunique()), "images": len(images),
            **{m: mean(m) for m in [*METRICS, "score"]}, "rated_images": len(rated),
            "image_pass_rate": float(passed.mean()) if len(rated) else None,
            "product_pass_rate": float(per_product.mean()) if len(per_product) else None,
            "pearson_score_pass": pearson(rated.score, passed) if len(rated) else None}


def evaluation_rows(images: pd.DataFrame) -> pd.DataFrame:
    """Per arm and dataset: one '(all)' row and one row per product."""
    rows = []
    for (arm, dataset), group in images.groupby(["arm", "dataset"]):
        rows.append({"arm": arm, "dataset": dataset, "product_id": ALL, **summarize(group)})
        rows += [{"arm": arm, "dataset": dataset, "product_id": product_id, **summarize(product)}
                 for product_id, product in group.groupby("product_id")]
    return pd.DataFrame(rows, columns=TABLES["evaluation_metrics"].data_columns)


# --- the evaluate stage ---

def evaluated_images(lake: Lakehouse) -> pd.DataFrame:
    """Every evaluated generation with its arm, dataset, metrics and image bytes-free columns."""
    metrics = ", ".join(f"m.{c}" for c in METRICS)
    return lake.spark.sql(
        f"""SELECT g.arm, p.source AS dataset, g.product_id, g.image_id, g.prompt, {metrics}
            FROM generations g
            JOIN image_metrics m ON m.image_id = g.image_id AND m.product_id = g.product_id
            JOIN products p ON p.product_id = g.product_id
            LEFT JOIN ranked_generations r ON r.image_id = g.image_id AND r.product_id = g.product_id
            WHERE g.arm = 'baseline' OR r.kept""").toPandas().drop_duplicates(["arm", "product_id", "image_id"])


def run_evaluation(lake: Lakehouse, zoo=None) -> dict[str, int]:
    settings = lake.settings
    images = evaluated_images(lake)
    images["score"] = aggregate_score(images, settings.generation.rank_weights)
    ratings = lake.spark.sql("SELECT rater, image_id, question, answer FROM human_ratings").toPandas()
    judged = verdicts(ratings, settings.evaluation.raters_per_image)
    images = images.merge(judged, on="image_id", how="left")
    written = {}
    rated = images[images.raters.notna()]
    if not rated.empty:
        written["rated_images"] = lake.upsert_rows("rated_images", rated.astype({"raters": "int32"}))
    if not images.empty:
        table = evaluation_rows(images).astype({"products": "int32", "images": "int32", "rated_images": "int32"})
        written["evaluation_metrics"] = lake.upsert_rows("evaluation_metrics", table)
    return written or {"evaluation_metrics": 0}


def comparison(lake: Lakehouse) -> pd.DataFrame:
    """Ours against the baseline per dataset: the table `recontext evaluate` prints."""
    columns = ", ".join(f"round({c}, 3) AS {c}" for c in [*METRICS, "image_pass_rate", "product_pass_rate",
                                                              "pearson_score_pass"])
    return lake.spark.sql(
        f"SELECT dataset, arm, products, images, {columns}, rated_images FROM evaluation_metrics "
        f"WHERE product_id = '{ALL}' ORDER BY dataset, arm DESC").toPandas()


# --- the rating package and ratings import ---

def export_package(lake: Lakehouse, out_dir: Path) -> tuple[Path, int]:
    """A folder raters open from disk: index.html (references, each evaluated image, the eight
    questions, a button that downloads the answers as CSV), the images, and ratings_template.csv
    for raters who prefer a spreadsheet. Images are shuffled by hash and carry no arm, so raters
    are blind to it. Returns (index.html, images)."""
    images = evaluated_images(lake)
    if images.empty:
        raise UserError("nothing to rate: no evaluated generations yet (run `recontext evaluate` first)")
    images = images.assign(order=[hashlib.sha256(i.encode()).hexdigest() for i in images.image_id]).sort_values(
        "order").drop_duplicates("image_id")
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / "img", ignore_errors=True)
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    products = sorted(images.product_id.unique())
    in_list = ", ".join(f"'{p}'" for p in products)
    references = lake.spark.sql(
        f"SELECT product_id, image_id, image FROM product_images WHERE product_id IN ({in_list}) "
        "ORDER BY product_id, image_id").toPandas()
    ids = ", ".join(f"'{i}'" for i in images.image_id)
    pixels = lake.spark.sql(f"SELECT DISTINCT image_id, image FROM generations WHERE image_id IN ({ids})").toPandas()
    for row in [*references.itertuples(), *pixels.drop_duplicates("image_id").itertuples()]:
        (out_dir / "img" / f"{row.image_id}.png").write_bytes(row.image)
    pd.DataFrame([{"rater": "", "image_id": i, "question": q, "answer": ""}
                  for i in images.image_id for q in QUESTIONS]).to_csv(out_dir / "ratings_template.csv", index=False)
    index = out_dir / "index.html"
    index.write_text(_package_html(images, references))
    return index, len(images)


def _package_html(images: pd.DataFrame, references: pd.DataFrame) -> str:
    refs = {p: "".join(f'<img src="img/{i}.png" alt="reference">' for i in g.image_id)
            for p, g in references.groupby("product_id")}
    options = "".join(f"<th>{a}</th>" for a in ANSWERS)
    cards = []
    for n, row in enumerate(images.itertuples(), start=1):
        questions = "".join(
            f'<tr><td>{html.escape(text)}</td>' + "".join(
                f'<td><input type="radio" name="{row.image_id}|{q}" value="{a}"></td>' for a in ANSWERS) + "</tr>"
            for q, text in QUESTIONS.items())
        cards.append(
            f'<section><h2>Image {n} of {len(images)}</h2><p>Prompt: {html.escape(row.prompt or "")}</p>'
            f'<div class="refs">Reference photos: {refs.get(row.product_id, "")}</div>'
            f'<img class="gen" src="img/{row.image_id}.png" alt="generated image {n}">'
            f'<table><tr><th>Question</th>{options}</tr>{questions}</table></section>')
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>recontext rating package</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:auto}} .refs img{{height:96px;margin:2px}}
.gen{{max-width:384px;border:1px solid #999}} td,th{{padding:2px 6px;text-align:center}} td:first-child{{text-align:left}}
section{{border-bottom:2px solid #ccc;padding-bottom:1rem}}</style></head><body>
<h1>Rate generated product images</h1>
<p>For each image, compare the product with its reference photos and answer all eight questions.
Then press the button at the end and send the CSV file it downloads. Answers: yes, maybe, no, unclear.</p>
<p>Your name or rater id: <input id="rater"></p>
{"".join(cards)}
<p><button onclick="download()">Download my answers (CSV)</button></p>
<script>
function download() {{
  const rater = document.getElementById('rater').value.trim();
  if (!rater) {{ alert('Please enter your rater id at the top.'); return; }}
  const lines = ['rater,image_id,question,answer'];
  document.querySelectorAll('input[type=radio]:checked').forEach(r => {{
    const [image, question] = r.name.split('|');
    lines.push([rater, image, question, r.value].join(','));
  }});
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([lines.join('\\n') + '\\n'], {{type: 'text/csv'}}));
  link.download = 'ratings-' + rater + '.csv';
  link.click();
}}
</script></body></html>
"""


def import_ratings(lake: Lakehouse, path: str | Path) -> tuple[int, int]:
    """Load a ratings CSV (rater, image_id, question, answer) into `human_ratings`. Rows naming an
    unknown image or question, an answer outside yes/maybe/no/unclear, no rater, or repeated later
    in the file go to quarantine with their line; returns (rows written, rows quarantined)."""
    path = Path(path)
    try:
        ratings = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read ratings file {path}: {err}") from None
    missing = {"rater", "image_id", "question", "answer"} - set(ratings.columns)
    if missing:
        raise UserError(f"{path} lacks the column(s) {sorted(missing)}; expected rater,image_id,question,answer "
                        "(see ratings_template.csv in the rating package)")
    products = dict(lake.spark.sql("SELECT DISTINCT image_id, product_id FROM generations").toPandas().itertuples(
        index=False))
    ratings = ratings.assign(line=range(2, len(ratings) + 2), rater=ratings.rater.str.strip(),
                             image_id=ratings.image_id.str.strip(), question=ratings.question.str.strip(),
                             answer=ratings.answer.str.strip().str.lower())
    bad, valid = [], []
    for row in ratings.itertuples():
        reason = (("no_rater", "the rater column is empty") if not row.rater else
                  ("unknown_image", f"image {row.image_id!r} is not a generated image of this lakehouse")
                  if row.image_id not in products else
                  ("unknown_question", f"question {row.question!r} is not one of {', '.join(QUESTIONS)}")
                  if row.question not in QUESTIONS else
                  ("bad_answer", f"answer {row.answer!r} is not one of {', '.join(ANSWERS)}")
                  if row.answer not in ANSWERS else None)
        if reason:
            bad.append((products.get(row.image_id, ""), f"{path}:{row.line}", *reason))
        else:
            valid.append({"rater": row.rater, "image_id": row.image_id, "question": row.question,
                          "answer": row.answer, "product_id": products[row.image_id],
                          "source_uri": f"{path}:{row.line}"})
    valid = pd.DataFrame(valid, columns=[*TABLES["human_ratings"].data_columns])
    repeated = valid.duplicated(["rater", "image_id", "question"], keep="last")
    bad += [(r.product_id, r.source_uri, "duplicate", "the same rater, image and question appear again later in "
             "the file; the later answer is used") for r in valid[repeated].itertuples()]
    good = valid[~repeated]
    written = lake.upsert_rows("human_ratings", good) if len(good) else 0
    return written, lake.quarantine(STAGE, bad, str(path))


def synthetic_ratings(lake: Lakehouse, path: Path, raters: int = 3, seed: int = 0) -> Path:
    """A made-up ratings file for the demo and tests: each rater answers yes with a probability
    that rises with the image's automatic aggregate, so ratings and metrics correlate the way a
    real panel's would (roughly). Not a substitute for people."""
    images = evaluated_images(lake).drop_duplicates("image_id")
    score = aggregate_score(images, lake.settings.generation.rank_weights).to_numpy()
    spread = score.std() or 1.0
    p_yes = 0.5 + 0.48 * np.tanh(2 * (score - np.median(score)) / spread)
    rng = np.random.default_rng(seed)
    rows = [{"rater": f"synthetic-{r + 1}", "image_id": image_id, "question": q,
             "answer": "yes" if rng.random() < p else str(rng.choice(ANSWERS[1:]))}
            for image_id, p in zip(images.image_id, p_yes) for r in range(raters) for q in QUESTIONS]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["rater", "image_id", "question", "answer"]).to_csv(path, index=False)
    return path
