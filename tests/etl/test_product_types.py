"""Product typing from titles and catalog attributes (etl/product_types.py), with the real
all-MiniLM-L6-v2, and `recontext run ingest references classify` on untyped products."""

import json

import pytest

from core.settings import PromptBankSettings, Settings
from etl.brands import brand_in
from etl.product_types import MemoEncoder, catalog_type, head_phrase, type_from_attributes, type_from_title
from etl.prompt_bank import seed_types
from homes import delta_rows
from sample_images import encode, product_shot, recontext, write_files
from udfs.zoo import ModelZoo


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return MemoEncoder(ModelZoo.from_settings(Settings.load(tiny_models / "unused")).load("sentence"))


def typed(title, encoder, known=None):
    found = type_from_title(title, known or seed_types(), encoder, PromptBankSettings(), brand_in)
    return (found.product_type, found.source) if found else None


def test_a_known_type_named_only_as_a_modifier_is_not_the_type(encoder):
    # The old substring match typed each of these as the modifier (laptop, camera, chair, boot, wristwatch).
    assert typed("Laptop sleeve", encoder) == ("laptop sleeve", "title_open")
    assert typed("Camera strap, adjustable", encoder) == ("camera strap", "title_open")
    assert typed("Boot tray", encoder) == ("boot tray", "title_open")
    assert typed("Wristwatch winder box", encoder) == ("winder box", "title_open")
    assert typed("Gift box for a wristwatch", encoder) == ("gift box", "title_head")
    assert typed("Backpack with laptop sleeve", encoder) == ("backpack", "title_head")


def test_head_nouns_plurals_hyphens_and_synonyms(encoder):
    assert typed("Set of 6 espresso mugs", encoder, ["mug", "coffee cup"]) == ("mug", "title_head")
    assert typed("Chef knives (pair)", encoder) == ("chef knife", "title_open")
    assert typed("Kitchen knives, stainless", encoder) == ("kitchen knife", "title_head")
    assert typed("Tie-dye t-shirts - 3 pack", encoder) == ("t-shirt", "title_head")
    assert typed("Mobile phone, 64 GB", encoder) == ("smartphone", "title_similarity")  # a synonym, MiniLM
    assert typed("Samsung Galaxy", encoder) == ("smartphone", "title_similarity")
    assert typed("Balenciaga", encoder) is None  # a brand is never a type, even an open one
    assert type_from_title("Balenciaga", seed_types(), encoder, PromptBankSettings()).product_type == "balenciaga"
    assert typed("Reloj de pulsera", encoder) is None  # another language: the images decide
    assert typed("Item 7", encoder) is None and typed("SKU-1234", encoder) is None
    assert head_phrase("Cordless power drill with 2 batteries") == ["cordless", "power", "drill"]


def test_title_decisions_carry_a_confidence_below_one(encoder):
    for title in ("Backpack", "Ceramic coffee cup", "Laptop sleeve, 13 inch", "Mobile phone"):
        found = type_from_title(title, seed_types(), encoder, PromptBankSettings())
        assert found is not None and 0.5 <= found.score < 1.0, (title, found)
    strict = PromptBankSettings(min_title_score=0.95)
    assert type_from_title("Laptop sleeve", seed_types(), encoder, strict) is None  # below the threshold: none


def test_catalog_attributes_in_another_vocabulary_are_mapped():
    assert catalog_type("CHAIR") == "chair" and catalog_type("CELLULAR_PHONE_CASE") == "phone case"
    assert catalog_type("HOME_BED_AND_BATH") is None  # a department names no one type
    assert catalog_type("GARDEN_HOSE") == "garden hose"  # unlisted codes are spelled out
    assert catalog_type("table lamp") == "table lamp"
    assert type_from_attributes(json.dumps({"category": "SOFA"})).product_type == "sofa"
    assert type_from_attributes({"abo_product_type": "HOME_BED_AND_BATH"}) is None


def test_run_classifies_untyped_products_from_their_titles(tmp_path, tiny_models):
    """`recontext run ingest references classify` on a catalog that gives no types."""
    titles = {"sleeve": "Laptop sleeve, 13 inch", "backpack": "Backpack with laptop sleeve",
              "cushion": "Chair cushion with ties", "gift": "Gift box for a wristwatch"}
    for n, (product_id, title) in enumerate(titles.items()):
        write_files(tmp_path / "catalog" / product_id, {"a.png": encode(product_shot(seed=n), "PNG")})
        (tmp_path / "catalog" / product_id / "product.json").write_text(json.dumps({"title": title}))
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'[ingest]\nsources = ["{tmp_path / "catalog"}"]\n'
                                      f'[models]\ntiny_dir = "{tiny_models}"\n')
    result = recontext("run", "ingest", "references", "classify", home=home)
    assert result.returncode == 0, result.stderr
    classes = {r["product_id"]: r for r in delta_rows(home, "product_classes", ["product_id", "product_type",
                                                                                 "source", "score"])}
    assert classes["sleeve"]["product_type"] in ("laptop sleeve", "unknown")
    assert classes["backpack"]["product_type"] == "backpack"
    assert classes["cushion"]["product_type"] in ("chair cushion", "unknown")
    assert classes["gift"]["product_type"] == "gift box"
    for row in classes.values():
        assert row["source"].startswith("title_") and row["score"] < 1.0, row  # a heuristic is never certain
