"""Prompt bank: curation with the real MiniLM, generation with the real SmolLM2 and with an
OpenAI-compatible endpoint on loopback, review commands, and product-type classification."""

import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pandas as pd
import pytest
from deltalake import DeltaTable

from etl.config import PromptBankSettings, Settings
from etl.errors import UserError
from etl.ingest import ingest
from etl.pipeline import SCORING, run_stages
from etl.prompt_bank import (approved_prompts, curate, export_csv, import_csv, run_classify, run_prompt_bank,
                             set_status)
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
    settings = PromptBankSettings(scenes_per_type=4, targets_per_type=2, max_new_tokens=120)
    zoo = ModelZoo.from_settings(lake.settings)
    written = run_prompt_bank(lake, zoo, settings)
    bank = DeltaTable(lake.location("prompt_bank")).to_pandas()
    assert written["prompt_bank"] == len(bank) > 0
    assert set(bank.product_type) == {"mug"} and set(bank.purpose) == {"scene", "target"}
    assert set(bank.llm) == {"SmolLM2-135M-Instruct.Q4_1"}
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
                                      api_key_env="TEST_LLM_KEY")
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
    run_stages(lake, SCORING, zoo, progress=lambda _: None)
    written = run_classify(lake, zoo)
    assert written == {"product_classes": 3, "quarantine": 0}
    classes = DeltaTable(lake.location("product_classes")).to_pandas().set_index("product_id")
    assert (classes.loc["by-title", "product_type"], classes.loc["by-title", "source"]) == ("mug", "metadata")
    assert (classes.loc["by-attribute", "product_type"], classes.loc["by-attribute", "source"]) == ("lamp", "metadata")
    unknown = classes.loc["unknown"]
    assert unknown.source == "clip_zero_shot" and unknown.product_type in ("mug", "vase")
    assert unknown.backbone == "tiny-clip" and -1 <= unknown.score <= 1
    assert run_classify(lake, zoo) == {"product_classes": 0, "quarantine": 0}
