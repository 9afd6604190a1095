"""`recontext run`: the stages of jobs/pipeline.toml, in dependency order, incremental, recorded.

- A stage is skipped when its inputs (the Delta versions of the tables it reads, the settings,
  the catalog listing, the registry's aliases) are as its last successful run left them, so a
  scheduled re-run with nothing new costs a few metadata reads per stage. Within a stage every
  step processes only what is not stored yet (anti-joins on keys), so a re-run after a change
  does only the new work.
- Every stage of every run is a `job_runs` row: `running` when it starts, then `succeeded`,
  `skipped` or `failed` with the error. A run killed mid-stage leaves `running`; the next run
  marks it `killed`, clears staging leftovers and marks abandoned MLflow runs KILLED.
- One run per home at a time: an exclusive lock on `<home>/run.lock` (released by the OS when a
  process dies, so a SIGKILL never leaves it stale). A second run fails at once with who holds
  it, or waits with `--wait`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import tomllib
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from etl.errors import UserError
from etl.lakehouse import Lakehouse
from etl.pipeline import STEPS
from etl.tables import TABLES

log = logging.getLogger("recontext.run")
PIPELINE_FILE = Path(__file__).with_name("pipeline.toml")
SPECIAL_INPUTS = ("source:catalog", "registry:champions")


@dataclass(frozen=True)
class Stage:
    name: str
    steps: tuple[str, ...]
    depends_on: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    description: str


def load_stages(path: Path = PIPELINE_FILE) -> dict[str, Stage]:
    """The stages of the pipeline file, checked: known steps and tables, existing dependencies,
    no cycles. Returned in dependency order."""
    raw = tomllib.loads(Path(path).read_text())["stages"]
    stages = {name: Stage(name, tuple(s["steps"]), tuple(s["depends_on"]), tuple(s["reads"]), tuple(s["writes"]),
                          s.get("description", "")) for name, s in raw.items()}
    for stage in stages.values():
        problems = ([f"unknown step {s!r}" for s in stage.steps if s not in STEPS]
                    + [f"unknown dependency {d!r}" for d in stage.depends_on if d not in stages]
                    + [f"unknown table {t!r}" for t in (*stage.reads, *stage.writes)
                       if t not in TABLES and t not in SPECIAL_INPUTS])
        if problems:
            raise ValueError(f"{path}: stage {stage.name!r}: {'; '.join(problems)}")
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in ordered:
            return
        if name in visiting:
            raise ValueError(f"{path}: dependency cycle through stage {name!r}")
        visiting.add(name)
        for dependency in stages[name].depends_on:
            visit(dependency)
        ordered.append(name)

    for name in stages:
        visit(name)
    return {name: stages[name] for name in ordered}


def load_groups(path: Path = PIPELINE_FILE) -> dict[str, list[str]]:
    return tomllib.loads(Path(path).read_text()).get("groups", {})


def steps_for(*names: str) -> list[str]:
    """The steps of stages or groups, in the order given (for tests and benchmarks that call
    etl.pipeline.run_stages directly)."""
    stages, groups = load_stages(), load_groups()
    return [step for name in names for stage in groups.get(name, [name]) for step in stages[stage].steps]


def select(stages: dict[str, Stage], names: list[str]) -> list[Stage]:
    """`all`, or the named stages, in dependency order (dependencies are not added: run `all`,
    or name them, to include them; skipping makes that cheap)."""
    if not names or names == ["all"]:
        return list(stages.values())
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; stages: all, {', '.join(stages)}")
    return [s for s in stages.values() if s.name in names]


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

    from training import tracking

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
        if name in SPECIAL_INPUTS:
            if before is None:
                inputs[name] = source_listing_hash(lake) if name == "source:catalog" else registry_aliases(lake)
        else:
            inputs[name] = DeltaTable(lake.location(name)).version()
    return inputs


# --- locking and recovery ---

@contextlib.contextmanager
def home_lock(home: Path, run_id: str, wait: bool = False):
    """Hold `<home>/run.lock` for the duration of a run."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "run.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"another recontext run is using {home} ({holder}); it is not safe to run two at "
                            "once on one home: wait for it, or pass --wait to queue behind it", exit_code=3) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"run {run_id}, pid {os.getpid()} on {socket.gethostname()}, "
                     f"started {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def recover(lake: Lakehouse) -> int:
    """After a killed run (we hold the lock, so nothing else is running): mark its stages
    `killed`, remove staging leftovers, and end MLflow runs it left RUNNING. Returns the stages
    marked."""
    shutil.rmtree(lake.settings.lakehouse / "_staging", ignore_errors=True)
    stale = lake.spark.sql("SELECT * FROM job_runs WHERE status = 'running'").toPandas()
    if stale.empty:
        return 0
    stale["status"], stale["error"] = "killed", "the process ended without finishing this stage (killed?)"
    _write_runs(lake, stale)
    if (lake.settings.home / "mlflow").exists():
        from mlflow import MlflowClient

        from training import tracking

        experiment = tracking.configure(lake.settings)
        client = MlflowClient()
        for run in client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'"):
            client.set_terminated(run.info.run_id, status="KILLED")
    return len(stale)


# --- running ---

@dataclass
class StageResult:
    stage: str
    status: str
    seconds: float
    rows_written: int
    tables_written: dict
    error: str | None = None


def run(lake: Lakehouse, names: list[str], products: list[str] | None = None, wait: bool = False,
        zoo=None, progress=print) -> list[StageResult]:
    from udfs.zoo import ModelZoo

    stages = select(load_stages(), names)
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
    from etl.pipeline import run_stages

    started = datetime.now(timezone.utc)
    row = {"run_id": run_id, "stage": stage.name, "started_at": started, "finished_at": None, "seconds": None,
           "products": scope, "rows_written": 0, "tables_written": "{}", "inputs": None, "error": None,
           "host": socket.gethostname(), "pid": os.getpid()}
    before = fingerprint(lake, stage)
    if incremental and before == _last_inputs(lake, stage.name):
        row.update(status="skipped", finished_at=started, seconds=0.0, products=0, inputs=json.dumps(before))
        _write_runs(lake, pd.DataFrame([row]))
        progress("    skipped: inputs unchanged since its last successful run")
        log.info("stage skipped", extra={"run_id": run_id, "stage": stage.name})
        return StageResult(stage.name, "skipped", 0.0, 0, {})
    _write_runs(lake, pd.DataFrame([{**row, "status": "running"}]))
    log.info("stage started", extra={"run_id": run_id, "stage": stage.name})
    clock = time.perf_counter()
    try:
        written = run_stages(lake, list(stage.steps), zoo, progress=lambda line: progress("  " + line))
        tables: dict[str, int] = {}
        for per_table in written.values():
            for table, n in per_table.items():
                tables[table] = tables.get(table, 0) + n
        status, error = "succeeded", None
    except Exception as err:  # noqa: BLE001 - recorded in job_runs, then the run stops
        log.exception("stage %s failed", stage.name)
        tables, status, error = {}, "failed", f"{type(err).__name__}: {err}"
        progress(f"    FAILED: {error}")
    seconds = time.perf_counter() - clock
    row.update(status=status, error=error, finished_at=datetime.now(timezone.utc), seconds=seconds,
               rows_written=sum(tables.values()), tables_written=json.dumps(tables, sort_keys=True),
               inputs=json.dumps(fingerprint(lake, stage, before)) if status == "succeeded" else None)
    _write_runs(lake, pd.DataFrame([row]))
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


def _write_runs(lake: Lakehouse, rows: pd.DataFrame) -> None:
    lake.upsert_rows("job_runs", rows.astype({"products": "int32", "rows_written": "int64", "pid": "int32"}))


def summary_table(results: list[StageResult]) -> str:
    frame = pd.DataFrame([{"stage": r.stage, "status": r.status, "seconds": round(r.seconds, 1),
                           "rows_written": r.rows_written, "quarantined": r.tables_written.get("quarantine", 0)}
                          for r in results])
    total = sum(r.seconds for r in results)
    hint = ("\nquarantined rows say why: recontext sql \"SELECT stage, product_id, reason FROM quarantine\""
            if frame.get("quarantined", pd.Series(dtype=int)).sum() else "")
    return f"\nrun summary ({total:.1f}s):\n" + (frame.to_string(index=False) if len(frame) else "(no stages)") + hint
