"""Benchmark: does a long Delta history slow every read? One table after 10, 1,000 and 5,000 commits.

    python bench/bench_history.py                       # 10, 1,000 and 5,000 commits
    python bench/bench_history.py --commits 10 200      # quicker

A home as the code creates it now (a checkpoint every 10 commits) and, at each history length,
a copy of it as homes made before checkpoints were on hold it (no checkpoint,
'delta.checkpointInterval'='1000000': every read replays every commit since the table was made;
see `without_checkpoints`). `image_metrics` holds 2,000 rows (500 products with random hash
ids, 4 generated images each) and grows a history of commits of a daily run's size: each commit replaces 10 products' 40 rows (delta-rs
`write_deltalake(..., predicate=...)`, which writes checkpoints by the table's property like any
engine), so the data stays the same size and only the history grows. At each history length:

- read: a typical query through the embedded engine (one product's metrics by kind), median of 5;
- no-change run: `recontext run all` in-process on a home whose catalog is empty, after one run
  that took in the new table version (not timed): every stage is skipped after reading its
  inputs' Delta versions (delta-rs) and its last `job_runs` row, and records a `job_runs` row
  (median of 3). `job_runs` is compacted before each point (as `recontext maintain` does): it
  gains a file per stage per run, which the no-change run reads, whatever the history.

A third home at each length, modelled: the same table as a year of daily runs with `recontext
maintain` leaves it (`after_a_year`). The bench writes its commits within minutes, so nothing
reaches Delta's default retentions (log files 30 days, removed files' tombstones 7 days): the
unmaintained table keeps every commit file and every tombstone in its checkpoint. The model
spreads the commits evenly over a year (at least one per day) and applies those two retentions
with delta-rs' own maintenance (`Lakehouse.checkpoint`: checkpoint, expired logs deleted; the
tombstone retention set to the age of the first commit a week's run would still hold).

The last line reads `history: ... ratio 5000/10 R`, R the larger of the two ratios of the
modelled year. One torch/ONNX thread; the tiny random-weight models (no model runs here).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
from deltalake import DeltaTable, PostCommitHookProperties, write_deltalake  # noqa: E402

from etl import lakehouse  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.vocabulary import GENERATED  # noqa: E402
from jobs.runner import run  # noqa: E402

PRODUCTS, IMAGES_PER_PRODUCT, PRODUCTS_PER_COMMIT = 500, 4, 10
BEFORE = {"delta.checkpointInterval": "1000000"}  # how tables were created before checkpoints were on
TABLE = "image_metrics"


class History:
    """`image_metrics` of a home, and commits of a daily run's size added to it."""

    def __init__(self, lake: lakehouse.Lakehouse):
        self.delta = DeltaTable(lake.location(TABLE))
        self.schema = pa.schema(self.delta.schema().to_arrow())
        self.products = [hashlib.sha256(f"product-{n}".encode()).hexdigest()[:16] for n in range(PRODUCTS)]
        self.rng = np.random.default_rng(0)
        self.day = 0
        write_deltalake(self.delta, self._rows(self.products), mode="append")

    def _rows(self, products: list[str]) -> pa.Table:
        count = len(products) * IMAGES_PER_PRODUCT
        columns = {f.name: [None] * count for f in self.schema}
        columns.update(
            image_id=[hashlib.sha256(f"{p}-{k}".encode()).hexdigest() for p in products
                      for k in range(IMAGES_PER_PRODUCT)],
            product_id=[p for p in products for _ in range(IMAGES_PER_PRODUCT)],
            # Generated images' metrics: no stage of the empty catalog's runs acts on them (references
            # would make training_set select them, and train try to train products with no photos).
            kind=[GENERATED] * count, n_references=[IMAGES_PER_PRODUCT] * count,
            clip_i=self.rng.random(count).tolist(), dino_i=self.rng.random(count).tolist(),
            computed_at=[pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(days=self.day)] * count)
        return pa.Table.from_pydict(columns, schema=self.schema)

    def grow_to(self, version: int) -> None:
        while self.delta.version() < version:
            self.day += 1
            start = (self.day * PRODUCTS_PER_COMMIT) % PRODUCTS
            products = self.products[start:start + PRODUCTS_PER_COMMIT]
            listed = ", ".join(f"'{p}'" for p in products)
            write_deltalake(self.delta, self._rows(products), mode="overwrite", predicate=f"product_id IN ({listed})")


def median_seconds(action, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def open_home(root: Path, tiny: Path, name: str) -> lakehouse.Lakehouse:
    return lakehouse.Lakehouse(Settings.load(root / name, models={"tiny_dir": str(tiny)},
                                             ingest={"sources": (str(root / "catalog"),)}))


def without_checkpoints(home: Path, copy: Path) -> Path:
    """A copy of `home` as a home made before checkpoints were on holds the same history: every
    table's checkpoints removed (they are optional: a reader then replays every commit) and
    BEFORE's checkpoint interval set, so no later commit writes one. Built this way because
    writing 5,000 commits to a table without checkpoints pays that replay on every commit too
    (minutes): the history is the same commits, read the old way."""
    shutil.copytree(home, copy, ignore=shutil.ignore_patterns("_staging"))
    for log in (copy / "lakehouse").glob("*/_delta_log"):
        for checkpoint in [*log.glob("*.checkpoint.parquet"), log / "_last_checkpoint"]:
            checkpoint.unlink(missing_ok=True)
        DeltaTable(str(log.parent)).alter.set_table_properties(
            BEFORE, post_commithook_properties=PostCommitHookProperties(create_checkpoint=False))
    return copy


LOG_DAYS, TOMBSTONE_DAYS, YEAR = 30, 7, 365  # Delta's default retentions; the commits' span


def after_a_year(home: Path, copy: Path, commits: int) -> Path:
    """A copy of `home` as `recontext maintain` keeps it when its `commits` were a year's daily
    runs: log files older than 30 days' worth of commits aged past the retention and deleted by
    maintain's own checkpoint step, and only a week's worth of tombstones kept in the checkpoint."""
    shutil.copytree(home, copy, ignore=shutil.ignore_patterns("_staging"))
    per_day = max(commits / YEAR, 1.0)
    location = copy / "lakehouse" / TABLE
    delta = DeltaTable(str(location))
    version = delta.version()
    old = time.time() - (LOG_DAYS + 10) * 86400
    for log in (location / "_delta_log").glob("0*"):  # commits, checkpoints, checksums of each version
        if int(log.name.split(".")[0]) < version - LOG_DAYS * per_day:
            os.utime(log, (old, old))
    first_kept = max(0, int(version - TOMBSTONE_DAYS * per_day))
    committed = {h["version"]: h["timestamp"] for h in delta.history(version - first_kept + 1)}
    age = int(time.time() - committed[first_kept] / 1000) + 1
    delta.alter.set_table_properties({"delta.deletedFileRetentionDuration": f"interval {age} seconds"},
                                     post_commithook_properties=PostCommitHookProperties(create_checkpoint=False))
    lake = open_home(copy.parent, copy.parent / "tiny", copy.name)
    lake.checkpoint(TABLE)
    return copy


def measure(lake: lakehouse.Lakehouse, product: str) -> dict[str, float]:
    """Seconds of a typical read and of a no-change run (medians), after one run that takes in
    the table's current version (the stages that read it run; not timed)."""
    quiet = {"progress": lambda _: None}
    run(lake, ["all"], **quiet)
    # Every run adds a file per stage to `job_runs` (its rows are appended), which a no-change
    # run reads and writes: compacted here as `recontext maintain` does, so every point starts
    # from the same job_runs and only the history of the table differs.
    lake.optimize("job_runs")
    read = (f"SELECT kind, count(*) AS n, avg(clip_i) AS clip_i, avg(dino_i) AS dino_i FROM {TABLE} "
            f"WHERE product_id = '{product}' GROUP BY kind")

    def no_change_run():
        assert {r.status for r in run(lake, ["all"], **quiet)} == {"skipped"}

    return {"read": median_seconds(lambda: lake.spark.sql(read).collect(), 5), "run": median_seconds(no_change_run, 3)}


def line(label: str, results: dict[int, dict], commits: list[int]) -> str:
    first, last = commits[0], commits[-1]
    ratios = {k: results[last][k] / results[first][k] for k in ("read", "run")}
    shown = "/".join(f"{c:,}" for c in commits)
    return (f"history: {label}: read after {shown} commits "
            + " / ".join(f"{results[c]['read']:.3f}" for c in commits) + " s, no-change run "
            + " / ".join(f"{results[c]['run']:.2f}" for c in commits)
            + f" s; ratio {last}/{first} {max(ratios.values()):.2f} (read {ratios['read']:.2f}, "
              f"run {ratios['run']:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, nargs="+", default=[10, 1_000, 5_000])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="recontext-bench-history-"))
    tiny = root / "tiny"
    (root / "catalog").mkdir()
    lake = open_home(root, tiny, "home")
    history = History(lake)
    product = history.products[PRODUCTS // 2]
    before, after, year = {}, {}, {}
    for count in args.commits:
        history.grow_to(count)
        # Data files no version needs any more (each commit rewrites the table's file): dropped, so
        # the copy below stays small. Reads use the latest version only.
        history.delta.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
        checkpoints = len(list(Path(lake.location(TABLE), "_delta_log").glob("*.checkpoint.parquet")))
        after[count] = measure(lake, product)
        old = open_home(root, tiny, without_checkpoints(root / "home", root / f"before-{count}").name)
        before[count] = measure(old, product)
        shutil.rmtree(root / f"before-{count}")
        kept = open_home(root, tiny, after_a_year(root / "home", root / f"year-{count}", count).name)
        logs = len(list(Path(kept.location(TABLE), "_delta_log").glob("*.json")))
        year[count] = measure(kept, product)
        shutil.rmtree(root / f"year-{count}")
        print(f"  {count} commits: checkpoints on ({checkpoints} checkpoints): read {after[count]['read']:.3f} s, "
              f"no-change run {after[count]['run']:.2f} s; off: read {before[count]['read']:.3f} s, "
              f"no-change run {before[count]['run']:.2f} s; maintained year ({logs} log files): read "
              f"{year[count]['read']:.3f} s, no-change run {year[count]['run']:.2f} s", flush=True)
    print(line("checkpoints off (before)", before, args.commits))
    print(line("checkpoints on, unmaintained, every commit within minutes", after, args.commits))
    print(line("checkpoints on, maintained, commits spread over a year (modelled retention)", year, args.commits))


if __name__ == "__main__":
    main()
