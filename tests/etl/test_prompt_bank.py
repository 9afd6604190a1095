"""Prompt bank: curation with the real MiniLM, generation with the real SmolLM2 and with an
OpenAI-compatible endpoint on loopback, review commands, and product-type classification."""

import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pandas as pd
import pytest
from deltalake import DeltaTable

from core.settings import PromptBankSettings, Settings
from core.errors import UserError
from etl.ingest import ingest
from jobs.steps import SCORING, run_steps
from etl.prompt_bank import (UNKNOWN, approved_prompts, curate, degenerate, export_csv, import_csv, run_classify,
                             run_prompt_bank, seed_prompts, seed_types, set_status, set_type)
from sample_images import encode, product_shot, write_files
from udfs.zoo import ModelZoo


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return ModelZoo.from_settings(Settings.load(tiny_models / "unused")).load("sentence")


def test_curation_rejects_what_it_should(encoder):
    candidates = [
        "a sunlit marble kitchen counter beside a window",      # fine
        "Kitchen",                                               # too short
        "a wooden cafe table by the window",                     # fine
        "a wooden café table near the window",                   # near-duplicate of the one above
        "next to a red motorcycle in a garage",                  # names another product type
        "a shelf in a Rivet showroom",                           # names a catalog brand
        "on the desk of Taylor Swift in her studio",            # names a person
        "quantum entanglement lecture about particle spin",      # implausible for a coffee cup
        " ".join(["word"] * 45),                                 # too long
    ]
    result = curate(candidates, "coffee cup", ["motorcycle", "gift box"], {"Rivet"}, encoder, PromptBankSettings())
    status = {text: (s, r) for text, s, r in result}
    assert status["a sunlit marble kitchen counter beside a window"] == ("approved", None)
    assert status["a wooden cafe table by the window"] == ("approved", None)
    reasons = [r for _, _, r in result]
    assert reasons[1].startswith("too short")
    assert reasons[3].startswith("near-duplicate") and "wooden cafe table" in reasons[3]
    assert reasons[4] == "names another product type (motorcycle)"
    assert reasons[5] == "names a brand (Rivet)"
    assert reasons[6] == "names a person or brand (Taylor Swift)"
    assert reasons[7].startswith("implausible for a coffee cup")
    assert reasons[8].startswith("too long")
    assert curate(candidates, "coffee cup", ["motorcycle", "gift box"], {"Rivet"}, encoder,
                  PromptBankSettings()) == result  # deterministic


def test_pending_when_auto_approve_is_off(encoder):
    result = curate(["a sunlit marble kitchen counter"], "coffee cup", [], set(), encoder,
                    PromptBankSettings(auto_approve=False))
    assert result == [("a sunlit marble kitchen counter", "pending", None)]


@pytest.fixture
def one_mug(lake, tmp_path):
    write_files(tmp_path / "catalog" / "mug-1", {"a.png": encode(product_shot(seed=1), "PNG")})
    (tmp_path / "catalog" / "mug-1" / "product.json").write_text(json.dumps({"title": "Mug", "product_type": "mug"}))
    ingest(lake, tmp_path / "catalog")
    return lake


def test_local_llm_fills_the_bank_once(one_mug):
    lake = one_mug
    settings = PromptBankSettings(scenes_per_type=4, targets_per_type=2, max_new_tokens=120, min_scenes=0,
                                  min_targets=0)
    zoo = ModelZoo.from_settings(lake.settings)
    model = zoo.load("llm").model
    generate, batches = model.generate, []
    model.generate = lambda **kw: batches.append(len(kw["input_ids"])) or generate(**kw)  # counts the calls
    try:
        written = run_prompt_bank(lake, zoo, settings)
    finally:
        del model.generate
    assert batches == [2]  # one round, the scene and the target question in one batch
    bank = DeltaTable(lake.location("prompt_bank")).to_pandas()
    assert written["prompt_bank"] == len(bank) > 0
    assert set(bank.product_type) == {"mug"} and set(bank.purpose) == {"scene", "target"}
    assert set(bank.llm) == {"SmolLM2-135M-Instruct.Q4_1"} and set(bank.source) == {"llm"}
    assert bank[bank.status == "rejected"].reason.notna().all()
    assert bank[bank.status == "approved"].reason.isna().all()
    version = DeltaTable(lake.location("prompt_bank")).version()
    assert run_prompt_bank(lake, zoo, settings) == {"prompt_bank": 0}  # cached: no LLM call, no write
    assert DeltaTable(lake.location("prompt_bank")).version() == version


class _ChatServer(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatServer.requests.append((self.path, self.headers.get("Authorization"), body))
        answer = "Here you go:\n1. a rustic oak breakfast table\n2. a marble counter by a sunny window\n" \
                 "3. a picnic blanket in a green park"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_openai_compatible_endpoint(one_mug, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _ChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TEST_LLM_KEY", "secret")
    try:
        settings = PromptBankSettings(endpoint=f"http://127.0.0.1:{server.server_port}/v1", endpoint_model="served",
                                      api_key_env="TEST_LLM_KEY", min_scenes=3, min_targets=0)
        run_prompt_bank(one_mug, ModelZoo.from_settings(one_mug.settings), settings, seed=7)
    finally:
        server.shutdown()
    path, auth, body = _ChatServer.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer secret"
    assert body["model"] == "served" and body["seed"] == 7 and "mug" in body["messages"][-1]["content"]
    scenes = approved_prompts(one_mug, "scene")
    assert sorted(scenes.text) == ["a marble counter by a sunny window", "a picnic blanket in a green park",
                                   "a rustic oak breakfast table"]


def test_review_round_trip(lake, tmp_path):
    rows = pd.DataFrame({"product_type": ["mug"] * 3, "purpose": ["scene"] * 3, "status": ["approved"] * 3,
                         "text": ["a marble counter", "a wooden desk at dusk", "a picnic blanket in a park"]})
    rows.to_csv(tmp_path / "new.csv", index=False)
    assert import_csv(lake, tmp_path / "new.csv") == 3
    assert export_csv(lake, tmp_path / "review.csv") == 3
    with open(tmp_path / "review.csv") as fh:
        review = list(csv.DictReader(fh))
    review[0]["status"], review[0]["reason"] = "rejected", "too plain"
    with open(tmp_path / "review.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(review[0]))
        writer.writeheader()
        writer.writerows(review)
    assert import_csv(lake, tmp_path / "review.csv") == 1  # only the changed row is written
    bank = DeltaTable(lake.location("prompt_bank")).to_pandas().set_index("prompt_id")
    assert bank.loc[review[0]["prompt_id"], "status"] == "rejected"
    assert bank.loc[review[0]["prompt_id"], "reason"] == "too plain"
    assert set(bank.reviewed_by) == {"human"} and set(bank.llm) == {"human"}

    set_status(lake, [review[1]["prompt_id"]], "pending")
    assert list(approved_prompts(lake, "scene").prompt_id) == [review[2]["prompt_id"]]
    with pytest.raises(UserError, match="unknown prompt id"):
        set_status(lake, ["nope"], "approved")
    with pytest.raises(UserError, match="status must be one of"):
        set_status(lake, [review[1]["prompt_id"]], "maybe")


def test_classification_from_metadata_then_zero_shot(lake, tmp_path):
    root = tmp_path / "catalog"
    for product_id, meta in {"typed": {"product_type": "mug"}, "vase-1": {"product_type": "vase"},
                             "by-title": {"title": "Large blue mug with handle"},
                             "by-attribute": {"title": "Thing", "category": "lamp"},
                             "unknown": {"title": "Item 42"}}.items():
        write_files(root / product_id, {"a.png": encode(product_shot(seed=len(product_id)), "PNG")})
        (root / product_id / "product.json").write_text(json.dumps(meta))
    ingest(lake, root)
    zoo = ModelZoo.from_settings(lake.settings)
    run_steps(lake, SCORING, zoo, progress=lambda _: None)
    written = run_classify(lake, zoo)
    assert written == {"product_classes": 3, "quarantine": 1}
    classes = DeltaTable(lake.location("product_classes")).to_pandas().set_index("product_id")
    by_title = classes.loc["by-title"]  # "mug" is the head of the title's noun phrase
    assert (by_title.product_type, by_title.source, by_title.backbone) == ("mug", "title_head", "all-MiniLM-L6-v2")
    assert 0.5 <= by_title.score < 1.0  # a heuristic's confidence, never certain
    assert (classes.loc["by-attribute", "product_type"], classes.loc["by-attribute", "source"]) == ("lamp", "attribute")
    unknown = classes.loc["unknown"]
    # Random tiny-CLIP scores sit below the calibrated minimum: unknown, never a guessed type.
    assert unknown.source == "clip_zero_shot" and unknown.product_type == UNKNOWN
    assert unknown.backbone == "tiny-clip" and -1 <= unknown.score < lake.settings.prompt_bank.min_zero_shot_score
    review = DeltaTable(lake.location("quarantine")).to_pandas()
    assert list(review.reason_code) == ["unknown_type"] and "prompts set-type unknown" in review.reason[0]
    assert run_classify(lake, zoo) == {"product_classes": 0, "quarantine": 0}
    assert set_type(lake, "unknown", "mug") == 1  # a person assigns the type; the review row goes
    classes = DeltaTable(lake.location("product_classes")).to_pandas().set_index("product_id")
    assert (classes.loc["unknown", "product_type"], classes.loc["unknown", "source"]) == ("mug", "human")
    assert DeltaTable(lake.location("quarantine")).to_pandas().empty
    with pytest.raises(UserError, match="unknown product"):
        set_type(lake, "nope", "mug")
    with pytest.raises(UserError, match=r"not a brand \(iPhone\)"):
        set_type(lake, "unknown", "iPhone")


DEGENERATE = [  # approved by the curation before it checked for loops and adjective piles
    "The humble, humble, humble, humble, humble, humble, humble, humble. The humble, humble, humble chair in a "
    "room is",
    "a luxurious, luxurious chair is a luxury item",
    "High-end, luxury, expensive",
]
REALISTIC_SCENES = [
    "on a white marble kitchen counter, soft morning light from a window",
    "a sunlit reading nook with a wool throw and a potted plant",
    "on a weathered wooden workbench in a tidy garage",
    "a minimalist living room with light oak floors at dusk",
    "on a picnic blanket in a green park on a summer afternoon",
]


def test_curation_rejects_degenerate_text_and_keeps_real_scenes(encoder):
    settings = PromptBankSettings()
    result = curate(DEGENERATE + REALISTIC_SCENES, "chair", ["coffee cup"], set(), encoder, settings)
    status = dict(((t, (st, why)) for t, st, why in result))
    assert [st for t, (st, _) in status.items() if t in REALISTIC_SCENES] == ["approved"] * len(REALISTIC_SCENES)
    reasons = [why for t, (st, why) in status.items() if t not in REALISTIC_SCENES]
    assert reasons[0] == "degenerate: repeats 'humble' three times in a row"
    assert reasons[1].startswith("degenerate: repeats 'luxurious' 3 times")
    assert reasons[2].startswith("degenerate: mostly adjectives")
    assert degenerate("on a tall oak shelf beside a tall oak door, tall ceiling", settings).startswith(
        "degenerate: repeats 'tall' 3 times")
    assert degenerate("one two three four one two one two one two", settings).startswith("degenerate")
    [(_, status_, why)] = curate(["a bright and cheerful mood"], "chair", [], set(), encoder, settings)
    assert status_ == "rejected" and why.startswith("names no setting")


def test_the_seed_bank_is_curated_data(encoder):
    types = seed_types()
    assert len(types) >= 20 and {"coffee cup", "motorcycle", "rocket", "gift box"} <= set(types)
    assert len(seed_prompts(None, "scene")) >= 15 and seed_prompts(None, "target")
    settings = PromptBankSettings()
    for product_type in types:
        scenes, targets = seed_prompts(product_type, "scene"), seed_prompts(product_type, "target")
        assert len(scenes) >= 15 and targets, product_type
        others = [t for t in types if t != product_type]
        for purpose, prompts in (("scene", scenes), ("target", targets)):
            rejected = [(t, why) for t, st, why in curate(prompts, product_type, others, set(), encoder, settings,
                                                          purpose) if st != "approved"]
            assert not rejected, (product_type, rejected)
    generic = curate(seed_prompts(None, "scene"), UNKNOWN, types, set(), encoder, settings)
    assert all(st == "approved" for _, st, _ in generic), [r for r in generic if r[1] != "approved"]


def test_an_unattended_bank_reaches_its_minimum_then_falls_back_to_generic_scenes(one_mug):
    """A type the seed bank lacks, an LLM that keeps giving the same three scenes: it is asked
    `llm_rounds` times, then the generic seed scenes fill the bank up to `min_scenes`."""
    server = HTTPServer(("127.0.0.1", 0), _ChatServer)
    _ChatServer.requests.clear()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = PromptBankSettings(endpoint=f"http://127.0.0.1:{server.server_port}/v1", min_scenes=8,
                                      min_targets=0, llm_rounds=3)
        run_prompt_bank(one_mug, ModelZoo.from_settings(one_mug.settings), settings)
    finally:
        server.shutdown()
    scene_requests = [r for r in _ChatServer.requests if "places or surfaces" in r[2]["messages"][-1]["content"]]
    assert len(scene_requests) == 3 and len({r[2]["seed"] for r in scene_requests}) == 3  # new seed each round
    bank = DeltaTable(one_mug.location("prompt_bank")).to_pandas()
    scenes = bank[(bank.purpose == "scene") & (bank.status == "approved")]
    assert len(scenes) >= 8 and set(scenes.source) == {"llm", "seed"}
    assert set(scenes[scenes.source == "seed"].text) <= set(seed_prompts(None, "scene"))
    assert bank[bank.source == "seed"].llm.isna().all()
    for text in bank[bank.status == "approved"].text:
        words = text.lower().split()
        assert not any(a == b == c for a, b, c in zip(words, words[1:], words[2:])), text


def test_untyped_folder_catalog_gets_scenes_and_outpaints(lake, tmp_path):
    """No product.json anywhere: classification says unknown (tiny CLIP), the generic seed scenes
    fill the bank, and every product is outpainted; no no_approved_scenes quarantine row."""
    root = tmp_path / "catalog"
    for n, product_id in enumerate(["sku-1001", "sku-1002"]):
        write_files(root / product_id, {"a.png": encode(product_shot(seed=n + 3), "PNG")})
    ingest(lake, root)
    zoo = ModelZoo.from_settings(lake.settings)
    run_steps(lake, [*SCORING, "classify", "prompt_bank", "outpaint"], zoo, progress=lambda _: None)
    quarantine = DeltaTable(lake.location("quarantine")).to_pandas()
    assert "no_approved_scenes" not in set(quarantine.reason_code)
    assert set(quarantine[quarantine.reason_code == "unknown_type"].product_id) == {"sku-1001", "sku-1002"}
    synthetic = DeltaTable(lake.location("synthetic_images")).to_pandas()
    assert set(synthetic[synthetic.kind == "outpaint"].product_id) == {"sku-1001", "sku-1002"}
    bank = DeltaTable(lake.location("prompt_bank")).to_pandas()
    assert set(bank.product_type) == {UNKNOWN} and set(bank.source) == {"seed"}  # no LLM asked about "unknown"


def test_a_new_prompt_with_degenerate_or_too_short_text_is_refused_whole(lake, tmp_path):
    """A person's new prompt (`prompts import`, the review console) meets the curation's text checks:
    the whole review is refused naming the rows, unless the row is rejected."""
    rows = pd.DataFrame({"product_type": ["mug"] * 3, "purpose": ["scene"] * 3, "status": ["approved"] * 3,
                         "text": ["a marble kitchen counter", "a desk desk desk by the window", "counter"]})
    rows.to_csv(tmp_path / "new.csv", index=False)
    with pytest.raises(UserError, match=r"row 3: .*three times.*row 4: too short") as refused:
        import_csv(lake, tmp_path / "new.csv")
    assert "nothing was imported" in str(refused.value)
    assert lake.spark.sql("SELECT count(*) AS n FROM prompt_bank").first()["n"] == 0
    rows.loc[1:, "status"] = "rejected"
    rows.to_csv(tmp_path / "new.csv", index=False)
    assert import_csv(lake, tmp_path / "new.csv") == 3
