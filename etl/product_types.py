"""Product typing from catalog attributes and titles, without images.

A title names its product in its head noun phrase: the words before the first comma, " - ",
parenthesis or preposition ("with", "for", "in", ...), whose last noun is the head. "Laptop
sleeve, 13 inch" is a sleeve; "Backpack with laptop sleeve" a backpack; "Gift box for a
wristwatch" a gift box. A known type that appears only as a modifier ("laptop" in "laptop
sleeve") is not the product's type.

Each decision carries its source and a confidence in [0, 1]; a heuristic never claims 1.0:

| source | when | confidence |
| --- | --- | --- |
| `attribute` | the catalog names the type (`product_type`, `category`, ...; ABO codes mapped through etl/data/abo_product_types.csv) | 1.0: the catalog's own statement |
| `title_head` | a known type is the head of the title's noun phrase ("ceramic coffee cups" -> coffee cup) | 0.5 + 0.45 x MiniLM cosine(head phrase, type) |
| `title_similarity` | the head phrase is a synonym of a known type ("mug" -> coffee cup): MiniLM cosine >= `min_title_similarity`, `min_title_margin` ahead of the next | the cosine |
| `title_open` | no known type fits: the head phrase itself becomes an open-vocabulary type ("laptop sleeve") | 0.9 x MiniLM cosine(type, head phrase) |

A decision below `min_title_score`, a title in another language (it names a few function words
of other languages), or a head that names no kind of object ("Item 42", "New arrival") gives
no type: the images decide (CLIP zero-shot), else `unknown` with a review row.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ABO_TYPES_FILE = Path(__file__).with_name("data") / "abo_product_types.csv"
TYPE_KEYS = ("product_type", "category", "type", "item_type", "abo_product_type")  # attributes that name a type

# Where the head noun phrase ends: punctuation, a spaced dash, or a preposition.
PHRASE_END = re.compile(r"[,;:(\[{|/+!?]|\s[-–—]+\s|\s(?:with|for|in|on|by|from|featuring|including|without|"
                        r"to|at|inside|under|over|made|perfect|ideal|compatible)\s", re.IGNORECASE)
# "Set of 4 coffee cups", "Pair of sneakers": the product is what the set holds.
QUANTITY_PREFIX = re.compile(r"^(?:an?\s+)?(?:\d+\s*)?(?:set|pack|pair|bundle|lot|box|kit|collection|case)s?\s+of\s+"
                             r"(?:\d+\s+)?", re.IGNORECASE)
# Function words of other languages: a title naming one is not typed from its words (the
# sentence model and the head-noun rules are English).
FOREIGN_WORDS = frozenset("""
    de del della delle dei des du les el los las en et para pour avec mit aus für und der das eine einem einen von
    zu di il gli och för het een voor sur sans ohne sul nel nella em uma dos na ao pelo pela
    """.split())
# Trailing words that are no noun: sizes, units, editions, model suffixes.
TRAILING = frozenset("""
    pro max plus mini ultra lite se xl xxl xs edition series version gen generation inch inches cm mm ml oz lb lbs
    kg gb tb mb pcs pc pieces piece count ct pack new
    """.split())
# Heads that name no kind of object: a title whose head is one of these gives no type.
NOT_A_TYPE = frozenset("""
    item items product products thing things stuff unit units piece pieces sku arrival arrivals sale deal deals
    offer offers bestseller clearance discount edition version series collection set pack bundle lot kit gift
    gifts accessory accessories model design style type size color colour new sample
    """.split())
# Modifiers that do not belong in an open-vocabulary type ("blue wrapped present" -> present).
DESCRIPTIVE = frozenset("""
    red blue green black white grey gray pink purple yellow orange brown beige navy gold golden silver ivory cream
    clear transparent leather wooden wood cotton steel stainless glass ceramic plastic metal oak bamboo silk wool
    linen velvet porcelain brass copper aluminium aluminum marble stone rubber silicone canvas denim suede
    small large big mini medium tall short long wide slim heavy light new modern vintage classic retro portable
    wireless waterproof electric digital smart adjustable foldable premium luxury deluxe soft hard hot cold
    shiny fluffy cozy cosy sturdy fancy pretty sparkly glossy silky comfy sporty trendy natural floral universal
    tropical vertical horizontal seasonal professional industrial original personal formal casual traditional
    men mens men's women womens women's kids kid's children's boys girls baby unisex adult outdoor indoor
    """.split())
DESCRIPTIVE_SUFFIX = re.compile(r".{2,}(ed|ic|ical|less|ous|ful|ive|able|ible|ish)$")
# Nouns that are plural in the singular ("headphones", "jeans"): never singularized.
PLURALIA = frozenset("""
    headphones earphones earbuds jeans pants trousers shorts leggings tights pajamas pyjamas scissors glasses
    sunglasses goggles pliers tongs binoculars clothes overalls
    """.split())


@dataclass(frozen=True)
class Typing:
    product_type: str
    source: str  # attribute, title_head, title_similarity, title_open
    score: float  # confidence in [0, 1]


class MemoEncoder:
    """A sentence encoder that embeds each text once: the known types' names are embedded once
    per run, not once per product, and a text's vector does not depend on its batch."""

    def __init__(self, encoder):
        self.encoder, self.vectors = encoder, {}

    def embed(self, texts: list[str]) -> np.ndarray:
        for text in dict.fromkeys(t for t in texts if t not in self.vectors):
            self.vectors[text] = self.encoder.embed([text])[0]
        return np.stack([self.vectors[t] for t in texts])


@functools.cache
def _abo_types() -> dict[str, str]:
    """ABO `product_type` code -> readable class noun; '' for a department (no one type)."""
    with open(ABO_TYPES_FILE, newline="") as fh:
        return {row["code"].strip(): row["class_noun"].strip()
                for row in csv.DictReader(line for line in fh if not line.startswith("#"))}


def catalog_type(value: str | None) -> str | None:
    """The readable type a catalog attribute names: ABO-style codes ("CHAIR", "HOME_BED_AND_BATH")
    through etl/data/abo_product_types.csv (None for a department, which names no one type), an
    unlisted code spelled out ("CELLULAR_PHONE_CASE" -> "cellular phone case"), any other text
    as it is."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if re.fullmatch(r"[A-Z0-9]+(?:_[A-Z0-9]+)*", value):
        noun = _abo_types().get(value)
        if noun is None:
            return value.replace("_", " ").lower()
        return noun or None
    return value


def singular(word: str) -> str:
    if word in PLURALIA or len(word) < 4 or word.endswith(("ss", "us", "is")):
        return word
    for plural, single in (("ives", "ife"), ("lves", "lf"), ("rves", "rf"), ("ies", "y"), ("ches", "ch"),
                           ("shes", "sh"), ("sses", "ss"), ("xes", "x"), ("zes", "z")):
        if word.endswith(plural):
            return word[: -len(plural)] + single
    return word[:-1] if word.endswith("s") else word


def words(text: str) -> list[str]:
    """Lower-case words; hyphens and apostrophes split ("coffee-cup" -> coffee cup, "t-shirt" -> t shirt)."""
    return re.findall(r"[a-z0-9]+", text.lower().replace("'s ", " ").replace("’s ", " "))


def _key(tokens: list[str]) -> tuple[str, ...]:
    return tuple(tokens[:-1]) + (singular(tokens[-1]),) if tokens else ()


def head_phrase(title: str) -> list[str] | None:
    """The words of the title's head noun phrase, trailing sizes and model codes dropped; None
    for a title in another language or one without a phrase."""
    title = " ".join((title or "").split())
    if set(words(title)) & FOREIGN_WORDS:
        return None
    title = QUANTITY_PREFIX.sub("", title)
    phrase = words(PHRASE_END.split(f" {title} ", maxsplit=1)[0])
    while phrase and (phrase[-1] in TRAILING or any(c.isdigit() for c in phrase[-1]) or len(phrase[-1]) == 1):
        phrase.pop()
    return phrase or None


def _open_type(phrase: list[str]) -> str | None:
    """The open-vocabulary type of a head phrase: its head noun, with the word before it when
    that word is a noun ("laptop sleeve", "water bottle") rather than a descriptive one."""
    head = phrase[-1]
    if head in NOT_A_TYPE or head in DESCRIPTIVE or len(head) < 3:
        return None
    head = singular(head)
    before = phrase[-2] if len(phrase) > 1 else None
    if before and before not in DESCRIPTIVE and not DESCRIPTIVE_SUFFIX.match(before) and len(before) > 2 \
            and before not in NOT_A_TYPE and not before.endswith("ing") and not before.isdigit():
        return f"{before} {head}"
    return head


def type_from_attributes(attributes: str | dict | None) -> Typing | None:
    values = json.loads(attributes or "{}") if not isinstance(attributes, dict) else attributes
    for key in TYPE_KEYS:
        if isinstance(values.get(key), str) and (found := catalog_type(values[key])):
            return Typing(found, "attribute", 1.0)
    return None


def type_from_title(title: str | None, known: list[str], encoder, settings, refusal=None) -> Typing | None:
    """The title's type (see the module docstring), or None. `encoder` embeds texts (MiniLM);
    `refusal(text)` says why a text may not be a type (a brand: "iphone" is no class noun)."""
    phrase = head_phrase(title or "")
    if phrase is None:
        return None
    keys = {t: _key(words(t)) for t in known if words(t)}
    mine = _key(phrase)
    heads = [t for t, k in keys.items() if mine[-len(k):] == k]  # known types the phrase ends with
    text = " ".join(phrase)
    if heads:
        best = max(heads, key=lambda t: len(keys[t]))  # "coffee cup" wins over "cup"
        vectors = encoder.embed([text, best])
        return Typing(best, "title_head", round(0.5 + 0.45 * float(vectors[0] @ vectors[1]), 4))
    # A synonym of a known type, never one the phrase names as a modifier ("laptop" in "laptop
    # bag") or a sibling with the same head noun ("water bottle" is no "perfume bottle").
    candidates = [t for t, k in keys.items()
                  if not set(k) & set(mine) and not (set(words(t)) & set(phrase))]
    if candidates:
        vectors = encoder.embed([text] + candidates)
        scores = vectors[1:] @ vectors[0]
        order = np.argsort(-scores)
        best, margin = float(scores[order[0]]), float(scores[order[0]] - (scores[order[1]] if len(order) > 1 else 0))
        if best >= settings.min_title_similarity and margin >= settings.min_title_margin:
            return Typing(candidates[order[0]], "title_similarity", round(best, 4))
    open_type = _open_type(phrase)
    if open_type is None or (refusal and refusal(open_type)):
        return None
    vectors = encoder.embed([open_type, text])
    score = round(0.9 * float(vectors[0] @ vectors[1]), 4)
    return Typing(open_type, "title_open", score) if score >= settings.min_title_score else None
