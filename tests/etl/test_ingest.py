import csv
import gzip
import io
import json
import shutil

import numpy as np
import pytest
from deltalake import DeltaTable
from PIL import Image

from core.errors import UserError
from etl.ingest import ingest
from etl.sample_catalog import write_sample_catalog
from core.tables import TABLES
from sample_images import bad_files, encode, photo, unusual_images, write_files


def rows(lake, table, order="product_id"):
    return lake.spark.sql(f"SELECT * FROM {table} ORDER BY {order}").toPandas()


def quarantine_codes(lake):
    return {(r.product_id, r.source_uri.rsplit("/", 1)[-1]): r.reason_code
            for r in rows(lake, "quarantine").itertuples()}


@pytest.fixture
def folder_source(tmp_path):
    root = tmp_path / "catalog"
    write_files(root / "mug", {**unusual_images(), **{n: d for n, (d, _) in bad_files().items()}})
    (root / "mug" / "product.json").write_text(json.dumps(
        {"title": "Enamel mug", "product_type": "mug", "color": "green"}))
    clean = encode(photo(200, 200, seed=11), "PNG")
    write_files(root / "lamp", {"a.png": clean, "copy_of_a.png": clean, "b.jpg": encode(photo(seed=12), "JPEG")})
    (root / "stray.jpg").write_bytes(clean)
    return root


def test_folder_source_keeps_good_rows_and_quarantines_bad_ones(lake, folder_source):
    summary = ingest(lake, folder_source)
    assert summary.products == 2

    products = rows(lake, "products").set_index("product_id")
    assert products.loc["mug", "title"] == "Enamel mug" and products.loc["mug", "product_type"] == "mug"
    assert json.loads(products.loc["mug", "attributes"]) == {"color": "green"}
    assert products.loc["lamp", "title"] == "lamp" and products.loc["lamp", "product_type"] is None

    images = rows(lake, "product_images")
    kept = {uri.rsplit("/", 1)[-1] for uri in images.source_uri}
    assert kept == set(unusual_images()) | {"a.png", "b.jpg"}  # copy_of_a.png is the same image
    assert (images.role == "reference").all()
    for row in images.itertuples():  # the stored bytes decode to the declared size
        assert Image.open(io.BytesIO(row.image)).size == (row.width, row.height)

    codes = quarantine_codes(lake)
    for name, (_, code) in bad_files().items():
        assert codes[("mug", name)] == code
    assert codes[("", "stray.jpg")] == "outside_product_folder"
    assert len(codes) == len(bad_files()) + 1
    reasons = rows(lake, "quarantine")
    assert reasons.reason.str.len().min() > 20 and (reasons.stage == "ingest").all()


def test_reingest_changes_nothing(lake, folder_source):
    ingest(lake, folder_source)
    before = {t: rows(lake, t, ", ".join(TABLES[t].key)) for t in TABLES}
    versions = {t: DeltaTable(lake.location(t)).version() for t in TABLES}
    summary = ingest(lake, folder_source)
    assert summary.rows_written == {"products": 0, "product_images": 0, "quarantine": 0}
    for table, frame in before.items():
        after = rows(lake, table, ", ".join(TABLES[table].key))
        assert after.equals(frame), table  # audit timestamps included: nothing was rewritten
        assert DeltaTable(lake.location(table)).version() == versions[table]


def test_changed_metadata_updates_only_that_product(lake, folder_source):
    ingest(lake, folder_source)
    (folder_source / "mug" / "product.json").write_text(json.dumps({"title": "Green enamel mug"}))
    summary = ingest(lake, folder_source)
    assert summary.rows_written["products"] == 1 and summary.rows_written["product_images"] == 0
    assert rows(lake, "products").set_index("product_id").loc["mug", "title"] == "Green enamel mug"


def test_delta_rs_reads_the_same_tables(lake, folder_source):
    ingest(lake, folder_source)
    for name, table in TABLES.items():
        independent = DeltaTable(lake.location(name)).to_pandas()
        spark_rows = rows(lake, name, ", ".join(table.key))
        assert len(independent) == len(spark_rows), name
        assert len(spark_rows) > 0 or name not in ("products", "product_images", "quarantine")
        key = list(table.key)
        assert (sorted(map(tuple, independent[key].values.tolist()))
                == sorted(map(tuple, spark_rows[key].values.tolist())))
    stored = DeltaTable(lake.location("product_images")).to_pandas().set_index("source_uri")
    plain = unusual_images()["plain.jpg"]
    assert stored.loc[str(folder_source / "mug" / "plain.jpg"), "image"] == plain


def _write_manifest_images(root):
    write_files(root / "img", {"red.png": encode(photo(seed=20), "PNG"), "blue.jpg": encode(photo(seed=21), "JPEG"),
                               "green.png": encode(photo(seed=22), "PNG")})


MANIFEST_ROWS = [
    {"product_id": "p1", "title": "Red chair", "product_type": "chair", "image": "img/red.png", "color": "red"},
    {"product_id": "p1", "title": "", "product_type": "", "image": "img/blue.jpg", "color": ""},
    {"product_id": "p2", "title": "Green vase", "product_type": "vase", "image": "img/green.png", "color": "green"},
    {"product_id": "p2", "title": "Green vase", "product_type": "vase", "image": "img/missing.png", "color": ""},
    {"product_id": "../etc", "title": "x", "product_type": "x", "image": "img/red.png", "color": ""},
    {"product_id": "a/b", "title": "x", "product_type": "x", "image": "img/red.png", "color": ""},
    {"product_id": "bad\x07id", "title": "x", "product_type": "x", "image": "img/red.png", "color": ""},
]


def _check_manifest_result(lake):
    products = rows(lake, "products").set_index("product_id")
    assert list(products.index) == ["p1", "p2"]
    assert products.loc["p1", "title"] == "Red chair"
    assert json.loads(products.loc["p1", "attributes"]) == {"color": "red"}
    images = rows(lake, "product_images")
    assert sorted(images.source_uri.str.rsplit("/", n=1).str[-1]) == ["blue.jpg", "green.png", "red.png"]
    codes = sorted(rows(lake, "quarantine").reason_code)
    assert codes == ["missing_file"] + ["unsafe_product_id"] * 3


def test_csv_manifest(lake, tmp_path):
    _write_manifest_images(tmp_path)
    with open(tmp_path / "catalog.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_ROWS[0]))
        writer.writeheader()
        writer.writerows(MANIFEST_ROWS)
    ingest(lake, tmp_path / "catalog.csv")
    _check_manifest_result(lake)


def test_jsonl_manifest(lake, tmp_path):
    _write_manifest_images(tmp_path)
    (tmp_path / "catalog.jsonl").write_text("\n".join(json.dumps(r) for r in MANIFEST_ROWS))
    ingest(lake, tmp_path / "catalog.jsonl", "manifest")
    _check_manifest_result(lake)


def test_manifest_without_required_columns_is_a_clear_error(lake, tmp_path):
    (tmp_path / "bad.csv").write_text("sku,picture\n1,a.png\n")
    with pytest.raises(UserError, match="missing column.*product_id"):
        ingest(lake, tmp_path / "bad.csv")


def _abo_text(value, tag="en_US"):
    return [{"language_tag": tag, "value": value}]


def test_abo_layout(lake, tmp_path):
    root = tmp_path / "abo"
    (root / "listings" / "metadata").mkdir(parents=True)
    (root / "images" / "metadata").mkdir(parents=True)
    images = {"IMG1": "8c/IMG1.jpg", "IMG2": "8c/IMG2.jpg", "IMG3": "aa/IMG3.jpg"}
    for seed, (image_id, rel) in enumerate(images.items()):  # distinct photos (equal ones would dedupe)
        path = root / "images" / "small" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(photo(seed=seed), "JPEG"))
    with gzip.open(root / "images" / "metadata" / "images.csv.gz", "wt") as fh:
        fh.write("image_id,height,width,path\n")
        fh.writelines(f"{i},240,320,{p}\n" for i, p in images.items())
    listings = [
        {"item_id": "B01", "item_name": _abo_text("Stuhl aus Holz", "de_DE") + _abo_text("Wooden chair"),
         "brand": _abo_text("Rivet"), "product_type": [{"value": "CHAIR"}],
         "main_image_id": "IMG1", "other_image_id": ["IMG2", "IMG_MISSING"]},
        {"item_id": "B02", "item_name": _abo_text("Table lamp"), "product_type": [{"value": "LAMP"}],
         "main_image_id": "IMG3"},
        {"item_id": "B03", "item_name": _abo_text("Bath towel, cotton"), "product_type": [{"value": "HOME_BED_AND_BATH"}]},
    ]
    with gzip.open(root / "listings" / "metadata" / "listings_0.json.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(item) for item in listings))

    summary = ingest(lake, root)  # layout detected
    assert summary.source.startswith("abo:")
    products = rows(lake, "products").set_index("product_id")
    assert products.loc["B01", "title"] == "Wooden chair"  # English preferred
    assert products.loc["B01", "product_type"] == "chair"  # ABO's code, as the class noun prompts use
    assert json.loads(products.loc["B01", "attributes"]) == {"brand": "Rivet", "abo_product_type": "CHAIR"}
    assert products.loc["B02", "product_type"] == "lamp"
    assert products.loc["B03", "product_type"] is None  # a department: the title decides (classify)
    assert rows(lake, "product_images").groupby("product_id").size().to_dict() == {"B01": 2, "B02": 1}
    assert list(rows(lake, "quarantine").reason_code) == ["unknown_image_id"]


def test_sample_catalog(lake, tmp_path):
    catalog = write_sample_catalog(tmp_path / "samples")
    summary = ingest(lake, catalog)
    assert (summary.products, summary.images_ok, summary.rejected) == (4, 5, 0)
    images = rows(lake, "product_images").set_index("product_id")
    gift = images.loc["gift-box"]
    assert bool(gift.has_alpha)
    from matplotlib import cbook

    with cbook.get_sample_data("Minduka_Present_Blue_Pack.png") as fh:
        original_alpha = np.asarray(Image.open(fh).convert("RGBA"))[..., 3]
    stored_alpha = np.asarray(Image.open(io.BytesIO(gift.image)).getchannel("A"))
    assert np.array_equal(stored_alpha, original_alpha)
    assert rows(lake, "products").set_index("product_id").loc["motorcycle", "product_type"] == "motorcycle"


def test_unsafe_folder_names_are_quarantined(lake, tmp_path):
    root = tmp_path / "catalog"
    write_files(root / "ok", {"a.png": encode(photo(seed=30), "PNG")})
    write_files(root / "bad\x01name", {"a.png": encode(photo(seed=31), "PNG")})
    ingest(lake, root)
    assert list(rows(lake, "products").product_id) == ["ok"]
    assert list(rows(lake, "quarantine").reason_code) == ["unsafe_product_id"]


def test_missing_source_is_a_user_error(lake, tmp_path):
    with pytest.raises(UserError, match="source not found"):
        ingest(lake, tmp_path / "nope")


def test_new_product_is_added_without_touching_others(lake, folder_source):
    ingest(lake, folder_source)
    before = rows(lake, "product_images", "image_id")
    write_files(folder_source / "vase", {"v.png": encode(photo(seed=40), "PNG")})
    summary = ingest(lake, folder_source)
    assert summary.rows_written == {"products": 1, "product_images": 1, "quarantine": 0}
    after = rows(lake, "product_images", "image_id")
    assert after[after.product_id != "vase"].reset_index(drop=True).equals(before)
    shutil.rmtree(folder_source / "vase")
