"""`recontext run`: the stages of jobs/pipeline.toml, in dependency order, incremental, recorded.

- A stage is skipped when its inputs (the Delta versions of the tables its steps read, the
  settings, the catalog listing, the registry's aliases) are as its last successful run left
  them, so a scheduled re-run with nothing new costs a few metadata reads per stage. Within a
  stage every step processes only what is not stored yet (anti-joins on keys), so a re-run after
  a change does only the new work.
- Every stage of every run is a `job_runs` row: `running` when it starts, then `succeeded`,
  `skipped` or `failed` with the error. Locking and recovery after a kill: jobs/recovery.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from etl.lakehouse import Lakehouse
from etl.step import CATALOG_FILES, CHAMPIONS
from core.tables import TABLES
from jobs.graph import PIPELINE_FILE, Stage, load_stages, select
from jobs.recovery import home_lock, recover, write_runs
from udfs.zoo import LOAD_LOG, diffusion_loads_between

log = logging.getLogger("recontext.run")


# --- inputs fingerprint ---

def settings_hash(lake: Lakehouse) -> str:
    values = {k: v for k, v in dataclasses.asdict(lake.settings).items() if k != "home"}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_listing_hash(lake: Lakehouse) -> str:
    """Name, size and mtime of every file the configured sources list (no image is read)."""
    from etl.sources import list_source

    digest = hashlib.sha256()
    for source in lake.settings.ingest.sources:
        listing = list_source(source)
        digest.update(listing.source.encode())
        for uri in sorted({i.source_uri for i in listing.images} | {r.source_uri for r in listing.rejected}):
            with contextlib.suppress(OSError):
                stat = os.stat(uri)
                uri = f"{uri}:{stat.st_size}:{stat.st_mtime_ns}"
            digest.update(uri.encode())
    return digest.hexdigest()[:16]


def registry_aliases(lake: Lakehouse) -> dict[str, dict[str, str]]:
    """Aliases of the pipeline's registered models (a promotion changes what generate uses)."""
    from mlflow import MlflowClient

    from etl import tracking

    tracking.configure(lake.settings)
    return {m.name: dict(sorted(m.aliases.items())) for m in MlflowClient().search_registered_models()
            if m.name.startswith("recontext-")}


def fingerprint(lake: Lakehouse, stage: Stage, before: dict | None = None) -> dict:
    """The stage's inputs. After a run (`before` given) only the table versions are read again:
    the stage may have written tables it reads, while the settings, the catalog listing and the
    registry are taken as they were when it started (a change during the run reruns it)."""
    from deltalake import DeltaTable

    inputs: dict = dict(before) if before else {"settings": settings_hash(lake)}
    for name in stage.reads:
        if name == CATALOG_FILES:
            if before is None:
                inputs[name] = source_listing_hash(lake)
        elif name == CHAMPIONS:
            if before is None:
                inputs[name] = registry_aliases(lake)
        elif name in TABLES:
            inputs[name] = DeltaTable(lake.location(name)).version()
    return inputs


@dataclass
class StageResult:
    stage: str
    status: str
    seconds: float
    rows_written: int
    tables_written: dict
    error: str | None = None


def run(lake: Lakehouse, names: list[str], products: list[str] | None = None, wait: bool = False,
        zoo=None, progress=print, pipeline: Path = PIPELINE_FILE) -> list[StageResult]:
    from udfs.zoo import ModelZoo

    stages = select(load_stages(pipeline), names)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    with home_lock(lake.settings.home, run_id, wait):
        killed = recover(lake)
        if killed:
            progress(f"found {killed} stage(s) of an earlier run that did not finish; marked killed")
        if products:
            lake.limit_to(set(products))
        zoo = zoo or ModelZoo.from_settings(lake.settings)
        expected = _last_durations(lake)
        results = []
        progress(f"run {run_id}: {len(stages)} stage(s), {'products ' + ','.join(products) if products else 'all products'}"
                 f", home {lake.settings.home}")
        for number, stage in enumerate(stages, start=1):
            remaining = sum(expected.get(s.name, 0.0) for s in stages[number - 1:])
            eta = f", ETA {remaining:.0f}s from the last run's stage times" if remaining else ""
            progress(f"[{number}/{len(stages)}] {stage.name}: {stage.description}{eta}")
            scope = len(products) if products else lake.spark.sql("SELECT count(*) AS n FROM products").first()["n"]
            result = _run_stage(lake, zoo, stage, run_id, scope, incremental=not products, progress=progress)
            results.append(result)
            if result.status == "failed":
                break  # later stages depend on this one
        progress(summary_table(results))
        return results


def _run_stage(lake: Lakehouse, zoo, stage: Stage, run_id: str, scope: int, incremental: bool,
               progress) -> StageResult:
    from jobs.steps import run_steps

    started = datetime.now(timezone.utc)
    row = {"run_id": run_id, "stage": stage.name, "started_at": started, "finished_at": None, "seconds": None,
           "products": scope, "rows_written": 0, "tables_written": "{}", "inputs": None, "error": None,
           "host": socket.gethostname(), "pid": os.getpid(), "base_model_loads": 0}
    before = fingerprint(lake, stage)
    if incremental and before == _last_inputs(lake, stage.name):
        row.update(status="skipped", finished_at=started, seconds=0.0, products=0, inputs=json.dumps(before))
        write_runs(lake, pd.DataFrame([row]))
        progress("    skipped: inputs unchanged since its last successful run")
        log.info("stage skipped", extra={"run_id": run_id, "stage": stage.name})
        return StageResult(stage.name, "skipped", 0.0, 0, {})
    write_runs(lake, pd.DataFrame([{**row, "status": "running"}]))
    log.info("stage started", extra={"run_id": run_id, "stage": stage.name})
    clock, wall = time.perf_counter(), time.time()
    try:
        written = run_steps(lake, list(stage.steps), zoo, progress=lambda line: progress("  " + line))
        tables: dict[str, int] = {}
        for per_table in written.values():
            for table, n in per_table.items():
                if table in TABLES:  # registered models and report pages are no table rows
                    tables[table] = tables.get(table, 0) + n
        status, error = "succeeded", None
    except Exception as err:  # noqa: BLE001 - recorded in job_runs, then the run stops
        log.exception("stage %s failed", stage.name)
        tables, status, error = {}, "failed", f"{type(err).__name__}: {err}"
        progress(f"    FAILED: {error}")
    seconds = time.perf_counter() - clock
    row.update(status=status, error=error, finished_at=datetime.now(timezone.utc), seconds=seconds,
               rows_written=sum(tables.values()), tables_written=json.dumps(tables, sort_keys=True),
               base_model_loads=diffusion_loads_between(lake.settings.home / LOAD_LOG, wall, time.time()),
               inputs=json.dumps(fingerprint(lake, stage, before)) if status == "succeeded" else None)
    write_runs(lake, pd.DataFrame([row]))
    log.info("stage %s", status, extra={"run_id": run_id, "stage": stage.name, "seconds": round(seconds, 3),
                                        "rows_written": row["rows_written"]})
    return StageResult(stage.name, status, seconds, row["rows_written"], tables, error)


def _last_inputs(lake: Lakehouse, stage: str) -> dict | None:
    rows = lake.spark.sql(
        f"SELECT inputs FROM job_runs WHERE stage = '{stage}' AND status IN ('succeeded', 'skipped') "
        "ORDER BY finished_at DESC LIMIT 1").collect()
    return json.loads(rows[0]["inputs"]) if rows and rows[0]["inputs"] else None


def _last_durations(lake: Lakehouse) -> dict[str, float]:
    frame = lake.spark.sql(
        "SELECT stage, seconds FROM (SELECT stage, seconds, row_number() OVER (PARTITION BY stage ORDER BY "
        "finished_at DESC) AS n FROM job_runs WHERE status = 'succeeded') WHERE n = 1").toPandas()
    return dict(zip(frame.stage, frame.seconds))


def summary_table(results: list[StageResult]) -> str:
    frame = pd.DataFrame([{"stage": r.stage, "status": r.status, "seconds": round(r.seconds, 1),
                           "rows_written": r.rows_written, "quarantined": r.tables_written.get("quarantine", 0)}
                          for r in results])
    total = sum(r.seconds for r in results)
    hint = ("\nquarantined rows say why: recontext sql \"SELECT stage, product_id, reason FROM quarantine\""
            if frame.get("quarantined", pd.Series(dtype=int)).sum() else "")
    return f"\nrun summary ({total:.1f}s):\n" + (frame.to_string(index=False) if len(frame) else "(no stages)") + hint
