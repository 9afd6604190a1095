"""`recontext maintain`: keep a long-lived home small and fast.

- Every table: the table properties of `etl.lakehouse.TABLE_PROPERTIES` set (a home made before
  checkpoints were on gets them here), a log checkpoint, expired log files deleted; then small
  files compacted (OPTIMIZE; each MERGE adds files), clustered by `product_id` where the table
  has one (Z-order), and files that no version within the retention needs vacuumed (time
  travel stays possible inside the retention).
- MLflow: artifact folders that no run or logged model of the tracking store owns (left by
  deleted or never-finished runs) are removed; so are the training checkpoints of adapters that
  are registered (they exist only to resume a killed training run).

Runs under the home lock, so it never races a pipeline run.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from etl.lakehouse import Lakehouse
from core.tables import TABLES


@dataclass
class MaintenanceReport:
    compacted: dict[str, int] = field(default_factory=dict)  # table -> files removed by compaction
    vacuumed: dict[str, int] = field(default_factory=dict)  # table -> files deleted
    properties: dict[str, dict[str, str]] = field(default_factory=dict)  # table -> table properties changed
    orphaned_artifacts: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    key_violations: dict[str, list[dict]] = field(default_factory=dict)  # table -> duplicated keys

    def lines(self) -> list[str]:
        return [f"{t:<20} compacted {self.compacted.get(t, 0):>4} files, vacuumed {self.vacuumed.get(t, 0):>4}"
                for t in sorted(set(self.compacted) | set(self.vacuumed))] + [
            f"{t:<20} set " + ", ".join(f"{k}={v}" for k, v in props.items())
            for t, props in sorted(self.properties.items()) if props] + [
            f"removed {len(self.orphaned_artifacts)} orphaned MLflow artifact folder(s), "
            f"{len(self.checkpoints)} training checkpoint folder(s) of registered adapters"] + check_lines(
            self.key_violations)


def maintain(lake: Lakehouse, retention_hours: int) -> MaintenanceReport:
    from jobs.recovery import home_lock

    report = MaintenanceReport()
    with home_lock(lake.settings.home, f"maintain-{uuid.uuid4().hex[:6]}"):
        for name in TABLES:
            # Log first: expired logs can only go up to a checkpoint older than every version
            # kept, so the checkpoint must precede optimize's commit.
            report.properties[name] = lake.checkpoint(name)
            metrics = lake.optimize(name)
            report.compacted[name] = int(metrics.get("numFilesRemoved", 0))
            report.vacuumed[name] = len(lake.vacuum(name, retention_hours))
        report.orphaned_artifacts = prune_mlflow_artifacts(lake)
        report.checkpoints = prune_checkpoints(lake)
        report.key_violations = key_violations(lake)
    return report


def key_violations(lake: Lakehouse) -> dict[str, list[dict]]:
    """Per table, the declared keys that more than one row holds (none in a healthy home)."""
    return {name: found for name in TABLES if (found := lake.key_violations(name))}


def check_lines(violations: dict[str, list[dict]]) -> list[str]:
    if not violations:
        return [f"keys: every declared key of the {len(TABLES)} tables is unique"]
    return [f"KEY VIOLATION in {table}: " + "; ".join(
        ", ".join(f"{k}={v}" for k, v in row.items() if k != "rows") + f" ({row['rows']} rows)" for row in rows)
        for table, rows in violations.items()]


def prune_mlflow_artifacts(lake: Lakehouse) -> list[str]:
    """Folders under the embedded store's artifact root owned by no run and no logged model."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from etl import tracking

    root = lake.settings.home / "mlflow" / "artifacts"
    experiment = tracking.configure(lake.settings)
    client = MlflowClient()
    if not root.exists() or client.get_experiment(experiment).artifact_location != root.as_uri():
        return []  # another store (MLFLOW_TRACKING_URI) owns its artifacts: never judge this folder by it
    runs = {r.info.run_id for r in client.search_runs([experiment], run_view_type=ViewType.ALL,
                                                      max_results=50_000)}
    models = {m.model_id for m in client.search_logged_models([experiment], max_results=50_000)}
    # Layout: <root>/<run_id>/artifacts and <root>/models/<model_id>/artifacts.
    folders = [(f, runs) for f in root.iterdir() if f.name != "models"]
    if (root / "models").is_dir():
        folders += [(f, models) for f in (root / "models").iterdir()]
    removed = sorted(str(f) for f, owners in folders if f.is_dir() and f.name not in owners)
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def prune_checkpoints(lake: Lakehouse) -> list[str]:
    """`<home>/training/<product>/<arm>-v<version>-<config>` folders whose adapter is recorded."""
    root = lake.settings.home / "training"
    if not root.exists():
        return []
    trained = {f"{r['product_id']}/{r['arm']}-v{r['training_set_version']}-{r['config_hash']}" for r in
               lake.spark.sql("SELECT product_id, arm, training_set_version, config_hash FROM adapters").collect()}
    removed = []
    for folder in sorted(Path(root).glob("*/*")):
        if f"{folder.parent.name}/{folder.name}" in trained:
            shutil.rmtree(folder)
            removed.append(str(folder))
    return removed
