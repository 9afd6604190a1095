"""Helpers for tests and benchmarks that work on a copy of a home, and read tables the way an
outside reader does."""

from __future__ import annotations

import json
import shutil
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


def delta_rows(home: Path, table: str, columns: list[str]) -> list[dict]:
    """Rows of a table read by delta-rs in a child process (delta-rs with pyarrow can abort at
    interpreter exit: NOTES.md 9), as JSON records (binary columns base64)."""
    code = ("import base64, json, os, sys\nfrom deltalake import DeltaTable\n"
            f"frame = DeltaTable({str(Path(home) / 'lakehouse' / table)!r}).to_pandas(columns={columns!r})\n"
            "frame = frame.map(lambda v: base64.b64encode(v).decode() if isinstance(v, bytes) else v)\n"
            "sys.stdout.write(frame.to_json(orient='records')); sys.stdout.flush(); os._exit(0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)
