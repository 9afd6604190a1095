"""Every step of the pipeline, by name, and running steps with their declarations checked.

The declarations (etl/step.py) live beside each step's code; this registry only collects them.
jobs/pipeline.toml groups the steps into stages; jobs/runner.py runs stages.
"""

from __future__ import annotations

import time
from typing import Callable

from deltalake import DeltaTable

from etl.augment import NEGATIVES, NOVEL_VIEWS, OUTPAINT
from etl.captions import CAPTIONS
from core.settings import Settings
from etl.embeddings import EMBEDDINGS
from core.errors import UndeclaredRole, UndeclaredWrite, UserError
from etl.evaluation import EVALUATE
from etl.ingest import INGEST
from etl.lakehouse import Lakehouse
from etl.masks import MASKS
from etl.metrics import METRICS_STEP
from etl.prompt_bank import CLASSIFY, PROMPT_BANK
from etl.report import REPORT
from etl.step import REGISTERED_MODELS, REPORT_FILES, Step
from core.tables import TABLES
from etl.training_set import TRAINING_SET
from training.generate import GENERATE
from etl.ranker import FIT_RANKER
from etl.ranking import RANK
from training.train_job import TRAIN, TRAIN_BASELINE
from udfs.zoo import SEGMENTER, ModelZoo

STEPS: dict[str, Step] = {s.name: s for s in (
    INGEST, MASKS, CAPTIONS, EMBEDDINGS, METRICS_STEP, CLASSIFY, PROMPT_BANK, NOVEL_VIEWS, OUTPAINT, NEGATIVES,
    TRAINING_SET, TRAIN, TRAIN_BASELINE, GENERATE, RANK, EVALUATE, FIT_RANKER, REPORT)}
# What a count under an output that is no table counts.
OUTPUT_UNITS = {REGISTERED_MODELS: "model versions registered", REPORT_FILES: "report pages written"}
# What a new image needs before the metrics can use it.
SCORING = ["masks", "captions", "embeddings", "metrics"]


def step_roles(step: Step, settings: Settings) -> tuple[str, ...]:
    """The model roles the step loads under these settings: the configured segmenter for
    SEGMENTER, and no local LLM when an endpoint writes the prompts."""
    roles = tuple(settings.models.segmenter if r == SEGMENTER else r for r in step.roles)
    return tuple(r for r in roles if not (r == "llm" and settings.prompt_bank.endpoint))


def _versions(lake: Lakehouse) -> dict[str, int]:
    return {name: DeltaTable(lake.location(name)).version() for name in TABLES}


def run_step(lake: Lakehouse, step: Step, zoo: ModelZoo) -> dict[str, int]:
    """Run one step with its declaration checked; fail, naming the step and the table or role, when
    it queried a table it does not declare (UndeclaredRead, raised by the lakehouse), loaded a
    role it does not declare (UndeclaredRole, raised by the zoo, wherever the load ran) or
    committed to a table it does not declare. Only commits tagged as this step's count: other
    writers (on-demand requests, the service, another process) may commit to the same tables."""
    before = _versions(lake)
    with lake.step_scope(step.name, step.reads, step.writes) as tag:
        try:
            written = step.run(lake, zoo.for_step(tag, step_roles(step, lake.settings)))
        finally:  # a refused load fails the step even where the step caught the error (a fanned-out task)
            refused = zoo.refused_roles(tag)
            if refused:
                raise UndeclaredRole(f"step {step.name!r} loaded model role(s) {', '.join(refused)} that its "
                                     "declaration does not list in `roles`; declare them where the step is defined")
    changed = {name for name, version in _versions(lake).items()
               if version != before[name] and lake.commits_by(name, before[name], tag)}
    reported = {t for t, n in written.items() if n and t in TABLES}  # (other counts, e.g. registered models)
    undeclared = sorted((changed | reported) - set(step.writes))
    if undeclared:
        raise UndeclaredWrite(f"step {step.name!r} wrote table(s) {', '.join(undeclared)} that its declaration "
                              f"does not list in `writes`; declare them where the step is defined")
    return written


def run_steps(lake: Lakehouse, names: list[str], zoo: ModelZoo | None = None,
              progress: Callable[[str], None] = print) -> dict[str, dict[str, int]]:
    """Run steps in the given order, each model role they declare checked first; returns rows
    written per step (summed over repeats)."""
    zoo = zoo or ModelZoo.from_settings(lake.settings)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise UserError(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    zoo.check(*dict.fromkeys(r for n in names for r in step_roles(STEPS[n], lake.settings)))  # fail before any task
    results: dict[str, dict[str, int]] = {}
    for name in names:
        started = time.perf_counter()
        written = run_step(lake, STEPS[name], zoo)
        for table, n in written.items():
            results.setdefault(name, {}).setdefault(table, 0)
            results[name][table] += n
        progress(f"  {name:<12} {time.perf_counter() - started:6.1f}s  {written_line(written)}")
    return results


def written_line(written: dict[str, int]) -> str:
    """A step's counts as printed: rows per table (real tables only), then its other outputs."""
    rows = ", ".join(f"{t}={n}" for t, n in written.items() if t in TABLES)
    others = "; ".join(f"{OUTPUT_UNITS[t]}: {n}" for t, n in written.items() if t not in TABLES)
    return "; ".join(filter(None, [f"rows written: {rows}" if rows else "writes no table", others]))


def run_scoring(lake: Lakehouse, zoo: ModelZoo | None = None, progress=print) -> dict[str, dict[str, int]]:
    return run_steps(lake, SCORING, zoo, progress)
