"""Brand and trademark refusal: no scene, prompt or requested setting names a brand.

Pure text checks (no engine, no model), so a command can refuse a request before anything
starts. The curated list ships as data (etl/data/brands.toml); config.toml adds a user list
(`prompt_bank.brands`) and the catalog's own `brand` attributes are added by the caller.

Matching holds across case, plurals, possessives, accents and punctuation: "nike", "Nike's",
"NIKES", "iphones", "coca cola" / "Coca-Cola" / "cocacola", "play station". Whole words only,
so "ikea" is not found in "likeable". Names that are also ordinary words ("apple", "dove",
"gap", "target", "shell": the file's `capitalised` list) are refused only when written with a
capital after the text's first word, or in capitals: "next to an Apple laptop" is refused, "an
apple on a plate" is not. A refusal names the words as the text wrote them.
"""

from __future__ import annotations

import functools
import re
import tomllib
import unicodedata
from collections.abc import Iterable
from pathlib import Path

BRANDS_FILE = Path(__file__).with_name("data") / "brands.toml"
MAX_WORDS = 4  # the longest name, in words, matched word by word
MIN_JOINED = 6  # names matched when written as one word or split ("cocacola", "play station"): this long or more


def _tokens(text: str) -> list[str]:
    """Words as written (case kept): accents folded, possessives dropped ("Nike's" -> Nike),
    other apostrophes joined ("L'Oreal" -> LOreal), anything else a separator."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"['’]s\b|(?<=s)['’]", "", text)
    return re.findall(r"[A-Za-z0-9]+", text.replace("'", "").replace("’", ""))


def _key(name: str) -> tuple[str, ...]:
    return tuple(t.lower() for t in _tokens(name))


class BrandList:
    """Names indexed by their words and by their words joined, each marked whether any case counts."""

    def __init__(self, any_case: Iterable[str], capitalised: Iterable[str] = ()):
        self.words: dict[tuple[str, ...], bool] = {}
        self.joined: dict[str, bool] = {}
        for names, strict in ((capitalised, False), (any_case, True)):  # any case wins for a name in both
            for name in names:
                key = _key(name)
                if key:
                    self.words[key] = strict
                    if len("".join(key)) >= MIN_JOINED:
                        self.joined["".join(key)] = strict

    def find(self, text: str, allowed: Iterable[str] = ()) -> str | None:
        """The first brand the text names, as written there, or None. `allowed`: names not refused."""
        allowed_keys = {_key(a) for a in allowed} | {("".join(_key(a)),) for a in allowed}
        tokens = _tokens(text)
        lowered = [t.lower() for t in tokens]
        for start in range(len(tokens)):
            for size in range(min(MAX_WORDS, len(tokens) - start), 0, -1):
                window = lowered[start:start + size]
                strict = self._match(window)
                if strict is None:
                    continue
                if {tuple(window), ("".join(window),), tuple(_singular(window))} & allowed_keys:
                    continue
                written = tokens[start:start + size]
                capitalised = (start > 0 and written[0][:1].isupper()) or (len(written[0]) > 1 and written[0].isupper())
                if strict or capitalised:
                    return " ".join(written)
        return None

    def _match(self, window: list[str]) -> bool | None:
        for candidate in (window, _singular(window)):
            if tuple(candidate) in self.words:
                return self.words[tuple(candidate)]
            joined = "".join(candidate)
            if (len(window) > 1 or len(joined) >= MIN_JOINED) and joined in self.joined:
                return self.joined[joined]
        return None


def _singular(window: list[str]) -> list[str]:
    last = window[-1]
    return window[:-1] + [last[:-1]] if len(last) > 3 and last.endswith("s") and not last.endswith("ss") else window


@functools.cache
def brand_list(extra: tuple[str, ...] = ()) -> BrandList:
    """The shipped list (etl/data/brands.toml) plus `extra` names refused in any case."""
    data = tomllib.loads(BRANDS_FILE.read_text())
    return BrandList([*data["brands"], *extra], data["capitalised"])


def brand_in(text: str, extra: Iterable[str] = (), allowed: Iterable[str] = ()) -> str | None:
    """The brand a text names, as written there, or None: the shipped list plus `extra` (the
    user's list and the catalog's brands, refused in any case), except the `allowed` names."""
    extra = tuple(sorted({e for e in extra if e and e.strip()}))
    return brand_list(extra).find(text, allowed)


def brand_refusal(text: str, extra: Iterable[str] = (), allowed: Iterable[str] = ()) -> str | None:
    """Why a text may not be used, naming the brand, or None."""
    found = brand_in(text, extra, allowed)
    return f"names a brand ({found})" if found else None


def without_brands(text: str | None, extra: Iterable[str] = (), allowed: Iterable[str] = ()) -> str | None:
    """The text with every brand it names taken out ("a nike shoe on a bench" -> "a shoe on a
    bench"), for captions a model wrote: they keep describing the image without the name. None
    when a name cannot be located in the text as written (then the caption is not used)."""
    if text is None:
        return None
    for _ in range(20):
        found = brand_in(text, extra, allowed)
        if found is None:
            return " ".join(text.split())
        pattern = r"\b" + r"[\W_]*".join(re.escape(w) for w in found.split()) + r"(?:['’]?s)?\b"
        stripped = re.sub(pattern, "", text, count=1)  # as written: "Apple" goes, "an apple" stays
        if stripped == text:
            return None
        text = re.sub(r"\s+([,.;:])", r"\1", " ".join(stripped.split()))
    return None
