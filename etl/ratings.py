"""Human ratings (appendix A.3): the eight questions and importing raters' answers into
`human_ratings`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import UserError
from etl.lakehouse import Lakehouse
from core.tables import TABLES

STAGE = "ratings"
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


SOURCES = ("human", "synthetic")


def import_ratings(lake: Lakehouse, path: str | Path, source: str = "human") -> tuple[int, int]:
    """Load a ratings CSV (rater, image_id, question, answer) into `human_ratings` (write_ratings);
    returns (rows written, rows quarantined)."""
    if source not in SOURCES:
        raise UserError(f"ratings source must be one of {', '.join(SOURCES)}, not {source!r}")
    path = Path(path)
    try:
        ratings = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read ratings file {path}: {err}") from None
    missing = {"rater", "image_id", "question", "answer"} - set(ratings.columns)
    if missing:
        raise UserError(f"{path} lacks the column(s) {sorted(missing)}; expected rater,image_id,question,answer "
                        "(see ratings_template.csv in the rating package)")
    return write_ratings(lake, ratings, str(path), source)


def write_ratings(lake: Lakehouse, ratings: pd.DataFrame, origin: str, source: str = "human") -> tuple[int, int]:
    """Write answers (rater, image_id, question, answer; strings) to `human_ratings` in one upsert,
    each row marked with its `source` (human, or synthetic for made-up raters) and `origin:line`
    (a file, or the review console and its rater). Rows naming an unknown image or question, an
    answer outside yes/maybe/no/unclear, no rater, or repeated later go to quarantine with their
    line; returns (rows written, rows quarantined). A rater's new answer to a question replaces
    the old one (the table's key is rater, image, question)."""
    if source not in SOURCES:
        raise UserError(f"ratings source must be one of {', '.join(SOURCES)}, not {source!r}")
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
            bad.append((products.get(row.image_id, ""), f"{origin}:{row.line}", *reason))
        else:
            valid.append({"rater": row.rater, "image_id": row.image_id, "question": row.question,
                          "answer": row.answer, "product_id": products[row.image_id],
                          "source_uri": f"{origin}:{row.line}", "source": source})
    valid = pd.DataFrame(valid, columns=[*TABLES["human_ratings"].data_columns])
    repeated = valid.duplicated(["rater", "image_id", "question"], keep="last")
    bad += [(r.product_id, r.source_uri, "duplicate", "the same rater, image and question appear again later in "
             "the file; the later answer is used") for r in valid[repeated].itertuples()]
    good = valid[~repeated]
    written = lake.upsert_rows("human_ratings", good) if len(good) else 0
    return written, lake.quarantine(STAGE, bad, origin)


def krippendorff_alpha(ratings: pd.DataFrame) -> float | None:
    """Krippendorff's alpha for nominal answers: units are (image, question), coders the raters,
    values the answers (yes/maybe/no/unclear). Units with fewer than two answers do not count, so
    any number of raters per image works (Fleiss' kappa needs the same number everywhere). None
    when no unit has two answers or every answer is the same (no expected disagreement)."""
    answers = sorted(set(ratings.answer))
    index = {a: i for i, a in enumerate(answers)}
    coincidences = np.zeros((len(answers), len(answers)))
    for _, unit in ratings.groupby(["image_id", "question"]):
        counts = np.bincount([index[a] for a in unit.answer], minlength=len(answers)).astype(float)
        m = counts.sum()
        if m >= 2:  # ordered pairs of values from different coders, each unit weighted 1 / (m - 1)
            coincidences += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    totals = coincidences.sum(axis=1)
    n = totals.sum()
    expected = n * n - (totals ** 2).sum()
    if n < 2 or expected == 0:
        return None
    observed = n - np.trace(coincidences)
    return float(1 - (n - 1) * observed / expected)
