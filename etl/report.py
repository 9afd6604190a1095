"""A static HTML report of the lakehouse, to look at what the pipeline made of each product.

    write_report(lake, Path("report"))  ->  report/index.html

`index.html` lists the products with their counts and the evaluation table; `products/<id>.html`
shows each product's references with their masks, the augmentations that were selected or
rejected and why, the ranked generations, the baseline's generations and the product's
evaluation rows. Images are written under `img/` and linked relatively, so the report opens
from disk: no server, no JavaScript, nothing fetched from the network.

Each section's table is read once per report (filtered to the chosen products in SQL) and split
per product in pandas.
"""

from __future__ import annotations

import html
import io
import json
import math
import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from PIL import Image

from core.errors import UserError
from etl.plans import status
from etl.step import REPORT_FILES, Step
from core.tables import TABLES, sql_list
from core.vocabulary import AUGMENT_KINDS, METRIC_COLUMNS, RANKING_METRICS, from_bank

EVALUATION_COLUMNS = tuple(c for c in TABLES["evaluation_metrics"].data_columns
                           if c not in ("product_id", "evaluation_id", "selected_after_results"))
WHOLE = {"products", "images", "rated_images", "rank", "raters", "n_references", "seed", "references compared"}
MISSING = "—"

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em 2em; color: #222; background: #fff; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; font-size: 13px; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
figure { margin: 0; padding: 6px; border: 1px solid #ddd; border-radius: 4px; max-width: 340px; }
figure.pair { display: flex; flex-wrap: wrap; gap: 6px; }
figcaption { font-size: 12px; color: #444; width: 100%; }
img { max-width: 160px; max-height: 160px; display: block; background: #eee; }
.kept { border-color: #2a7; background: #f2fbf6; } .dropped { border-color: #d66; background: #fdf3f3; }
.reason { color: #a22; } .pass { color: #1a7a3a; font-weight: bold; } .fail { color: #a22; font-weight: bold; }
.muted { color: #777; }
.notice { border: 2px solid #c80; background: #fff6e0; padding: 6px 10px; font-weight: bold; }
"""


def write_report(lake, out_dir: Path, products: list[str] | None = None) -> Path:
    """Write the report under `out_dir` (for `products` only, when given); returns index.html."""
    out_dir = Path(out_dir)
    ids = _product_ids(lake, products)
    data = _load(lake, ids)
    images = _ImageFiles(out_dir / "img")
    (out_dir / "products").mkdir(parents=True, exist_ok=True)
    written_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    notice = honesty_notice(lake)
    for product_id in ids:
        page = _product_page(data.product(product_id), images, written_at, notice)
        (out_dir / "products" / f"{product_id}.html").write_text(page, encoding="utf-8")
    index = out_dir / "index.html"
    index.write_text(_index_page(data, ids, written_at, notice), encoding="utf-8")
    return index


def honesty_notice(lake, where: str = "on these pages", ratings: bool = True) -> str:
    """What a reader must know before taking any figure for evidence: synthetic ratings, tiny
    random-weight models. A banner on every report page, a note under the command line's tables;
    empty when neither applies."""
    from udfs.zoo import ModelZoo

    zoo = ModelZoo.from_settings(lake.settings)
    tiny = zoo.tiny_roles()
    synthetic = ratings and lake.spark.sql(
        "SELECT count(*) AS n FROM human_ratings WHERE source <> 'human'").first()["n"]
    lines = []
    if synthetic:
        lines.append(f"The ratings {where} are SYNTHETIC (made-up raters standing in for people): pass rates, "
                     "verdicts, Pearson correlations and the ranking gain computed from them say nothing about "
                     "image quality.")
    if tiny:
        lines.append(f"Models {', '.join(tiny)} are tiny random-weight stand-ins: their images, masks, captions "
                     "and scores (CLIP-I, CLIP-T, DINO) say nothing about fidelity.")
    return " ".join(lines)


# ---------------------------------------------------------------- reading the lakehouse


@dataclass
class _Data:
    """One frame per section, for all reported products."""

    products: pd.DataFrame
    references: pd.DataFrame
    masks: pd.DataFrame
    metrics: pd.DataFrame
    augmentations: pd.DataFrame
    generations: pd.DataFrame
    ratings: pd.DataFrame
    evaluation: pd.DataFrame
    evaluations: pd.DataFrame  # etl.plans.status: every pinned evaluation, complete or what is missing
    # etl.evaluation.arm_by_product_type: per product type, the arm that passes more often
    by_type: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    def product(self, product_id: str) -> _Data:
        """The rows of one product (masks follow its reference images)."""
        def own(frame):
            return frame[frame.product_id == product_id]

        references = own(self.references)
        return _Data(own(self.products), references, self.masks[self.masks.image_id.isin(references.image_id)],
                     own(self.metrics), own(self.augmentations), own(self.generations), own(self.ratings),
                     own(self.evaluation), self.evaluations)


def _product_ids(lake, products: list[str] | None) -> list[str]:
    """The products to report, in id order; unknown ids are a UserError."""
    known = list(lake.spark.sql("SELECT product_id FROM products ORDER BY product_id").toPandas().product_id)
    if products is None:
        return known
    unknown = sorted(set(products) - set(known))
    if unknown:
        listed = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        raise UserError(f"unknown product id(s): {', '.join(unknown)}; the lakehouse has: {listed or 'no products'}")
    return sorted(set(products))


def _load(lake, ids: list[str]) -> _Data:
    from etl.evaluation import ARM_ORDER, arm_by_product_type

    """Run one query per section, restricted to `ids`."""
    chosen = f"IN ({sql_list(ids)})" if ids else "IN (NULL)"

    def sql(query: str) -> pd.DataFrame:
        return lake.spark.sql(query).toPandas()

    return _Data(
        products=sql(f"SELECT product_id, title, product_type, source FROM products WHERE product_id {chosen}"),
        references=sql(f"""SELECT image_id, product_id, image, format, width, height, source_uri
                           FROM product_images WHERE role = 'reference' AND product_id {chosen}
                           ORDER BY product_id, source_uri, image_id"""),
        masks=sql(f"""SELECT image_id, method, mask, area_fraction, score FROM masks WHERE image_id IN
                      (SELECT image_id FROM product_images WHERE role = 'reference' AND product_id {chosen})
                      ORDER BY image_id, method"""),
        metrics=sql(f"""SELECT image_id, product_id, n_references, {', '.join(METRIC_COLUMNS)}
                        FROM image_metrics WHERE product_id {chosen}"""),
        # synthetic_images is keyed by task: one image can come from two tasks, keep one row.
        augmentations=sql(f"""SELECT t.product_id, t.image_id, t.kind, t.is_positive, t.score, t.rank,
                                     t.selected, t.reason, t.mask_iou, t.caption, s.prompt, s.image
                              FROM training_images t JOIN (
                                SELECT *, row_number() OVER (PARTITION BY product_id, image_id
                                                             ORDER BY task_key) AS n
                                FROM synthetic_images) s
                                ON s.product_id = t.product_id AND s.image_id = t.image_id AND s.n = 1
                              WHERE t.product_id {chosen}
                                AND t.kind IN ({sql_list(AUGMENT_KINDS)})
                              ORDER BY t.product_id, t.selected DESC, t.kind, t.rank, t.image_id"""),
        # Baseline generations are not ranked: the left join leaves their ranking NULL.
        generations=sql(f"""SELECT g.product_id, g.image_id, g.arm, g.prompt, g.seed, g.adapter_version,
                                   g.image, r.score, r.rank, r.kept, r.reason
                            FROM (SELECT *, row_number() OVER (PARTITION BY product_id, image_id, arm
                                                               ORDER BY task_key) AS n
                                  FROM generations WHERE {from_bank("generations")}) g
                            LEFT JOIN ranked_generations r
                              ON r.product_id = g.product_id AND r.image_id = g.image_id
                                 AND coalesce(r.arm, 'ours') = g.arm AND {from_bank("r")}
                            WHERE g.n = 1 AND g.product_id {chosen}
                            ORDER BY g.product_id, r.kept DESC NULLS LAST, r.rank NULLS LAST, g.seed, g.image_id"""),
        ratings=sql(f"""SELECT DISTINCT image_id, product_id, raters, passed, failed_questions, ratings_source
                        FROM rated_images WHERE product_id {chosen}"""),
        evaluation=sql(f"""SELECT product_id, evaluation_id, selected_after_results, {', '.join(EVALUATION_COLUMNS)}
                           FROM evaluation_metrics
                           WHERE evaluation_id IS NOT NULL AND (product_id = '(all)' OR product_id {chosen})
                           ORDER BY dataset, {ARM_ORDER}, selection, product_id"""),
        evaluations=_covering(status(lake), ids),
        by_type=arm_by_product_type(lake, products=ids),
    )


def _covering(states: pd.DataFrame, ids: list[str]) -> pd.DataFrame:
    """The evaluations that include at least one of the reported products."""
    return states[[bool(set(p) & set(ids)) for p in states.product_ids]] if len(states) else states


# ---------------------------------------------------------------- image files


class _ImageFiles:
    """Writes each image once under `folder` and returns its path relative to a product page."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.written: set[str] = set()

    def add(self, name: str, data) -> str:
        """Write encoded bytes as `<name>.png|.jpg`: PNG and JPEG as stored, anything else as PNG."""
        data = bytes(data)
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            file = f"{name}.png"
        elif data.startswith(b"\xff\xd8\xff"):
            file = f"{name}.jpg"
        else:
            file = f"{name}.png"
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buffer, format="PNG")
            data = buffer.getvalue()
        if file not in self.written:
            (self.folder / file).write_bytes(data)
            self.written.add(file)
        return f"../img/{quote(file)}"


# ---------------------------------------------------------------- HTML helpers


def _e(value, whole: bool = False) -> str:
    """Escaped text of a value: NULL as a dash, numbers with three decimals (none when `whole`:
    pandas reads integer columns with NULLs as floats)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "yes" if value else "no"
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        return f"{float(value):.0f}" if whole else f"{float(value):.3f}"
    return html.escape(str(value))


def _page(title: str, body: str, written_at: str, notice: str = "") -> str:
    banner = f'<p class="notice" role="alert">{html.escape(notice)}</p>\n' if notice else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{banner}{body}\n"
            f'<p class="muted">Written {html.escape(written_at)} by recontext.</p>\n</body></html>\n')


def _table(columns: list[str], rows: list[list[str]], numeric: set[str] = frozenset()) -> str:
    """A table of already escaped cells."""
    # Headers may break after an underscore, so that wide tables fit the window.
    head = "".join(f"<th>{html.escape(c).replace('_', '_<wbr>')}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{cell}</td>' if c in numeric else f"<td>{cell}</td>"
                         for c, cell in zip(columns, row)) + "</tr>\n" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def _img(src: str, alt: str, title: str = "") -> str:
    tip = f' title="{html.escape(title)}"' if title else ""
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}"{tip} loading="eager">'


def _facts(pairs: list[tuple[str, object]]) -> str:
    """`name value` lines under a thumbnail (values escaped here)."""
    return "<br>".join(f"{html.escape(name)} {_e(value, name in WHOLE)}" for name, value in pairs)


# ---------------------------------------------------------------- index


def _index_page(data: _Data, ids: list[str], written_at: str, notice: str = "") -> str:
    body = ("<h1>recontext report</h1>\n<h2>Products</h2>\n" + _summary_table(data, ids)
            + "\n<h2>Evaluations</h2>\n<p>Each evaluation is a pinned plan: every arm on the same products, "
              "prompts and seeds, each arm's adapter version frozen. Per arm, selection and dataset, over all of "
              "the dataset's products (selection all: every planned image; ranked: ours' kept top N), with the "
              "arm's training settings.</p>\n"
            + _evaluations(data, "(all)") + _by_type(data.by_type))
    return _page("recontext report", body, written_at, notice)


def _by_type(table: pd.DataFrame) -> str:
    """Per product type, which arm passes more often in the latest complete evaluation, with each
    arm's training device seconds per product: does a product need its own adapter?"""
    if table.empty:
        return ""
    columns = list(table.columns)
    cells = [[_e(getattr(r, c)) for c in columns] for r in table.itertuples()]
    return ("<h2>Which arm, per product type</h2>\n<p>Image pass rate per arm over each type's products (every "
            "planned image of the latest complete evaluation) and training device seconds per product (the "
            "zero-shot arm trains nothing). Raters are named in ratings_source; synthetic ones mean nothing.</p>\n"
            + _table(columns, cells, {c for c in columns if c.endswith(("_rate", "_per_product")) or c == "products"}))


def _summary_table(data: _Data, ids: list[str]) -> str:
    """One row per product: its counts and a link to its page."""
    rows = []
    for product_id in ids:
        own = data.product(product_id)
        product = own.products.iloc[0]
        aug, ours = own.augmentations, own.generations[own.generations.arm != "baseline"]
        kept = int(ours.kept.eq(True).sum())
        rows.append([
            f'<a href="products/{quote(product_id)}.html">{_e(product_id)}</a>', _e(product.title),
            _e(product.product_type), _e(len(own.references)), _e(int(aug.selected.astype(bool).sum())),
            _e(int((~aug.selected.astype(bool)).sum())), f"{kept} / {len(ours)}", _e(ours.score.max()),
            f'<a href="products/{quote(product_id)}.html">page</a>'])
    columns = ["product_id", "title", "product_type", "references", "synthetic accepted", "synthetic rejected",
               "generations kept / total", "best score", "page"]
    return _table(columns, rows, {"references", "synthetic accepted", "synthetic rejected",
                                  "generations kept / total", "best score"})


def _evaluations(data: _Data, product_id: str) -> str:
    """Every evaluation covering `product_id` ('(all)': every evaluation), newest first: its
    '(all)' or product rows, or what is missing when incomplete; figures selected after results
    were seen say so."""
    if data.evaluations.empty:
        return '<p class="muted">No evaluation yet.</p>'
    parts = []
    for state in data.evaluations.iloc[::-1].itertuples():
        rows = data.evaluation[(data.evaluation.evaluation_id == state.evaluation_id)
                               & (data.evaluation.product_id == product_id)]
        if product_id != "(all)" and product_id not in state.product_ids:
            continue
        planned = ", ".join(f"{arm} {n}" for arm, n in json.loads(state.planned).items())
        parts.append(f"<h3>Evaluation {_e(state.evaluation_id)}</h3>\n<p>pinned {_e(str(state.created_at)[:16])} "
                     f"&middot; {_e(state.products)} product(s) &middot; planned images per arm: {_e(planned)}</p>\n")
        if not state.complete:
            parts.append('<p class="notice">Incomplete: no figures until every arm has every planned image. '
                         "Missing:</p>\n<ul>" + "".join(f"<li>{_e(m)}</li>" for m in state.missing) + "</ul>\n")
            continue
        if rows.selected_after_results.fillna(False).astype(bool).any():
            parts.append('<p class="notice">Selected after the fact: an adapter version evaluated here was promoted '
                         "after results of its product had been seen.</p>\n")
        parts.append(_evaluation_table(rows))
    return "".join(parts) or '<p class="muted">No evaluation yet.</p>'


def _evaluation_table(rows: pd.DataFrame) -> str:
    """evaluation_metrics rows; NULL shows as a dash."""
    columns = list(EVALUATION_COLUMNS)
    cells = [[_e(getattr(r, c), c in WHOLE) for c in columns] for r in rows.itertuples()]
    return _table(columns, cells, set(columns) - {"arm", "dataset", "training", "selection", "ratings_source"})


# ---------------------------------------------------------------- product page


def _product_page(data: _Data, images: _ImageFiles, written_at: str, notice: str = "") -> str:
    product = data.products.iloc[0]
    body = (f'<p><a href="../index.html">&larr; all products</a></p>\n'
            f"<h1>{_e(product.product_id)}: {_e(product.title)}</h1>\n"
            f"<p>type {_e(product.product_type)} &middot; source {_e(product.source)}</p>\n"
            + _references_section(data, images) + _augmentations_section(data, images)
            + _generations_section(data, images) + _baseline_section(data, images)
            + "<h2>Evaluations</h2>\n" + _evaluations(data, product.product_id))
    return _page(f"{product.product_id} — recontext report", body, written_at, notice)


def _references_section(data: _Data, images: _ImageFiles) -> str:
    """Each reference photo next to its masks, with its metrics."""
    metrics = data.metrics.set_index("image_id")
    figures = []
    for ref in data.references.itertuples():
        pictures = [_img(images.add(ref.image_id, ref.image), f"reference {ref.image_id[:12]}", ref.source_uri)]
        for mask in data.masks[data.masks.image_id == ref.image_id].itertuples():
            src = images.add(f"{ref.image_id}.mask-{mask.method}", mask.mask)
            pictures.append(_img(src, f"{mask.method} mask", f"{mask.method} mask"))
        masks = ", ".join(html.escape(m) for m in data.masks[data.masks.image_id == ref.image_id].method)
        facts = [("image", ref.image_id[:12]), ("size", f"{ref.width}×{ref.height}")]
        if ref.image_id in metrics.index:
            row = metrics.loc[ref.image_id]
            facts += [("references compared", row.n_references), *((m, row[m]) for m in METRIC_COLUMNS)]
        figures.append(f'<figure class="pair">{"".join(pictures)}<figcaption>masks: {masks or MISSING}<br>'
                       f"{_facts(facts)}</figcaption></figure>")
    return _section("Reference images", "No reference images.", figures)


def _augmentations_section(data: _Data, images: _ImageFiles) -> str:
    """Synthetic images of the training set, selected first, each rejection with its reason."""
    out = []
    for selected, title in ((True, "Augmentations: selected"), (False, "Augmentations: rejected")):
        rows = data.augmentations[data.augmentations.selected.astype(bool) == selected]
        figures = []
        for r in rows.itertuples():
            facts = _facts([("kind", r.kind), ("score", r.score), ("mask_iou", r.mask_iou), ("rank", r.rank)])
            reason = "" if selected else f'<br><span class="reason">{_e(r.reason)}</span>'
            figures.append(f'<figure class="{"kept" if selected else "dropped"}">'
                           f'{_img(images.add(r.image_id, r.image), r.kind, r.prompt or r.caption or "")}'
                           f"<figcaption>{facts}{reason}</figcaption></figure>")
        out.append(_section(title, "None.", figures))
    return "".join(out)


def _generations_section(data: _Data, images: _ImageFiles) -> str:
    """Our arm's generations, kept first then by rank, with their ranking and metrics."""
    rows = data.generations[data.generations.arm != "baseline"]
    return _section("Generations", "No generations.", [_generation(r, data, images, ranked=True)
                                                       for r in rows.itertuples()])


def _baseline_section(data: _Data, images: _ImageFiles) -> str:
    """The baseline arm's generations (plain DreamBooth; not ranked)."""
    rows = data.generations[data.generations.arm == "baseline"]
    return _section("Baseline generations", "No baseline generations.",
                    [_generation(r, data, images, ranked=False) for r in rows.itertuples()])


def _generation(r, data: _Data, images: _ImageFiles, ranked: bool) -> str:
    """One generated image with its lineage, metrics, ranking and human verdict."""
    metrics = data.metrics[data.metrics.image_id == r.image_id]
    facts = [("seed", r.seed), ("adapter", r.adapter_version)]
    facts += [(m, metrics.iloc[0][m] if len(metrics) else None) for m in RANKING_METRICS]
    status, css = "", ""
    if ranked:
        facts += [("score", r.score), ("rank", r.rank)]
        if pd.isna(r.kept):
            status = '<br><span class="muted">not ranked yet</span>'
        elif r.kept:
            status, css = '<br><span class="pass">kept</span>', "kept"
        else:
            status, css = f'<br><span class="reason">{_e(r.reason)}</span>', "dropped"
    return (f'<figure class="{css}">{_img(images.add(r.image_id, r.image), f"{r.arm} generation", r.prompt or "")}'
            f"<figcaption>{_facts(facts)}{status}{_verdict(data.ratings, r.image_id)}"
            f'<br><span class="muted">{_e(r.prompt)}</span></figcaption></figure>')


def _verdict(ratings: pd.DataFrame, image_id: str) -> str:
    """Human verdict of an image, or nothing when it was not rated."""
    rows = ratings[ratings.image_id == image_id]
    if rows.empty:
        return ""
    r = rows.iloc[0]
    # Rows rated before the source was recorded say so rather than pass for human verdicts.
    source = "unrecorded" if pd.isna(r.ratings_source) else r.ratings_source
    who = "human" if source == "human" else f"{source} raters"
    if r.passed:
        return f'<br><span class="pass">{_e(who)}: passed</span> ({_e(r.raters)} raters)'
    return (f'<br><span class="fail">{_e(who)}: failed</span> ({_e(r.raters)} raters): '
            f"{_e(r.failed_questions)}")


def _section(title: str, empty: str, figures: list[str]) -> str:
    content = f'<div class="grid">\n{"".join(figures)}\n</div>' if figures else f'<p class="muted">{empty}</p>'
    return f"<h2>{html.escape(title)}</h2>\n{content}\n"


def run_report(lake, zoo=None) -> dict[str, int]:
    products = sorted(lake.products) if lake.products else None
    write_report(lake, lake.settings.home / "report", products)
    return {REPORT_FILES: 1 + len(_product_ids(lake, products))}  # pages: the index and one per product


REPORT = Step("report", run_report,
              reads=("products", "product_classes", "product_images", "masks", "synthetic_images", "training_images",
                     "image_metrics", "generations", "ranked_generations", "evaluation_metrics", "evaluation_plans",
                     "human_ratings", "rated_images"),
              writes=(REPORT_FILES,), description="the static HTML report under <home>/report")
