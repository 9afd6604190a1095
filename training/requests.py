"""What an on-demand request (`recontext imagine`, recontext-service) must be, checked before
any table is read or the engine starts: a refused argument costs no engine, no model and no
data. The checks that need data (is the product known, has it a champion, does the scene name
another product type or a catalog brand) follow in training/imagine.py.

Kept free of the engine's and the models' imports, so a refusal returns at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from etl import tracking
from core.settings import Settings
from core.errors import UserError

MAX_IMAGES = 64  # per request: a larger ask is a batch job (approve target prompts, `recontext generate`)
REFUSED = 2  # exit code of a refused request (bad input the caller can fix)


@dataclass(frozen=True)
class Request:
    product_id: str
    scene: str  # whitespace normalized
    n: int
    keep: int
    seed: int
    arm: str


def checked_request(settings: Settings, product_id: str, scene: str, n: int = 4, keep: int | None = None,
                    seed: int | None = None, arm: str = tracking.OURS) -> Request:
    """The request with its defaults filled in, or a UserError (exit code REFUSED) naming what
    is wrong. Every check here needs no data: the one place to add such a check."""
    from etl.prompt_text import scene_text_refusal

    generation = settings.generation
    keep = min(generation.keep_top, n) if keep is None else keep
    seed = generation.seed if seed is None else seed
    if not 1 <= n <= MAX_IMAGES:
        raise UserError(f"n must be between 1 and {MAX_IMAGES}, not {n}", REFUSED)
    if not 1 <= keep <= n:
        raise UserError(f"keep must be between 1 and n ({n}), not {keep}", REFUSED)
    if arm not in (tracking.OURS, tracking.BASELINE):
        raise UserError(f"arm must be {tracking.OURS} or {tracking.BASELINE}, not {arm!r}", REFUSED)
    if not str(product_id).strip():
        raise UserError("the product id must not be empty", REFUSED)
    scene = " ".join(str(scene).split())
    reason = scene_text_refusal(scene, settings.prompt_bank)
    if reason:
        raise UserError(f"scene refused: {reason}: {scene!r}", REFUSED)
    return Request(str(product_id), scene, n, keep, seed, arm)
