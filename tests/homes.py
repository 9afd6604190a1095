"""Helpers for tests and benchmarks that work on a copy of a home, and read tables the way an
outside reader does."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path


def copy_home(source: Path, target: Path) -> Path:
    """A copy of a home whose MLflow store points at the copy's own artifacts (the store records
    absolute paths), so what the copy registers never lands in the original."""
    shutil.copytree(source, target)  # copy2 keeps modification times: model fingerprints stay equal
    with sqlite3.connect(target / "mlflow" / "mlflow.db") as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in [c[1] for c in db.execute(f"PRAGMA table_info('{table}')")
                           if c[2].upper().startswith(("TEXT", "VARCHAR"))]:
                db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE "{column}" LIKE ?',
                           (str(source), str(target), f"%{source}%"))
    return target


def delta_rows(home: Path, table: str, columns: list[str], version: int | None = None) -> list[dict]:
    """Rows of a table (at `version`, else the latest) read by delta-rs in a child process
    (delta-rs with pyarrow can abort at interpreter exit: docs/engine.md), as JSON records (binary
    columns base64)."""
    code = ("import base64, json, os, sys\nfrom deltalake import DeltaTable\n"
            f"frame = DeltaTable({str(Path(home) / 'lakehouse' / table)!r}, version={version!r})"
            f".to_pandas(columns={columns!r})\n"
            "frame = frame.map(lambda v: base64.b64encode(v).decode() if isinstance(v, bytes) else v)\n"
            "sys.stdout.write(frame.to_json(orient='records')); sys.stdout.flush(); os._exit(0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


OLD_LOG_AGE_DAYS = 40  # past Delta's default log retention (30 days)


def home_made_before_checkpoints(home: Path, products: int = 25) -> list[dict]:
    """A home as versions before checkpoints were on made it: every table created with
    'delta.checkpointInterval'='1000000'; `products` written in one commit per product plus a
    MERGE that retitles the first; the log files dated OLD_LOG_AGE_DAYS back. Returns `products`'
    (product_id, title) rows as delta-rs reads them."""
    import os
    import time

    import pandas as pd

    from etl import lakehouse
    from core.settings import Settings

    current = lakehouse.TABLE_PROPERTIES
    lakehouse.TABLE_PROPERTIES = {"delta.checkpointInterval": "1000000"}
    try:
        lake = lakehouse.Lakehouse(Settings.load(home))
    finally:
        lakehouse.TABLE_PROPERTIES = current
    rows = [{"product_id": f"p{n:02d}", "title": f"mug {n}", "product_type": "mug", "attributes": "{}",
             "source": "test"} for n in range(products)]
    for row in rows:
        assert lake.upsert_rows("products", pd.DataFrame([row])) == 1
    assert lake.upsert_rows("products", pd.DataFrame([{**rows[0], "title": "retitled mug"}])) == 1
    assert lake.history("products", 1)[0]["operation"] == "MERGE"
    log = home / "lakehouse" / "products" / "_delta_log"
    assert not list(log.glob("*checkpoint*"))
    old = time.time() - OLD_LOG_AGE_DAYS * 86400
    for name in (home / "lakehouse").glob("*/_delta_log/*"):
        os.utime(name, (old, old))
    return delta_rows(home, "products", ["product_id", "title"])


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path, timeout: float = 120):
    """A real `mlflow server` (SQLite backend, artifacts served by the server from `folder`) on a
    free loopback port; yields its URL, stops it on exit."""
    import time
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers (its own session)
        server.wait(timeout=60)
        log.close()


def task_outcomes(zoo, settings, products: list[str], work: Path) -> dict[str, dict]:
    """Per product, a training task's outcome shaped as `_train_task` returns it (the settings'
    steps, sweep tokens, validations; validation PNGs under `work/<product>`), each with a copy
    of one real tiny LoRA adapter (2 steps on the zoo's text2img)."""
    import time

    import numpy as np
    from PIL import Image

    from training.lora import Example, train_lora

    config = settings.training
    adapter = train_lora(zoo.load("text2img"), [Example(Image.new("RGB", (64, 64), "white"), "a photo of sks mug")],
                         config, work / "adapter", steps=2).adapter_dir
    rng = np.random.default_rng(0)
    validation = [{"step": step, "clip_i": 0.8, "dino_i": 0.7}
                  for step in range(config.validate_every, config.steps + 1, config.validate_every)]
    tokens = [f"tok{n}" for n in range(config.token_candidates)]
    result = {}
    for product in products:
        folder = work / product
        shutil.copytree(adapter, folder / "final")
        (folder / "validation").mkdir()
        for n in range(config.validation_images):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "validation" / f"{n}.png")
        result[product] = {
            "token": tokens[0], "tried_tokens": tokens, "examples": 20, "positives": 16,
            "sweep": {t: {"clip_i": 0.8, "dino_i": 0.7, "sweep_score": 1.5, "sweep_scene_clip_t": 0.2} for t in tokens},
            "losses": rng.random(config.steps).tolist(), "learning_rates": [config.learning_rate] * config.steps,
            "grad_norms": rng.random(config.steps).tolist(), "validations": validation,
            "adapter_dir": str(folder / "final"), "task_seconds": 60.0, "peak_memory_mb": 900.0,
            "process": {"task_host": "bench", "task_pid": 1, "task_started": time.time()}}
    return result
