"""Checks of a prompt's text that need no data and no model: length, degenerate text, names in
a requested scene. Shared by the prompt bank's curation (etl/prompt_bank.py) and the checks of
an on-demand request (training/requests.py), which run before the engine starts: this module
imports nothing heavy, so a refusal returns at once.
"""

from __future__ import annotations

import re

from etl.brands import brand_refusal
from core.settings import PromptBankSettings

# Words that carry no content, for the repetition and adjective checks.
STOPWORDS = frozenset("a an the of on in with and by at to for from into onto near under over beside next its "
                      "is are be as it this that or while".split())
# Adjectives marketing text piles up; with the suffix rule below, the "mostly adjectives" check.
ADJECTIVES = frozenset("""
    luxury luxurious premium elegant beautiful stunning gorgeous perfect amazing high-end expensive cheap
    modern classic stylish chic sleek trendy fancy exquisite exclusive fine nice great good best top quality
    high low new old vintage unique special sophisticated glamorous opulent lavish humble simple pretty
    """.split())
ADJECTIVE_SUFFIX = re.compile(r".{3,}(ous|ful|ive|ible|able|ish|less|esque)$")


def lower_words(text: str) -> list[str]:
    return re.findall(r"[a-z][a-z'-]*", text.lower())


def length_refusal(text: str, settings: PromptBankSettings) -> str | None:
    words = text.split()
    if len(words) < settings.min_words:
        return f"too short ({len(words)} words, minimum {settings.min_words})"
    if len(words) > settings.max_words:
        return f"too long ({len(words)} words, maximum {settings.max_words})"
    return None


def degenerate(text: str, settings: PromptBankSettings) -> str | None:
    """Why a text is degenerate (what small LLMs write when they loop or pile up adjectives), or
    None: a word three times in a row; a content word (or its stem: "luxury", "luxurious") used
    more than `max_word_repeats` times; for 8+ words, a type-token ratio below
    `min_type_token_ratio`; more than `max_adjective_share` of the content words adjectives."""
    words = lower_words(text)
    for a, b, c in zip(words, words[1:], words[2:]):
        if a == b == c:
            return f"degenerate: repeats '{a}' three times in a row"
    content = [w for w in words if w not in STOPWORDS]
    stems: dict[str, list[str]] = {}
    for word in content:
        stems.setdefault(word[:5] if len(word) > 5 else word, []).append(word)
    stem, uses = max(stems.items(), key=lambda item: len(item[1]), default=("", []))
    if len(uses) > settings.max_word_repeats:
        return f"degenerate: repeats '{uses[0]}' {len(uses)} times (maximum {settings.max_word_repeats})"
    if len(words) >= 8 and len(set(words)) / len(words) < settings.min_type_token_ratio:
        return (f"degenerate: only {len(set(words))} distinct words of {len(words)} (type-token ratio below "
                f"{settings.min_type_token_ratio})")
    adjectives = [w for w in content if w in ADJECTIVES or ADJECTIVE_SUFFIX.match(w)]
    if len(content) >= 2 and len(adjectives) / len(content) > settings.max_adjective_share:
        return f"degenerate: mostly adjectives ({', '.join(adjectives[:4])}), no description"
    return None


def scene_text_refusal(scene: str, settings: PromptBankSettings) -> str | None:
    """Why a requested scene is refused by the checks that need no data, or None: length,
    degenerate text, a brand (etl/brands.py: the shipped list and `prompt_bank.brands`, any case)
    and, stricter than for LLM text (a person can rephrase), any capitalized word after the first
    ("next to a Nike shoe"): names of brands, people and places are not generated. With
    `prompt_bank.allow_own_brand` the last two wait for etl/prompt_bank.scene_refusal, which knows
    the product's own brand and adds the checks against the home's types and brands."""
    text = " ".join(scene.split())
    if reason := length_refusal(text, settings) or degenerate(text, settings):
        return reason
    if settings.allow_own_brand:
        return None
    return brand_refusal(text, settings.brands) or capitalized_refusal(text)


def capitalized_refusal(text: str, allowed: tuple[str, ...] = ()) -> str | None:
    """A capitalized word after the first that is not an `allowed` name, as a refusal, or None."""
    words = (w.strip(".,;:!?'\"()") for w in text.split()[1:])
    if name := next((w for w in words if w[:1].isupper() and w not in allowed), None):
        return f"names a brand, person or place ({name}); describe the setting without names"
    return None
