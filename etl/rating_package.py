"""The rating package: a folder people open from disk to rate generated images blind to the arm
(HTML form, images, a CSV template); their CSVs come back through etl/ratings.py. Also the
made-up raters the demo and tests stand in for people with."""

from __future__ import annotations

import hashlib
import html
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import UserError
from etl.evaluation import evaluated_images
from etl.lakehouse import Lakehouse
from etl.ratings import ANSWERS, QUESTIONS
from core.tables import sql_list


def export_package(lake: Lakehouse, out_dir: Path) -> tuple[Path, int]:
    """A folder raters open from disk: index.html (references, each evaluated image, the eight
    questions, a button that downloads the answers as CSV), the images, and ratings_template.csv
    for raters who prefer a spreadsheet. Images are shuffled by hash and carry no arm, so raters
    are blind to it. Returns (index.html, images)."""
    images = rating_tasks(lake)
    if images.empty:
        raise UserError("nothing to rate: no evaluated generations yet (run `recontext evaluate` first)")
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / "img", ignore_errors=True)
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    products = sorted(images.product_id.unique())
    references = lake.spark.sql(
        f"SELECT product_id, image_id, image FROM product_images WHERE product_id IN ({sql_list(products)}) "
        "ORDER BY product_id, image_id").toPandas()
    pixels = lake.spark.sql(f"SELECT DISTINCT image_id, image FROM generations WHERE image_id IN "
                            f"({sql_list(images.image_id)})").toPandas()
    for row in [*references.itertuples(), *pixels.drop_duplicates("image_id").itertuples()]:
        (out_dir / "img" / f"{row.image_id}.png").write_bytes(row.image)
    pd.DataFrame([{"rater": "", "image_id": i, "question": q, "answer": ""}
                  for i in images.image_id for q in QUESTIONS]).to_csv(out_dir / "ratings_template.csv", index=False)
    index = out_dir / "index.html"
    index.write_text(_package_html(images, references))
    return index, len(images)


def rating_tasks(lake: Lakehouse) -> pd.DataFrame:
    """The evaluated images to rate, once each, in an order that hides the arm (by a hash of the
    image id): the package's order and the review console's."""
    images = evaluated_images(lake)
    return (images.assign(order=[hashlib.sha256(i.encode()).hexdigest() for i in images.image_id])
            .sort_values("order").drop_duplicates("image_id").reset_index(drop=True))


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


def synthetic_ratings(lake: Lakehouse, path: Path, raters: int = 3, seed: int = 0) -> Path:
    """A made-up ratings file for the demo and tests (import it with source="synthetic"). It
    must not be a function of the metric columns, or the Pearson and the learned ranker computed
    from it would be circular: each image gets a made-up quality from a hash of its id and the
    seed, and each rater answers each question yes with that probability. Not a substitute for
    people; every figure computed from it is labelled synthetic."""
    images = evaluated_images(lake).drop_duplicates("image_id")
    p_yes = [0.55 + 0.45 * int(hashlib.sha256(f"{seed}|{i}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
             for i in images.image_id]
    rng = np.random.default_rng(seed)
    rows = [{"rater": f"synthetic-{r + 1}", "image_id": image_id, "question": q,
             "answer": "yes" if rng.random() < p else str(rng.choice(ANSWERS[1:]))}
            for image_id, p in zip(images.image_id, p_yes) for r in range(raters) for q in QUESTIONS]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["rater", "image_id", "question", "answer"]).to_csv(path, index=False)
    return path
