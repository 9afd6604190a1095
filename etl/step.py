"""The declaration every pipeline step makes beside its code: what it runs, which tables it
reads and writes, and which model roles it loads (and so whether it wants a GPU).

jobs/steps.py collects the declarations; jobs/pipeline.toml groups steps into stages, whose
reads, writes, roles and device are the union of their steps'. The runner (jobs/steps.py
run_step) holds each step to its declaration: the tables its queries name, the roles it loads and
the tables its own commits change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Inputs and outputs that are not Delta tables: the files `ingest.sources` lists, the registry's
# champion aliases (a promotion changes what generation uses), models registered in MLflow, and
# files written under the home.
CATALOG_FILES = "source:catalog"
CHAMPIONS = "registry:champions"
REGISTERED_MODELS = "registry:models"
REPORT_FILES = "files:report"
NON_TABLES = (CATALOG_FILES, CHAMPIONS, REGISTERED_MODELS, REPORT_FILES)


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable  # (lake, zoo) -> {table: rows written}; reads its own settings section
    # Inputs (tables or NON_TABLES) whose change makes it run again. Not the step's own outputs
    # that it consults only to skip done work: a later stage adding to them is no new input.
    reads: tuple[str, ...]
    writes: tuple[str, ...]  # tables (or NON_TABLES outputs) it may write; checked after it runs
    roles: tuple[str, ...] = ()  # model roles it may load (udfs/zoo.py ROLES; "segmenter" = the configured one)
    description: str = ""

    @property
    def device(self) -> str:
        """`gpu` when the step loads a model, else `cpu`."""
        return "gpu" if self.roles else "cpu"
