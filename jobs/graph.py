"""The stage graph of jobs/pipeline.toml: stages, their steps and dependencies, checked.

A stage's reads, writes, model roles and device are not written in the file: they are the union
of its steps' declarations (etl/step.py, beside each step's code; jobs/steps.py collects them).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from core.settings import Settings
from core.errors import UserError
from etl.step import NON_TABLES
from core.tables import TABLES

PIPELINE_FILE = Path(__file__).with_name("pipeline.toml")


def _steps() -> dict:
    """jobs.steps.STEPS, imported when first needed: the steps' modules import the engine and
    the models, which checking a command's stage names must not wait for."""
    from jobs.steps import STEPS

    return STEPS


def _union(lists) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for items in lists for item in items))


@dataclass(frozen=True)
class Stage:
    name: str
    steps: tuple[str, ...]
    depends_on: tuple[str, ...]
    description: str

    @property
    def reads(self) -> tuple[str, ...]:
        return _union(_steps()[s].reads for s in self.steps)

    @property
    def writes(self) -> tuple[str, ...]:
        return _union(_steps()[s].writes for s in self.steps)

    def roles(self, settings: Settings | None = None) -> tuple[str, ...]:
        """Model roles its steps load: as declared, or as `settings` resolve them."""
        from jobs.steps import step_roles

        return _union(step_roles(_steps()[s], settings) if settings else _steps()[s].roles for s in self.steps)

    @property
    def device(self) -> str:
        """`gpu` when any of its steps loads a model, else `cpu`."""
        return "gpu" if any(_steps()[s].device == "gpu" for s in self.steps) else "cpu"

    def describe(self, settings: Settings | None = None) -> dict:
        """The stage as users and schedulers see it (`recontext stages`)."""
        return {"stage": self.name, "steps": list(self.steps), "depends_on": list(self.depends_on),
                "reads": list(self.reads), "writes": list(self.writes), "roles": list(self.roles(settings)),
                "device": self.device, "description": self.description}


def load_stages(path: Path = PIPELINE_FILE) -> dict[str, Stage]:
    """The stages of the pipeline file, checked: known steps and tables, existing dependencies,
    no cycles. Returned in dependency order."""
    raw = tomllib.loads(Path(path).read_text())["stages"]
    stages = {name: Stage(name, tuple(s["steps"]), tuple(s["depends_on"]), s.get("description", ""))
              for name, s in raw.items()}
    for stage in stages.values():
        extra = sorted(set(raw[stage.name]) - {"steps", "depends_on", "description"})
        problems = ([f"unknown step {s!r}" for s in stage.steps if s not in _steps()]
                    + [f"unknown dependency {d!r}" for d in stage.depends_on if d not in stages]
                    + [f"unknown key(s) {', '.join(extra)} (reads, writes and roles come from the steps' "
                       "declarations)"] * bool(extra))
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
    check_declarations()
    return {name: stages[name] for name in ordered}


def check_declarations() -> None:
    """Every step names only declared tables (or the NON_TABLES inputs and outputs)."""
    for step in _steps().values():
        unknown = [t for t in (*step.reads, *step.writes) if t not in TABLES and t not in NON_TABLES]
        if unknown:
            raise ValueError(f"step {step.name!r} declares unknown table(s) {', '.join(unknown)}")


def load_groups(path: Path = PIPELINE_FILE) -> dict[str, list[str]]:
    return tomllib.loads(Path(path).read_text()).get("groups", {})


def steps_for(*names: str) -> list[str]:
    """The steps of stages or groups, in the order given (for tests and benchmarks that call
    jobs.steps.run_steps directly)."""
    stages, groups = load_stages(), load_groups()
    return [step for name in names for stage in groups.get(name, [name]) for step in stages[stage].steps]


def select(stages: dict[str, Stage], names: list[str]) -> list[Stage]:
    """`all`, or the named stages, in dependency order (dependencies are not added: run `all`,
    or name them, to include them; skipping makes that cheap)."""
    if not names or names == ["all"]:
        return list(stages.values())
    _refuse_unknown(names, list(stages))
    return [s for s in stages.values() if s.name in names]


def check_stage_names(names: list[str], path: Path = PIPELINE_FILE) -> None:
    """select()'s check of the names alone, from the file (nothing else imported or started)."""
    if names and names != ["all"]:
        _refuse_unknown(names, list(tomllib.loads(Path(path).read_text())["stages"]))


def _refuse_unknown(names: list[str], stages: list[str]) -> None:
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; stages: all, {', '.join(stages)}")
