"""The model zoo: which weights each role loads, tiny random-weight builds, one load per process.

Roles: clip, dino, captioner, u2netp (salient-object mask), sam. A role whose path is unset in
the models settings gets a tiny random-weight model with the real architecture, built once
into `<home>/models/tiny/<role>` in the library's own on-disk layout and loaded back through
the same loader that real weights use.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from etl.config import ModelSettings, Settings
from etl.errors import UserError
from udfs.packaged import PACKAGED, packaged_weights


@dataclass(frozen=True)
class Role:
    required: tuple[str, ...]  # files a folder must hold ("" = the path is itself the file)
    build_tiny: Callable[[Path], object] | None
    tiny_name: str  # path below the tiny dir


def _roles() -> dict[str, Role]:
    from udfs import captioner, clip, diffusion, dino, segmenter, sentence

    return {
        "clip": Role(clip.REQUIRED_FILES, clip.build_tiny, "clip"),
        "dino": Role(dino.REQUIRED_FILES, dino.build_tiny, "dino"),
        "captioner": Role(captioner.REQUIRED_FILES, captioner.build_tiny, "captioner"),
        "sam": Role(("",), segmenter.build_tiny_sam, "sam/sam_tiny.pth"),
        "u2netp": Role(("",), None, ""),
        "text2img": Role(diffusion.REQUIRED_FILES, diffusion.build_tiny_text2img, "text2img"),
        "inpaint": Role(diffusion.REQUIRED_FILES, diffusion.build_tiny_inpaint, "inpaint"),
        "image2video": Role(diffusion.REQUIRED_FILES, diffusion.build_tiny_image2video, "image2video"),
        "llm": Role((), None, ""),
        "sentence": Role(sentence.REQUIRED_FILES, None, ""),
    }


ROLES = ("clip", "dino", "captioner", "sam", "u2netp", "text2img", "inpaint", "image2video", "llm", "sentence")


_loaded: dict[tuple, object] = {}
_in_use: dict[tuple, threading.Lock] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class ModelZoo:
    """Picklable (settings only), so UDFs carry it to workers and load there."""

    models: ModelSettings
    tiny_dir: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> "ModelZoo":
        tiny = Path(settings.models.tiny_dir) if settings.models.tiny_dir else settings.home / "models" / "tiny"
        return cls(settings.models, tiny)

    def path(self, role: str) -> Path:
        configured = getattr(self.models, role).path
        if configured:
            return Path(configured).expanduser()
        if role in PACKAGED:  # real weights that an installed package ships
            return packaged_weights(role)
        return self.tiny_dir / _roles()[role].tiny_name

    def name(self, role: str) -> str:
        spec = getattr(self.models, role)
        if spec.name:
            return spec.name
        if spec.path:
            return Path(spec.path).name
        return PACKAGED[role][3] if role in PACKAGED else f"tiny-{role}"

    def is_tiny(self, role: str) -> bool:
        return not getattr(self.models, role).path and role not in PACKAGED

    def check(self, *roles: str) -> None:
        """Build missing tiny models; raise a clear error for a missing or broken model path.

        Call on the driver before any Spark task runs.
        """
        for role in roles:
            if role not in ROLES:
                raise UserError(f"unknown model role '{role}'; roles: {', '.join(ROLES)}")
            path = self.path(role)
            if self.is_tiny(role) and not path.exists():
                _build_atomically(_roles()[role].build_tiny, path)
            hint = f"set models.{role}.path in <home>/config.toml"
            if not path.exists():
                raise UserError(f"model for role '{role}' not found: {path} does not exist; {hint}")
            missing = [f for f in _roles()[role].required if f and not (path / f).exists()]
            if missing:
                raise UserError(f"model for role '{role}' at {path} is incomplete (missing "
                                f"{', '.join(missing)}); {hint}")

    def _key(self, role: str) -> tuple:
        return (role, str(self.path(role)), self.models.device, self.models.sam_variant)

    def load(self, role: str):
        """The loaded model for a role, once per process (every UDF batch reuses it)."""
        key = self._key(role)
        with _lock:
            if key not in _loaded:
                _loaded[key] = self._load(role, self.path(role))
                _in_use[key] = threading.Lock()
            return _loaded[key]

    def exclusive(self, role: str) -> threading.Lock:
        """Hold while calling a loaded model that keeps state between steps (diffusers pipelines
        and their schedulers): an engine may run several tasks at once in one worker process."""
        self.load(role)
        return _in_use[self._key(role)]

    def _load(self, role: str, path: Path):
        device = self.models.device
        try:
            if role == "clip":
                from udfs.clip import ClipModel

                return ClipModel(path, device)
            if role == "dino":
                from udfs.dino import DinoModel

                return DinoModel(path, device)
            if role == "captioner":
                from udfs.captioner import Captioner

                return Captioner(path, device)
            if role == "sam":
                from udfs.segmenter import SamSegmenter

                return SamSegmenter(path, self.models.sam_variant, device)
            if role in ("text2img", "inpaint", "image2video"):
                from udfs.diffusion import load_pipeline

                return load_pipeline(role, path, device)
            if role == "llm":
                from udfs.llm import LocalLLM

                return LocalLLM(path, device)
            if role == "sentence":
                from udfs.sentence import SentenceEncoder

                return SentenceEncoder(path)
            from udfs.segmenter import U2NetSegmenter

            return U2NetSegmenter(path, device)
        except Exception as err:
            raise UserError(f"model for role '{role}' at {path} failed to load: {type(err).__name__}: {err}") from err


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
