"""Locking a home for one run at a time, and recovering after a run that was killed.

- One run per home at a time: an exclusive lock on `<home>/run.lock` (released by the OS when a
  process dies, so a SIGKILL never leaves it stale). A second run fails at once with who holds
  it, or waits with `--wait`.
- A run killed mid-stage leaves its `job_runs` row `running`; the next run, under the lock,
  marks it `killed`, clears staging leftovers and marks abandoned MLflow runs KILLED.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from core.errors import UserError
from etl.lakehouse import Lakehouse


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
    write_runs(lake, stale)
    if (lake.settings.home / "mlflow").exists():
        from mlflow import MlflowClient

        from etl import tracking

        experiment = tracking.configure(lake.settings)
        client = MlflowClient()
        for run in client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'"):
            client.set_terminated(run.info.run_id, status="KILLED")
    return len(stale)


def write_runs(lake: Lakehouse, rows: pd.DataFrame) -> None:
    lake.upsert_rows("job_runs", rows.astype({"products": "int32", "rows_written": "int64", "pid": "int32", "base_model_loads": "Int32"}))
