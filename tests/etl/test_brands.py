"""Brand refusal (etl/brands.py): across case, plurals, possessives and punctuation, in the
prompt bank's curation, people's prompts and `recontext imagine` before anything starts."""

import pandas as pd
import pytest

from etl.brands import brand_in
from etl.prompt_text import scene_text_refusal
from core.settings import PromptBankSettings
from core.errors import UserError
from etl.prompt_bank import _seed_bank, import_csv, set_status, text_refusal
from jobs.cli import main


@pytest.mark.parametrize("text, found", [
    ("next to a nike shoe", "nike"), ("NIKES on a shelf", "NIKES"), ("beside a Nike's box", "Nike"),
    ("beside an iphone on a desk", "iphone"), ("two iPhones on a table", "iPhones"),
    ("in a starbucks cafe", "starbucks"), ("a coca-cola crate", "coca cola"), ("a cocacola crate", "cocacola"),
    ("beside a play station", "play station"), ("a hermès scarf on a chair", "hermes"),
    ("l'oreal bottles on a vanity", "loreal"), ("on a lego castle", "lego"),
    ("next to an Apple laptop", "Apple"), ("a GAP hoodie on a chair", "GAP"), ("beside a Target store", "Target"),
])
def test_brands_are_found_however_written(text, found):
    assert brand_in(text) == found


@pytest.mark.parametrize("text", [
    "an apple on a plate", "a dove on the windowsill", "Shell on the sand", "a gap in the fence",
    "a likeable kitchen", "on a swatch of fabric", "an off-white wall", "in a sunlit kitchen on a marble counter",
])
def test_ordinary_words_pass(text):
    assert brand_in(text) is None


def test_the_shipped_seed_prompts_name_no_brand():
    bank = _seed_bank()
    texts = [t for entry in [bank["generic"], *bank["types"].values()] for k in ("scenes", "targets")
             for t in entry.get(k, [])]
    assert len(texts) > 500 and [t for t in texts if brand_in(t)] == []


def test_user_list_catalog_brands_and_the_own_brand_setting():
    settings = PromptBankSettings(brands=("Stone & Beam",))
    assert text_refusal("on a stone and beam shelf", "vase", [], set(), settings) is None  # "and" is not "&"
    assert text_refusal("on a STONE & BEAM shelf", "vase", [], set(), settings) == "names a brand (STONE BEAM)"
    assert text_refusal("on a rivet display shelf", "vase", [], {"Rivet"}, settings) == "names a brand (rivet)"
    assert text_refusal("on a rivet display shelf", "vase", [], {"Rivet"}, settings, ("Rivet",)) is None
    assert scene_text_refusal("next to a nike shoe", PromptBankSettings()) == "names a brand (nike)"


def test_peoples_prompts_naming_a_brand_are_refused(lake, tmp_path):
    rows = pd.DataFrame({"product_type": ["mug"] * 3, "purpose": ["scene"] * 3,
                         "status": ["approved", "approved", "rejected"],
                         "text": ["a marble counter", "next to a nike shoe box", "an adidas bag on a bench"]})
    rows.to_csv(tmp_path / "new.csv", index=False)
    with pytest.raises(UserError, match=r"row 3: names a brand \(nike\)") as refused:
        import_csv(lake, tmp_path / "new.csv")
    assert "adidas" not in str(refused.value)  # a rejected row may name one: it is never used
    rows.loc[1, "status"] = "rejected"
    rows.to_csv(tmp_path / "new.csv", index=False)
    assert import_csv(lake, tmp_path / "new.csv") == 3
    bank = lake.spark.sql("SELECT prompt_id, text FROM prompt_bank").toPandas().set_index("text").prompt_id
    with pytest.raises(UserError, match=r"names a brand \(adidas\)"):  # approving it later is refused too
        set_status(lake, [bank["an adidas bag on a bench"]], "approved")


@pytest.mark.parametrize("scene, brand", [("next to a nike shoe", "nike"), ("beside an iphone", "iphone")])
def test_imagine_refuses_a_brand_before_anything_starts(tmp_path, capsys, scene, brand):
    (tmp_path / "home" / "lakehouse").mkdir(parents=True)  # a home: had the engine started, it would hold tables
    assert main(["--home", str(tmp_path / "home"), "imagine", "any-product", scene]) == 2
    err = capsys.readouterr().err
    assert f"names a brand ({brand})" in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "home" / "lakehouse").iterdir())  # no engine, no tables


def test_the_service_answers_a_brand_in_lower_case_with_a_refusal(lake):
    """recontext-service's predict (what `mlflow models serve` calls): HTTP 400 naming the brand."""
    from mlflow.exceptions import MlflowException

    from jobs.service import RecontextService
    from training.imagine import Imaginer

    service = RecontextService()
    service.imaginer = Imaginer(lake)
    with pytest.raises(MlflowException, match=r"names a brand \(iphone\)") as refused:
        service.predict(None, pd.DataFrame([{"product_id": "coffee-cup", "scene": "beside an iphone", "n": 2}]))
    assert refused.value.get_http_status_code() == 400


def test_training_captions_lose_brands_unless_the_own_brand_is_allowed(lake, tmp_path):
    import json

    from deltalake import DeltaTable

    from core.settings import Settings
    from etl.ingest import ingest
    from etl.lakehouse import Lakehouse
    from jobs.steps import SCORING, run_steps
    from sample_images import encode, product_shot, write_files
    from udfs.zoo import ModelZoo

    write_files(tmp_path / "catalog" / "shoe", {"a.png": encode(product_shot(seed=5), "PNG")})
    (tmp_path / "catalog" / "shoe" / "product.json").write_text(json.dumps({"product_type": "sneaker",
                                                                            "brand": "Rivet"}))
    ingest(lake, tmp_path / "catalog")
    zoo = ModelZoo.from_settings(lake.settings)
    run_steps(lake, SCORING, zoo, progress=lambda _: None)
    captions = lake.spark.sql("SELECT * FROM captions").toPandas()
    lake.upsert_rows("captions", captions.assign(caption="a nike shoe beside a Rivet box, soft light"))

    def training_captions(on):
        run_steps(on, ["training_set"], zoo, progress=lambda _: None)
        return set(DeltaTable(on.location("training_images")).to_pandas().caption)

    assert training_captions(lake) == {"a shoe beside a box, soft light"}
    own = Lakehouse(Settings.load(lake.settings.home, models={"tiny_dir": lake.settings.models.tiny_dir},
                                  prompt_bank={"allow_own_brand": True}))
    assert training_captions(own) == {"a shoe beside a Rivet box, soft light"}  # its own brand, by setting


def test_a_products_own_brand_passes_its_own_requests_only_by_setting(lake, tmp_path):
    import json

    from core.settings import Settings
    from etl.ingest import ingest
    from etl.lakehouse import Lakehouse
    from etl.prompt_bank import scene_refusal
    from sample_images import encode, product_shot, write_files

    for n, (product_id, brand) in enumerate({"vase-r": "Rivet", "vase-a": "Acme"}.items()):
        write_files(tmp_path / "catalog" / product_id, {"a.png": encode(product_shot(seed=n), "PNG")})
        (tmp_path / "catalog" / product_id / "product.json").write_text(json.dumps({"product_type": "vase",
                                                                                    "brand": brand}))
    ingest(lake, tmp_path / "catalog")
    scene = "beside a Rivet gift bag on a shelf"
    assert scene_refusal(lake, scene, "vase", "vase-r") == "names a brand (Rivet)"
    own = Lakehouse(Settings.load(lake.settings.home, prompt_bank={"allow_own_brand": True}))
    assert scene_refusal(own, scene, "vase", "vase-r") is None
    assert scene_refusal(own, scene, "vase", "vase-a") == "names a brand (Rivet)"  # another product's brand
    assert scene_refusal(own, "beside a nike shoe on a shelf", "vase", "vase-r") == "names a brand (nike)"
