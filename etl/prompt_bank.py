"""Prompt bank job: per product type, the curated seed bank shipped with recontext
(etl/data/seed_prompts.toml) and an LLM's prompts, written once; curation marks each approved
or rejected with a reason; people review through SQL-backed commands or a CSV round trip. An
unattended run guarantees `min_scenes` approved scenes per type (seeds, more LLM rounds, then
the generic seed scenes). Also classifies products that have no type (attributes, else the
title's head noun phrase, else zero-shot CLIP, else `unknown`: etl/product_types.py).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

from etl.brands import brand_in
from core.settings import PromptBankSettings
from core.errors import UserError
from etl.lakehouse import Lakehouse
from etl.product_types import MemoEncoder, type_from_attributes, type_from_title
from etl.prompt_text import capitalized_refusal, degenerate, length_refusal, lower_words
from etl.step import Step
from core.tables import TABLES, sql_list, sql_literal
from udfs.zoo import ModelZoo

STAGE = "prompt_bank"
PURPOSES = ("scene", "target")
STATUSES = ("approved", "rejected", "pending")
SYSTEM = "You write short, concrete descriptions for e-commerce product photography."
ASK = {
    "scene": ("List {n} different realistic places or surfaces where a {type} could be photographed. "
              "One per line, numbered. Each under 15 words. Describe only the setting: never the {type} "
              "itself, brands or people."),
    "target": ("List {n} different short descriptions of a photo of a {type} being used in a realistic "
               "setting. One per line, numbered, each under 20 words. Name no brands and no people."),
}
CAPITALIZED_RUN = re.compile(r"\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)+")
UNKNOWN = "unknown"  # the type of a product nothing could classify with confidence
SEED_FILE = Path(__file__).with_name("data") / "seed_prompts.toml"
# Words that name a setting (a place, surface, backdrop or light): a scene must name one.
SETTING_WORDS = frozenset("""
    room kitchen bathroom bedroom nursery hallway hall entryway porch patio balcony terrace deck garage attic
    basement studio office workshop workbench bench garden backyard yard lawn park street sidewalk road alley
    city beach sand shore sea ocean lake river pool poolside forest woods trail mountain hill field meadow
    desert snow camp campsite cafe restaurant bar bakery shop store boutique market showroom gallery museum
    library classroom school gym court track arena stadium pitch rink stage counter countertop table tabletop
    desk shelf shelves bookshelf cabinet dresser nightstand sideboard mantel mantelpiece windowsill window
    sill floor rug carpet mat blanket wall backdrop background surface plinth pedestal podium stand display
    case tray board slab marble granite concrete wood wooden oak walnut stone brick tile tiles linen cloth
    tablecloth fabric sheet bed sofa couch chair stool armchair seat car vehicle dashboard trunk boat dock
    pier platform launchpad pad runway hangar airfield sky skyline sunset sunrise dusk dawn night light
    lighting daylight sunlight moonlight lamp candlelight shade shadow corner nook alcove loft apartment
    house home cabin cottage barn farmhouse interior exterior outdoors outside indoors inside vanity mirror
    sink bathtub tub shower closet wardrobe rack hanger locker lobby reception plaza square fountain
    rooftop roof terrace greenhouse orchard vineyard kitchenette pantry dining diner canteen picnic
    grass moss leaves paper cardboard box crate pallet shelving glass acrylic velvet silk leather
    """.split())


def prompt_id(product_type: str, purpose: str, text: str) -> str:
    return hashlib.sha256(f"{product_type}|{purpose}|{text}".encode()).hexdigest()[:16]


def class_noun(product_type: str | None) -> str:
    """The noun prompts use for a product type: "product" when the type is unknown."""
    return "product" if product_type in (None, UNKNOWN) else product_type


def resolved_types(lake: Lakehouse):
    """product_id, product_type: the catalog's type, else the classified one."""
    return lake.spark.sql(
        """
        SELECT p.product_id, coalesce(p.product_type, c.product_type) AS product_type
        FROM products p LEFT JOIN product_classes c ON c.product_id = p.product_id
        """
    )


# --- classification -----------------------------------------------------------------------


def run_classify(lake: Lakehouse, zoo: ModelZoo, known_types: tuple[str, ...] | None = None) -> dict[str, int]:
    """Type every product the catalog left untyped: its attributes, else its title's head noun
    phrase (etl/product_types.py, with the sentence model), else zero-shot CLIP of its photos,
    else `unknown` with a review row. Each row keeps its source and confidence."""
    known_types = lake.settings.prompt_bank.known_types if known_types is None else known_types
    spark = lake.spark
    untyped = spark.sql(
        """SELECT p.product_id, p.title, p.attributes FROM products p
           LEFT ANTI JOIN product_classes c ON c.product_id = p.product_id
           WHERE p.product_type IS NULL"""
    ).toPandas()
    if untyped.empty:
        return {"product_classes": 0, "quarantine": 0}
    known = sorted({r["product_type"] for r in spark.sql(
        "SELECT DISTINCT product_type FROM products WHERE product_type IS NOT NULL").collect()}
        | set(seed_types()) | set(known_types))
    settings, brands = lake.settings.prompt_bank, catalog_brands(lake)
    encoder = None
    rows, failures = [], []
    for product in untyped.itertuples(index=False):
        found = type_from_attributes(product.attributes)
        if found is None:
            encoder = encoder or MemoEncoder(zoo.load("sentence"))
            found = type_from_title(product.title, known, encoder, settings,
                                    lambda text: brand_in(text, [*brands, *settings.brands]))
        if found:
            rows.append((product.product_id, found.product_type, found.source, found.score,
                         zoo.name("sentence") if found.source != "attribute" else ""))
    zero_shot = untyped[~untyped.product_id.isin([r[0] for r in rows])]
    if len(zero_shot):
        rows += _zero_shot(lake, zoo, list(zero_shot.product_id), known, failures)
    classes = pd.DataFrame(rows, columns=TABLES["product_classes"].data_columns)
    return {"product_classes": lake.upsert_rows("product_classes", classes) if len(classes) else 0,
            "quarantine": lake.quarantine("classify", [(pid, "type:?", code, why) for pid, code, why in failures])}


def _zero_shot(lake: Lakehouse, zoo: ModelZoo, product_ids: list[str], known: list[str], failures: list) -> list:
    """Mean cosine of each product's reference CLIP embeddings to "a photo of a <type>". Below
    `min_zero_shot_score`, or within `min_zero_shot_margin` of the runner-up, the type is UNKNOWN
    (generic scenes follow) and a review row in quarantine names the product."""
    settings = lake.settings.prompt_bank
    backbone = zoo.name("clip")
    lake.spark.createDataFrame(pd.DataFrame({"product_id": product_ids}), "product_id string") \
        .createOrReplaceTempView("_untyped")
    vectors = lake.spark.sql(
        f"""SELECT i.product_id, e.vector FROM product_images i JOIN _untyped u ON u.product_id = i.product_id
            JOIN embeddings e ON e.image_id = i.image_id
            WHERE e.backbone = {sql_literal(backbone)} AND e.variant = 'full'"""
    ).toPandas()
    texts = zoo.load("clip").embed_texts([f"a photo of a {t}" for t in known]).astype(np.float64)
    rows = []
    for product_id in product_ids:
        mine = vectors[vectors.product_id == product_id].vector
        if mine.empty:
            failures.append((product_id, "unclassified",
                             "no image embeddings to classify from; run `recontext score` first"))
            continue
        scores = (np.stack([np.asarray(v, dtype=np.float64) for v in mine]) @ texts.T).mean(axis=0)
        order = np.argsort(-scores)
        best, margin = float(scores[order[0]]), float(scores[order[0]] - scores[order[1]]) if len(order) > 1 else 1.0
        if best < settings.min_zero_shot_score or margin < settings.min_zero_shot_margin:
            failures.append((product_id, "unknown_type",
                             f"zero-shot CLIP is not sure: best type '{known[order[0]]}' scored {best:.3f} "
                             f"(minimum {settings.min_zero_shot_score}), {margin:.3f} ahead of the next (minimum "
                             f"{settings.min_zero_shot_margin}); it gets generic scenes. Assign its type with "
                             f"`recontext prompts set-type {product_id} TYPE`"))
            rows.append((product_id, UNKNOWN, "clip_zero_shot", best, backbone))
        else:
            rows.append((product_id, known[order[0]], "clip_zero_shot", best, backbone))
    return rows


def set_type(lake: Lakehouse, product_id: str, product_type: str) -> int:
    """A person's type for a product (`recontext prompts set-type`): it wins over classification,
    and the product's unknown-type review row is cleared."""
    found = lake.spark.sql(f"SELECT product_id FROM products WHERE product_id = {sql_literal(product_id)}").collect()
    if not found:
        raise UserError(f"unknown product {product_id!r}")
    if not product_type.strip():
        raise UserError("the product type must not be empty")
    if brand := brand_in(product_type, [*catalog_brands(lake), *lake.settings.prompt_bank.brands]):
        raise UserError(f"a type names a kind of product, not a brand ({brand}): prompts would name it")
    row = pd.DataFrame([(product_id, product_type.strip(), "human", 1.0, "")],
                       columns=TABLES["product_classes"].data_columns)
    written = lake.upsert_rows("product_classes", row)
    lake.delete("quarantine", f"stage = 'classify' AND product_id = {sql_literal(product_id)}")
    return written


# --- prompt generation and curation -------------------------------------------------------


def run_prompt_bank(lake: Lakehouse, zoo: ModelZoo, settings: PromptBankSettings | None = None,
                    seed: int | None = None) -> dict[str, int]:
    """Fill the bank for every product type that has no prompts of a purpose yet (cached): the
    seed prompts of the type, the LLM's, more LLM rounds while fewer than the minimum are
    approved, then the generic seed prompts. All go through the same curation."""
    settings = settings or lake.settings.prompt_bank
    seed = lake.settings.augment.seed if seed is None else seed
    spark = lake.spark
    types = sorted({r["product_type"] for r in resolved_types(lake).collect() if r["product_type"]})
    have = {(r["product_type"], r["purpose"]) for r in spark.sql(
        "SELECT DISTINCT product_type, purpose FROM prompt_bank").collect()}
    todo = [(t, p) for t in types for p in PURPOSES if (t, p) not in have]
    if not todo:
        return {"prompt_bank": 0}
    encoder = zoo.load("sentence")
    brands = catalog_brands(lake)
    banks = []
    for product_type, purpose in todo:
        others = sorted(t for t in set(types) | set(seed_types()) if t not in (product_type, UNKNOWN))
        bank = _TypeBank(product_type, purpose, others, brands, encoder, settings)
        bank.add(seed_prompts(product_type, purpose), "seed", None, seed)
        banks.append(bank)
    # The LLM's rounds, each one batch over every type and purpose still asking (one generate
    # call instead of one per type and purpose): the first round always (the LLM extends the
    # bank), later ones while fewer than the minimum are approved. An unknown type gets no LLM
    # prompts: "a photo of a unknown" is no request to make.
    llm = None
    for attempt in range(max(1, settings.llm_rounds)):
        asking = [b for b in banks if b.product_type != UNKNOWN and (attempt == 0 or b.approved < b.minimum)]
        if not asking:
            break
        llm = llm or _llm(zoo, settings)
        answers = llm.complete_batch([b.question() for b in asking], settings.max_new_tokens, settings.temperature,
                                     seed + attempt)
        for bank, answer in zip(asking, answers):
            candidates = _parse(answer)
            if candidates:
                bank.add(candidates, "llm", llm.name, seed + attempt)
            else:
                bank.keep_answer(answer, llm.name, seed + attempt)
    rows = []
    for bank in banks:
        if bank.approved < bank.minimum:
            bank.add(seed_prompts(None, bank.purpose), "seed", None, seed)  # the generic seed prompts
        rows += bank.rows
    frame = pd.DataFrame(rows, columns=TABLES["prompt_bank"].data_columns).drop_duplicates("prompt_id")
    return {"prompt_bank": lake.upsert_rows("prompt_bank", frame)}


class _TypeBank:
    """The prompts of one type and purpose as they are curated, in the order they came."""

    def __init__(self, product_type, purpose, others, brands, encoder, settings: PromptBankSettings):
        self.product_type, self.purpose, self.others, self.brands = product_type, purpose, others, brands
        self.encoder, self.settings = encoder, settings
        self.rows: list[dict] = []

    @property
    def approved(self) -> int:
        return sum(r["status"] != "rejected" for r in self.rows)  # approved, or pending review

    @property
    def minimum(self) -> int:
        return self.settings.min_scenes if self.purpose == "scene" else self.settings.min_targets

    def question(self) -> list[dict]:
        """The conversation that asks the LLM for this type's prompts of this purpose."""
        wanted = self.settings.scenes_per_type if self.purpose == "scene" else self.settings.targets_per_type
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": ASK[self.purpose].format(n=wanted, type=self.product_type)}]

    def add(self, candidates: list[str], source: str, llm: str | None, seed: int) -> None:
        """Curate candidates against everything kept so far; texts already in the bank are skipped."""
        seen = {r["text"] for r in self.rows}
        kept = [r["text"] for r in self.rows if r["status"] != "rejected"]
        for text, status, reason in curate(candidates, self.product_type, self.others, self.brands, self.encoder,
                                           self.settings, self.purpose, kept):
            if text not in seen:
                self._row(text, status, reason, llm, source, seed)

    def keep_answer(self, answer: str, llm: str, seed: int) -> None:
        """An answer without list items, kept rejected so a person can see why."""
        self._row(answer.strip()[:500] or "(empty answer)", "rejected", "the LLM answer held no list items", llm,
                  "llm", seed)

    def _row(self, text, status, reason, llm, source, seed) -> None:
        self.rows.append({"prompt_id": prompt_id(self.product_type, self.purpose, text),
                          "product_type": self.product_type, "purpose": self.purpose, "text": text, "status": status,
                          "reason": reason, "reviewed_by": "auto", "llm": llm, "source": source, "seed": seed})


@functools.cache
def _seed_bank() -> dict:
    return tomllib.loads(SEED_FILE.read_text())


def seed_types() -> list[str]:
    """The product types the seed bank covers: the default zero-shot vocabulary."""
    return sorted(_seed_bank()["types"])


def seed_prompts(product_type: str | None, purpose: str) -> list[str]:
    """The seed bank's prompts of a type and purpose (`None`: the generic ones for any type)."""
    key = {"scene": "scenes", "target": "targets"}[purpose]
    entry = _seed_bank()["generic"] if product_type is None else _seed_bank()["types"].get(product_type, {})
    return list(entry.get(key, []))


def _llm(zoo: ModelZoo, settings: PromptBankSettings):
    if settings.endpoint:
        from udfs.llm import OpenAICompatibleLLM

        return OpenAICompatibleLLM(settings.endpoint, settings.endpoint_model, settings.api_key_env)
    return zoo.load("llm")


def _parse(answer: str) -> list[str]:
    from udfs.llm import parse_list

    return parse_list(answer)


def curate(candidates: list[str], product_type: str, other_types: list[str], brands: set[str], encoder,
           settings: PromptBankSettings, purpose: str = "scene",
           already_kept: list[str] = ()) -> list[tuple[str, str, str | None]]:
    """(text, status, reason) per candidate, in order. Checks, first failing one wins:
    length; degenerate text (degenerate()); names another product type, a brand or a proper
    noun (a person or a brand the catalog does not know); near-duplicate of an earlier kept
    prompt or of `already_kept` (MiniLM cosine); implausible for the product type (MiniLM cosine
    to "a photo of a <type>" below the threshold; not checked for the UNKNOWN type); a scene that
    names no setting."""
    texts = [" ".join(c.replace("*", " ").replace("#", " ").split()).strip(" .,;\"'") for c in candidates]
    texts = list(dict.fromkeys(t for t in texts if t))
    previous = list(already_kept)
    vectors = encoder.embed(previous + texts) if texts else np.zeros((0, 1))
    anchor = encoder.embed([f"a photo of a {product_type}"])[0]
    passing = "approved" if settings.auto_approve else "pending"
    kept: list[int] = list(range(len(previous)))
    out = []
    for i, text in enumerate(texts, start=len(previous)):
        reason = text_refusal(text, product_type, other_types, brands, settings)
        if reason is None:
            if kept and (similarity := float((vectors[kept] @ vectors[i]).max())) >= settings.duplicate_similarity:
                twin = (previous + texts)[kept[int(np.argmax(vectors[kept] @ vectors[i]))]]
                reason = f"near-duplicate (cosine {similarity:.2f}) of: {twin}"
            elif product_type != UNKNOWN and (plausibility := float(vectors[i] @ anchor)) < settings.min_type_similarity:
                reason = f"implausible for a {product_type} (similarity {plausibility:.2f})"
            elif purpose == "scene" and not names_setting(text):
                reason = "names no setting (a room, surface, outdoor place or light); a scene says where"
        if reason is None:
            kept.append(i)
        out.append((text, passing if reason is None else "rejected", reason))
    return out


def text_refusal(text: str, product_type: str, other_types: list[str], brands: set[str],
                 settings: PromptBankSettings, allowed: tuple[str, ...] = ()) -> str | None:
    """Why a text cannot be a prompt for this product type, or None: length; degenerate text;
    names another product type, a brand (etl/brands.py: the shipped list, `prompt_bank.brands`
    and the catalog's `brands`, in any case; `allowed` names pass), or a proper noun. The checks
    that need no model, shared by curation and on-demand scenes."""
    lowered = f" {text.lower()} "
    own_words = set(product_type.lower().split())
    if reason := length_refusal(text, settings) or degenerate(text, settings):
        return reason
    if other := next((t for t in other_types if set(t.lower().split()) - own_words
                      and re.search(rf"\b{re.escape(t.lower())}s?\b", lowered)), None):
        return f"names another product type ({other})"
    if brand := brand_in(text, [*brands, *settings.brands], allowed):
        return f"names a brand ({brand})"
    if name := _proper_noun(text):
        return f"names a person or brand ({name})"
    return None


def scene_refusal(lake: Lakehouse, scene: str, product_type: str, product_id: str | None = None) -> str | None:
    """Why a requested scene (`recontext imagine`) is refused, or None: the prompt bank's checks
    against every type the bank knows and every brand (the catalog's too), then any capitalized
    word after the first (etl/prompt_text.scene_text_refusal's rule, which ran before the engine
    started); the product's own brand passes only with `prompt_bank.allow_own_brand`. No
    plausibility or duplicate check: the request is a person's explicit ask."""
    text = " ".join(scene.split())
    settings = lake.settings.prompt_bank
    types = {r["product_type"] for r in resolved_types(lake).collect() if r["product_type"]} | set(seed_types())
    others = sorted(t for t in types if t not in (product_type, UNKNOWN))
    allowed = tuple(own_brands(lake, product_id)) if settings.allow_own_brand and product_id else ()
    return (text_refusal(text, product_type, others, catalog_brands(lake), settings, allowed)
            or capitalized_refusal(text, allowed))


def own_brands(lake: Lakehouse, product_id: str) -> set[str]:
    return {json.loads(r["attributes"] or "{}").get("brand", "") for r in lake.spark.sql(
        f"SELECT attributes FROM products WHERE product_id = {sql_literal(product_id)}").collect()} - {""}


def catalog_brands(lake: Lakehouse) -> set[str]:
    """The brands the catalog's attributes name: no prompt may name them."""
    return {json.loads(r["attributes"] or "{}").get("brand", "") for r in
            lake.spark.sql("SELECT attributes FROM products").collect()} - {""}


def names_setting(text: str) -> bool:
    """Whether a text names a place, surface, backdrop or light (SETTING_WORDS, plurals too)."""
    return any(w in SETTING_WORDS or w.rstrip("s") in SETTING_WORDS for w in lower_words(text))


def _proper_noun(text: str) -> str | None:
    """A run of two or more capitalized words after the first word ("Taylor Swift", "Coca Cola"),
    unless the whole text is written in title case."""
    words = text.split()
    if sum(w[:1].isupper() for w in words) > len(words) / 2:
        return None
    return next((m.group(0) for m in CAPITALIZED_RUN.finditer(text) if m.start() > 0), None)


# --- review: status changes and CSV round trip ---------------------------------------------


def set_status(lake: Lakehouse, prompt_ids: list[str], status: str, reason: str | None = None) -> int:
    if status not in STATUSES:
        raise UserError(f"status must be one of {', '.join(STATUSES)}, not '{status}'")
    ids = sql_list(prompt_ids)
    rows = lake.spark.sql(f"SELECT * FROM prompt_bank WHERE prompt_id IN ({ids})")
    found = {r["prompt_id"]: r["text"] for r in rows.select("prompt_id", "text").collect()}
    missing = sorted(set(prompt_ids) - set(found))
    if missing:
        raise UserError(f"unknown prompt id(s): {', '.join(missing)}")
    extra = [*catalog_brands(lake), *lake.settings.prompt_bank.brands]
    branded = [f"{pid} names a brand ({brand})" for pid, text in sorted(found.items())
               if status != "rejected" and (brand := brand_in(text, extra))]
    if branded:
        raise UserError(f"cannot mark {status}: {'; '.join(branded)}")
    updated = rows.selectExpr(*[
        f"{sql_literal(status)} AS status" if c == "status" else
        ("'human' AS reviewed_by" if c == "reviewed_by" else
         (f"{sql_literal(reason) if reason else 'reason'} AS reason" if c == "reason" else c))
        for c in TABLES["prompt_bank"].column_names])
    return lake.upsert("prompt_bank", updated)


def export_csv(lake: Lakehouse, path: str | Path, product_type: str | None = None) -> int:
    where = f"WHERE product_type = {sql_literal(product_type)}" if product_type else ""
    frame = lake.spark.sql(
        f"SELECT prompt_id, product_type, purpose, status, reason, text FROM prompt_bank {where} "
        "ORDER BY product_type, purpose, status, prompt_id").toPandas()
    frame.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL)
    return len(frame)


def import_csv(lake: Lakehouse, path: str | Path) -> int:
    """Apply a reviewed CSV (`recontext prompts import`) through review(); a refusal names the file."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return review(lake, frame, str(path))


def review(lake: Lakehouse, frame: pd.DataFrame, origin: str) -> int:
    """Apply reviewed prompts (the CSV of `prompts import`, or an action in the review console) in
    one upsert: changed statuses/reasons of known prompts, and new prompts (rows without a
    prompt_id, with product_type, purpose and text), all marked reviewed by a human. Refused as a
    whole, naming the rows: a prompt left approved or pending that names a brand (a person's
    prompt is held to the same rule as the LLM's), and a new one whose text is too short or long
    or degenerate. Returns rows written."""
    required = {"product_type", "purpose", "text", "status"}
    if not required <= set(frame.columns):
        raise UserError(f"{origin}: needs columns {', '.join(sorted(required))} (prompt_id and reason optional)")
    frame = frame.reset_index(drop=True)
    bad = frame[~frame.status.isin(STATUSES) | ~frame.purpose.isin(PURPOSES)]
    if len(bad):
        raise UserError(f"{origin}: row {bad.index[0] + 2} has status '{bad.iloc[0].status}' / purpose "
                        f"'{bad.iloc[0].purpose}'; statuses: {', '.join(STATUSES)}, purposes: {', '.join(PURPOSES)}")
    for optional in ("prompt_id", "reason"):
        if optional not in frame:
            frame[optional] = ""
    frame["text"] = [" ".join(str(t).split()) for t in frame.text]
    frame["prompt_id"] = [pid or prompt_id(t, p, x) for pid, t, p, x in
                          zip(frame.prompt_id, frame.product_type, frame.purpose, frame.text)]
    stored = lake.spark.sql("SELECT prompt_id, llm, seed, source FROM prompt_bank").toPandas()
    settings, extra = lake.settings.prompt_bank, [*catalog_brands(lake), *lake.settings.prompt_bank.brands]
    known = set(stored.prompt_id)
    refused = [f"row {i + 2}: {why}" for i, (pid, text, status) in enumerate(zip(frame.prompt_id, frame.text,
                                                                                   frame.status))
               if status != "rejected" and (why := (f"names a brand ({found})" if (found := brand_in(text, extra))
                                                    else None if pid in known
                                                    else length_refusal(text, settings) or degenerate(text, settings)))]
    if refused:
        raise UserError(f"{origin}: {'; '.join(refused[:5])}{' ...' if len(refused) > 5 else ''}; reword them or "
                        "mark them rejected (nothing was imported)")
    frame["reason"] = frame.reason.where(frame.reason != "", None)
    frame = frame.merge(stored, on="prompt_id", how="left")
    frame["llm"] = frame.llm.fillna("human")
    frame["source"] = frame.source.fillna("human")
    frame["reviewed_by"] = "human"
    return lake.upsert_rows("prompt_bank", frame)


def approved_prompts(lake: Lakehouse, purpose: str) -> pd.DataFrame:
    """prompt_id, product_type, text of the approved prompts of a purpose: all downstream reads this."""
    return lake.spark.sql(
        f"SELECT prompt_id, product_type, text FROM prompt_bank WHERE status = 'approved' "
        f"AND purpose = {sql_literal(purpose)} ORDER BY product_type, prompt_id").toPandas()


CLASSIFY = Step("classify", run_classify, reads=("products", "product_images", "embeddings"),
                writes=("product_classes", "quarantine"), roles=("clip", "sentence"),
                description="product type of each untyped product: attributes, title, else zero-shot CLIP")
PROMPT_BANK = Step("prompt_bank", run_prompt_bank, reads=("products", "product_classes"),
                   writes=("prompt_bank",), roles=("sentence", "llm"),
                   description="seed bank and LLM scene and target prompts per product type, curated (cached)")
