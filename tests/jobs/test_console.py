"""The review console (`recontext console`), started as a user starts it on a copy of the demo home
and used in a real headless Chromium (Debian's, driven by Playwright): approve a scene, assign a
type, promote a candidate adapter, rate an image with the keyboard; then the Delta tables, read by
delta-rs in another process, hold exactly those writes. Also: what it refuses. The tests save a
screenshot of every page under docs/console/."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from homes import copy_home, delta_rows
from sample_images import cli_env

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
ANSWER_KEYS = "12341213"  # yes maybe no unclear yes maybe yes no, one key per question
ANSWERS = ("yes", "maybe", "no", "unclear")
TABLES = ("prompt_bank", "product_classes", "quarantine", "promotions", "human_ratings", "adapters", "products")


def versions(home: Path) -> dict[str, int]:
    """Each table's Delta version, read by delta-rs (version() alone does not read data)."""
    code = ("import json, os, sys\nfrom deltalake import DeltaTable\n"
            f"v = {{t: DeltaTable({str(home / 'lakehouse')!r} + '/' + t).version() for t in {TABLES!r}}}\n"
            "sys.stdout.write(json.dumps(v)); sys.stdout.flush(); os._exit(0)\n")
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def keyed(home: Path, table: str, key: list[str], columns: list[str]) -> dict[tuple, dict]:
    return {tuple(r[k] for k in key): r for r in delta_rows(home, table, key + columns)}


def registry(home: Path, code: str) -> str:
    """The last line `code` prints, run in another process with `client`, an MlflowClient on the
    home's registry."""
    store = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    prelude = (f"import mlflow\nmlflow.set_tracking_uri({store!r})\nmlflow.set_registry_uri({store!r})\n"
               "client = mlflow.MlflowClient()\n")
    ran = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=cli_env())
    assert ran.returncode == 0, ran.stderr
    return ran.stdout.split()[-1]


@pytest.fixture(scope="module")
def console(demo_home, tmp_path_factory):
    """A copy of the demo home with one candidate adapter (a second registered version of
    coffee-cup's adapter, as a retraining registers one), and `recontext console` serving it."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); the console is checked in a browser")
    home = copy_home(demo_home, tmp_path_factory.mktemp("console") / "home")
    made = registry(home, "v = client.get_model_version('recontext-coffee-cup', '1')\n"
                          "print(client.create_model_version('recontext-coffee-cup', v.source, v.run_id).version)")
    assert made == "2"
    server = subprocess.Popen([sys.executable, "-m", "jobs.cli", "--home", str(home), "console", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        line = server.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", line)
        assert found, f"no URL printed: {line!r} {server.stderr.read() if server.poll() is not None else ''}"
        yield home, found.group(1), found.group(2)
    finally:
        server.terminate()
        server.wait(timeout=60)


def request(url: str, method: str = "GET", cookie: str | None = None, headers: dict | None = None,
            body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    ask = urllib.request.Request(url, data=data, method=method, headers={
        **({"Cookie": f"recontext_console={cookie}"} if cookie else {}), "Content-Type": "application/json",
        **(headers or {})})
    try:
        with urllib.request.urlopen(ask, timeout=120) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_refuses_requests_without_token_forged_writes_and_paths(console):
    home, base, token = console
    before = versions(home)
    # No token, a wrong one: refused, pages and images alike.
    assert request(f"{base}/")[0] == 403
    assert request(f"{base}/prompts?token=wrong")[0] == 403
    assert request(f"{base}/", cookie="wrong")[0] == 403
    image_id = delta_rows(home, "product_images", ["image_id"])[0]["image_id"]
    assert request(f"{base}/image/{image_id}")[0] == 403
    status, png = request(f"{base}/image/{image_id}", cookie=token)
    assert status == 200 and (png[:4] == b"\x89PNG" or png[:3] == b"\xff\xd8\xff")
    # A forged write: the session's cookie but no CSRF token, or a wrong one.
    prompt = next(r for r in delta_rows(home, "prompt_bank", ["prompt_id", "status"]) if r["status"] == "rejected")
    write = {"prompt_id": prompt["prompt_id"], "status": "approved"}
    assert request(f"{base}/api/prompts/status", "POST", cookie=token, body=write)[0] == 403
    assert request(f"{base}/api/prompts/status", "POST", cookie=token, body=write,
                   headers={"X-CSRF-Token": "guessed"})[0] == 403
    # Images by id only: paths, inside the home or outside it, are not found.
    for path in ["/image/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/image/%2Fetc%2Fpasswd", "/image/../../etc/passwd",
                 f"/image/{'..%2F' * 8}{str(home / 'config.toml').lstrip('/').replace('/', '%2F')}",
                 f"/image/{image_id}%2F..%2F..%2Fconfig.toml", "/validation/..%2F..%2Fmlflow.db/0",
                 "/static/../../../../etc/passwd"]:
        status, body = request(base + path, cookie=token)
        assert status == 404 and b"root:" not in body and b"[prompt_bank]" not in body, path
    # No SQL from the browser: there is no endpoint that takes it.
    csrf = re.search(rb'name="csrf-token" content="([^"]+)"', request(f"{base}/", cookie=token)[1]).group(1).decode()
    assert request(f"{base}/api/sql", "POST", cookie=token, headers={"X-CSRF-Token": csrf},
                   body={"query": "DELETE FROM prompt_bank"})[0] in (404, 405)
    assert versions(home) == before  # nothing was written


def test_two_people_acting_at_once_lose_nothing(console):
    """Two reviewers approve different scenes at the same moment (two sessions' requests in
    parallel): both land, each in its own commit."""
    from concurrent.futures import ThreadPoolExecutor

    home, base, token = console
    csrf = re.search(rb'name="csrf-token" content="([^"]+)"', request(f"{base}/", cookie=token)[1]).group(1).decode()
    rejected = sorted(r["prompt_id"] for r in delta_rows(home, "prompt_bank", ["prompt_id", "product_type", "status"])
                      if r["status"] == "rejected" and r["product_type"] == "motorcycle")[:2]
    before = versions(home)["prompt_bank"]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda pid: request(f"{base}/api/prompts/status", "POST", cookie=token,
                                                    headers={"X-CSRF-Token": csrf},
                                                    body={"prompt_id": pid, "status": "approved"}), rejected))
    assert [status for status, _ in answers] == [200, 200], answers
    statuses = {r["prompt_id"]: r["status"] for r in delta_rows(home, "prompt_bank", ["prompt_id", "status"])}
    assert [statuses[pid] for pid in rejected] == ["approved", "approved"]
    assert versions(home)["prompt_bank"] == before + 2


def test_decisions_in_the_browser_land_in_delta_exactly(console, tmp_path):
    from playwright.sync_api import sync_playwright

    home, base, token = console
    before_versions = versions(home)
    before = {"prompt_bank": keyed(home, "prompt_bank", ["prompt_id"], ["status", "reason", "reviewed_by", "text"]),
              "product_classes": keyed(home, "product_classes", ["product_id"], ["product_type", "source", "score"]),
              "promotions": keyed(home, "promotions", ["product_id", "arm", "model_version"], ["after_evaluations"]),
              "human_ratings": keyed(home, "human_ratings", ["rater", "image_id", "question"], ["answer"])}
    scene = next(r for r in delta_rows(home, "prompt_bank", ["prompt_id", "product_type", "purpose", "status"])
                 if r["product_type"] == "coffee cup" and r["purpose"] == "scene" and r["status"] == "rejected")
    assert before["product_classes"][("rocket",)]["product_type"] == "unknown"
    SHOTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(120_000)  # a loaded 2-core machine; a wait, not a timing assert
        page = context.new_page()
        page.goto(f"{base}/?token={token}")
        assert page.url == f"{base}/", "the token leaves the address bar"
        assert "recontext console" in page.inner_text("h1")
        page.screenshot(path=SHOTS / "index.png")

        # Prompt bank: a scene naming a brand is refused with the reason shown; then approve one.
        page.goto(f"{base}/prompts?type=coffee%20cup")
        page.fill("#add input[name=text]", "a Starbucks mug on a marble kitchen counter, morning light")
        page.click("#add button")
        page.wait_for_selector("#message.error")
        assert "names a brand (starbucks)" in page.inner_text("#message").lower()
        row = f'tr[data-prompt="{scene["prompt_id"]}"]'
        page.click(f"{row} button.approve")
        page.wait_for_selector(f"{row} td.approved")
        page.screenshot(path=SHOTS / "prompts.png")

        # Product types: rocket (zero-shot 'unknown') gets a type; it leaves the list.
        page.goto(f"{base}/types")
        page.screenshot(path=SHOTS / "types.png")
        page.fill('tr[data-product="rocket"] input.type', "toy rocket")
        page.click('tr[data-product="rocket"] button.assign')
        page.wait_for_selector('tr[data-product="rocket"]', state="detached")

        # Agreement page open in a second tab: it updates when the rating arrives.
        watcher = context.new_page()  # the same browser session (its cookie)
        watcher.goto(f"{base}/agreement")
        assert watcher.locator('section[data-source="human"]').count() == 0
        assert "SYNTHETIC" in watcher.inner_text('section[data-source="synthetic"]')

        # Rating: identify, answer the eight questions with the keyboard, submit with Enter.
        page.goto(f"{base}/rate")
        page.fill("#rater", "rater-a")
        page.keyboard.press("Enter")
        page.wait_for_selector("#task")
        assert "0 of" in page.inner_text("#progress")
        rated = page.get_attribute("img.big", "src").rsplit("/", 1)[-1]
        page.screenshot(path=SHOTS / "rate.png", full_page=True)
        for key in ANSWER_KEYS:
            page.keyboard.press(key)
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#progress').innerText.includes('1 of')")
        watcher.wait_for_selector('section[data-source="human"]')
        assert "1 rater(s), 8 answers" in watcher.inner_text('section[data-source="human"]')
        watcher.screenshot(path=SHOTS / "agreement.png", full_page=True)

        # Resume after closing the browser: a new one (no cookie, no storage) continues at image 2.
        browser.close()
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(f"{base}/rate?rater=rater-a&token={token}")
        assert "1 of" in page.inner_text("#progress")
        assert page.get_attribute("img.big", "src").rsplit("/", 1)[-1] != rated

        # Adapters: the candidate beside the champion, promoted with one click (last: a new champion
        # leaves the pinned evaluation without images until `recontext evaluate`, so nothing to rate).
        page.goto(f"{base}/adapters")
        page.screenshot(path=SHOTS / "adapters.png")
        page.click("text=coffee-cup")
        page.wait_for_url(f"{base}/adapters/coffee-cup")
        candidate = '[data-arm="ours"][data-version="2"]'
        assert page.get_attribute(f"tr{candidate}", "class") == "candidate"
        assert page.locator('tr.champion[data-arm="ours"][data-version="1"] img').count() >= 1  # its images
        page.locator(f"tr{candidate}").evaluate("row => row.scrollIntoView({block: 'center'})")  # beside the champion
        page.screenshot(path=SHOTS / "adapter.png")
        page.click(f"tr{candidate} button.promote")
        page.wait_for_selector(f'tr.champion{candidate}')
        assert page.get_attribute('tr[data-arm="ours"][data-version="1"]', "class") == "candidate"
        browser.close()

    # Exactly those writes, one Delta commit per action (set-type also clears the product's
    # classify quarantine row), read back by delta-rs in another process.
    after_versions = versions(home)
    assert {t: after_versions[t] - before_versions[t] for t in TABLES} == {
        "prompt_bank": 1, "product_classes": 1, "quarantine": 1, "promotions": 1, "human_ratings": 1,
        "adapters": 0, "products": 0}
    bank = keyed(home, "prompt_bank", ["prompt_id"], ["status", "reason", "reviewed_by", "text"])
    changed = {k for k in bank if bank[k] != before["prompt_bank"].get(k)}
    assert changed == {(scene["prompt_id"],)}
    assert (bank[scene["prompt_id"],]["status"], bank[scene["prompt_id"],]["reviewed_by"]) == ("approved", "human")
    classes = keyed(home, "product_classes", ["product_id"], ["product_type", "source", "score"])
    assert {k for k in classes if classes[k] != before["product_classes"].get(k)} == {("rocket",)}
    assert (classes["rocket",]["product_type"], classes["rocket",]["source"]) == ("toy rocket", "human")
    assert not [r for r in delta_rows(home, "quarantine", ["stage", "product_id"])
                if r["stage"] == "classify" and r["product_id"] == "rocket"]
    promotions = keyed(home, "promotions", ["product_id", "arm", "model_version"], ["after_evaluations"])
    assert set(promotions) - set(before["promotions"]) == {("coffee-cup", "ours", "2")}
    ratings = delta_rows(home, "human_ratings", ["rater", "image_id", "question", "answer", "source", "source_uri",
                                                "imported_at"])
    new = [r for r in ratings if (r["rater"], r["image_id"], r["question"]) not in before["human_ratings"]]
    from etl.ratings import QUESTIONS

    assert sorted((r["question"], r["answer"]) for r in new) == sorted(
        (q, ANSWERS[int(k) - 1]) for q, k in zip(QUESTIONS, ANSWER_KEYS))
    assert {(r["rater"], r["image_id"], r["source"]) for r in new} == {("rater-a", rated, "human")}
    assert all(r["source_uri"].startswith("console:rater-a") and r["imported_at"] for r in new)
    # The registry moved the alias, as `recontext promote` does.
    assert registry(home, "print(client.get_model_version_by_alias('recontext-coffee-cup', 'champion').version)") == "2"
