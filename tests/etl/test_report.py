"""The HTML report, rendered in a real headless Chromium from disk.

Two products are ingested and scored (references, masks, metrics); the downstream tables
(augmentations, training set, generations, ranking, human verdicts, evaluation) get a few rows
written directly, so every section of the report has something to show.
"""

import hashlib
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
import pytest
from PIL import Image

from core.settings import Settings
from core.errors import UserError
from etl.ingest import ingest
from etl.lakehouse import Lakehouse
from jobs.steps import SCORING, run_steps
from etl.report import write_report
from core.tables import TABLES
from sample_images import encode, photo, product_shot, write_files
from udfs.zoo import ModelZoo

CHROMIUM = Path("/usr/bin/chromium")
TITLE = 'Enamel <i>mug</i> & "cup"'  # must show as text, not markup


def put(lake, name: str, rows: list[dict]) -> None:
    """Write rows (missing columns NULL) to a table, stamped with its audit column."""
    table = TABLES[name]
    frame = pd.DataFrame(rows, columns=table.data_columns).astype(object)
    frame = frame.where(frame.notna(), None)
    data = lake.spark.createDataFrame(frame, table.data_schema())
    lake.upsert(name, data.selectExpr("*", *(f"current_timestamp() AS {c}" for c in table.audit)))


def picture(seed: int) -> tuple[str, bytes]:
    png = encode(photo(96, 72, seed=seed), "PNG")
    return hashlib.sha256(png).hexdigest(), png


def add_downstream_rows(lake) -> None:
    """Augmentations (2 selected, 1 rejected), 3 ranked generations (2 kept), 1 baseline one,
    two human verdicts and evaluation rows, all for `mug`."""
    synthetic = [("novel_view", True, None, 1), ("negative", True, None, 1),
                 ("novel_view", False, "over quota (rank 2, keeping 1)", 2)]
    for seed, (kind, selected, reason, rank) in enumerate(synthetic, start=100):
        image_id, png = picture(seed)
        put(lake, "synthetic_images", [dict(image_id=image_id, product_id="mug", kind=kind, task_key=f"t{seed}",
                                            prompt=f"a mug, view {seed}", model="tiny", seed=seed, image=png,
                                            width=96, height=72)])
        put(lake, "training_images", [dict(product_id="mug", image_id=image_id, kind=kind,
                                           is_positive=kind != "negative", score=0.5 - seed / 1000, rank=rank,
                                           selected=selected, reason=reason, mask_iou=0.875, caption="a mug")])
    generated = [("ours", True, None, 1, 0.9), ("ours", True, None, 2, 0.8),
                 ("ours", False, "score -0.100 below 0.0", None, -0.1), ("baseline", None, None, None, None)]
    for seed, (arm, kept, reason, rank, score) in enumerate(generated, start=200):
        image_id, png = picture(seed)
        put(lake, "generations", [dict(image_id=image_id, product_id="mug", task_key=f"g{seed}", arm=arm,
                                       adapter_version="3", prompt=f"a mug on a desk #{seed}", seed=seed,
                                       image=png, width=96, height=72)])
        put(lake, "image_metrics", [dict(image_id=image_id, product_id="mug", kind="generated", clip_t=0.31,
                                         clip_i=0.72, dino_i=0.55)])
        if arm == "ours":
            put(lake, "ranked_generations", [dict(product_id="mug", arm="ours", image_id=image_id, score=score,
                                                  rank=rank, kept=kept, reason=reason, adapter_version="3")])
        if seed in (200, 203):
            put(lake, "rated_images", [dict(evaluation_id="e1", image_id=image_id, product_id="mug", arm=arm, raters=3,
                                            passed=seed == 200, failed_questions="" if seed == 200 else "q3,q7",
                                            ratings_source="human")])
    # Two pinned evaluations: e0 lacks the baseline's champion (incomplete, no figures); e1 has
    # every planned image, and a version it evaluates was promoted after results were seen.
    put(lake, "evaluation_plans", [dict(evaluation_id="e0", arm="ours", product_id="mug", prompt_id="p1", seed=0,
                                        task_key="g200", adapter_version="3"),
                                   dict(evaluation_id="e0", arm="baseline", product_id="mug", prompt_id="p1", seed=0)])
    put(lake, "evaluation_plans", [dict(evaluation_id="e1", arm=arm, product_id="mug", prompt_id="p1", seed=seed,
                                        task_key=f"g{seed}", adapter_version="3")
                                   for arm, seed in (("ours", 200), ("ours", 201), ("ours", 202), ("baseline", 203))])
    evaluation = dict(evaluation_id="e1", dataset="folder", products=2, images=3, clip_i=0.7, clip_t=0.3, dino_i=0.5,
                      seg_clip_i=0.6, seg_clip_t=0.28, seg_dino_i=0.45, score=0.85, selected_after_results=True,
                      training="30 steps, rank 4, alpha 4, lr 0.001, prior none, 3-5 examples")
    put(lake, "evaluation_metrics", [
        {**evaluation, "arm": "ours", "product_id": "(all)", "rated_images": 1, "image_pass_rate": 1.0,
         "product_pass_rate": 1.0, "pearson_score_pass": None},
        {**evaluation, "arm": "baseline", "product_id": "(all)", "images": 1},
        {**evaluation, "arm": "ours", "product_id": "mug", "products": 1}])


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_models):
    home = tmp_path_factory.mktemp("report")
    lake = Lakehouse(Settings.load(home, models={"tiny_dir": str(tiny_models)}))
    write_files(home / "catalog" / "mug", {"front.png": encode(product_shot(seed=1), "PNG"),
                                           "side.jpg": encode(product_shot(seed=2), "JPEG", quality=90)})
    (home / "catalog" / "mug" / "product.json").write_text(json.dumps({"title": TITLE, "product_type": "mug"}))
    write_files(home / "catalog" / "lamp", {"a.png": encode(product_shot(seed=3), "PNG")})
    ingest(lake, home / "catalog")
    run_steps(lake, SCORING, ModelZoo.from_settings(lake.settings), progress=lambda _: None)
    add_downstream_rows(lake)
    return lake, write_report(lake, home / "report")


class Dom(HTMLParser):
    """Links, images, start tags and text of a dumped DOM."""

    def __init__(self, markup: str):
        super().__init__()
        self.links, self.images, self.tags, self.text = [], [], [], []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        self.text.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); the report is checked in a real browser")
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1280,2000", *args],
        capture_output=True, text=True, timeout=60, check=True)


def rendered(page: Path, tmp_path: Path) -> Dom:
    return Dom(chromium(tmp_path / "profile", "--dump-dom", page.as_uri()).stdout)


def screenshot(page: Path, tmp_path: Path) -> Image.Image:
    png = tmp_path / f"{page.stem}.png"
    chromium(tmp_path / "profile", f"--screenshot={png}", page.as_uri())
    assert png.is_file(), f"Chromium wrote no screenshot of {page}"
    image = Image.open(png)
    image.load()
    return image.convert("RGB")


def target(page: Path, href: str) -> Path:
    return (page.parent / unquote(urlsplit(href).path)).resolve()


def test_index_renders_and_links_every_product_page(report, tmp_path):
    _, index = report
    dom = rendered(index, tmp_path)
    assert "recontext report" in dom.all_text and "Written " in dom.all_text
    for product_id in ("lamp", "mug"):
        assert product_id in dom.all_text
        pages = {target(index, h) for h in dom.links if h.endswith(f"products/{product_id}.html")}
        assert pages == {index.parent / "products" / f"{product_id}.html"} and all(p.is_file() for p in pages)
    # The title is text, not markup; the summary counts what was written.
    assert TITLE in dom.all_text and "i" not in dom.tags
    assert "2 / 3" in dom.all_text and "0 / 0" in dom.all_text  # generations kept / total: mug, lamp
    # Evaluation: the two '(all)' rows, NULLs as a dash, not the per-product row.
    assert dom.all_text.count("folder") == 2 and "—" in dom.all_text

    shot = screenshot(index, tmp_path)
    assert shot.size == (1280, 2000)
    colours = shot.getcolors(maxcolors=1 << 20)
    assert len(colours) > 2, "the screenshot is one flat colour: the page did not render"


def test_product_page_shows_every_section_with_its_images(report, tmp_path):
    lake, index = report
    page = index.parent / "products" / "mug.html"
    dom = rendered(page, tmp_path)
    for heading in ("Reference images", "Augmentations: selected", "Augmentations: rejected", "Generations",
                    "Baseline generations", "Evaluation"):
        assert heading in dom.all_text
    masks = lake.spark.sql("""SELECT count(*) AS n FROM masks WHERE image_id IN
                              (SELECT image_id FROM product_images WHERE product_id = 'mug')""").collect()[0].n
    assert masks >= 2
    assert len(dom.images) == 2 + masks + 3 + 4  # references, their masks, augmentations, generations
    files = [target(page, src) for src in dom.images]
    missing = [f for f in files if not f.is_file()]
    assert not missing, f"images the page shows but that are not on disk: {missing}"
    for file in files:
        with Image.open(file) as image:
            image.verify()
    assert {f.suffix for f in files} == {".png", ".jpg"}  # the JPEG reference is written as stored
    text = dom.all_text
    assert "over quota (rank 2, keeping 1)" in text and "score -0.100 below 0.0" in text
    assert "human: passed" in text and "human: failed" in text and "q3,q7" in text
    assert target(page, dom.links[0]) == index

    # The page really shows its pictures: noisy photos give thousands of colours.
    shot = screenshot(page, tmp_path)
    assert len(shot.getcolors(maxcolors=1 << 20)) > 1000


def test_evaluations_are_listed_with_what_is_missing_and_selection_after_results(report):
    _, index = report
    text = Dom(index.read_text()).all_text
    assert "Evaluation e0" in text and "Evaluation e1" in text
    assert text.index("Evaluation e1") < text.index("Evaluation e0")  # newest first
    assert "Incomplete" in text and "baseline mug: no @champion adapter" in text
    assert "Selected after the fact" in text
    assert "30 steps, rank 4, alpha 4, lr 0.001, prior none, 3-5 examples" in text  # beside the arm's figures
    assert "planned images per arm: ours 3, baseline 1" in text


def test_a_page_without_downstream_rows_says_so(report, tmp_path):
    _, index = report
    dom = Dom((index.parent / "products" / "lamp.html").read_text())
    assert "No generations." in dom.all_text and "No baseline generations." in dom.all_text
    assert "No evaluation yet." in dom.all_text
    assert len(dom.images) >= 2  # its reference and mask


def test_products_restrict_the_report_and_unknown_ids_are_refused(report, tmp_path):
    lake, _ = report
    index = write_report(lake, tmp_path / "only", products=["lamp"])
    dom = Dom(index.read_text())
    assert any(h.endswith("products/lamp.html") for h in dom.links) and "mug" not in dom.all_text
    assert sorted(p.name for p in (tmp_path / "only" / "products").iterdir()) == ["lamp.html"]
    with pytest.raises(UserError, match="unknown product id.*nope"):
        write_report(lake, tmp_path / "bad", products=["lamp", "nope"])
