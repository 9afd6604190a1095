"""Prompt bank job: per product type, an LLM writes scene and target prompts once; curation marks
each approved or rejected with a reason; people review through SQL-backed commands or a CSV
round trip. Also classifies products that have no type (metadata first, else zero-shot CLIP).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from etl.config import PromptBankSettings
from etl.errors import UserError
from etl.lakehouse import Lakehouse
from etl.tables import TABLES, sql_literal
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
TYPE_KEYS = ("product_type", "category", "type", "item_type")  # attribute keys that name a type
CAPITALIZED_RUN = re.compile(r"\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)+")


def prompt_id(product_type: str, purpose: str, text: str) -> str:
    return hashlib.sha256(f"{product_type}|{purpose}|{text}".encode()).hexdigest()[:16]


def resolved_types(lake: Lakehouse):
    """product_id, product_type: the catalog's type, else the classified one."""
    return lake.spark.sql(
        """
        SELECT p.product_id, coalesce(p.product_type, c.product_type) AS product_type
        FROM products p LEFT JOIN product_classes c ON c.product_id = p.product_id
        """
    )


# --- classification -----------------------------------------------------------------------


def run_classify(lake: Lakehouse, zoo: ModelZoo, known_types: tuple[str, ...] = ()) -> dict[str, int]:
    spark = lake.spark
    untyped = spark.sql(
        """SELECT p.product_id, p.title, p.attributes FROM products p
           LEFT ANTI JOIN product_classes c ON c.product_id = p.product_id
           WHERE p.product_type IS NULL"""
    ).toPandas()
    if untyped.empty:
        return {"product_classes": 0, "quarantine": 0}
    known = sorted({r["product_type"] for r in spark.sql(
        "SELECT DISTINCT product_type FROM products WHERE product_type IS NOT NULL").collect()} | set(known_types))
    rows, failures = [], []
    for product in untyped.itertuples(index=False):
        found = _type_from_metadata(product.title, product.attributes, known)
        if found:
            rows.append((product.product_id, found, "metadata", 1.0, ""))
    zero_shot = untyped[~untyped.product_id.isin([r[0] for r in rows])]
    if len(zero_shot) and known:
        rows += _zero_shot(lake, zoo, list(zero_shot.product_id), known, failures)
    elif len(zero_shot):
        failures += [(pid, "no known product types to choose from; set prompt_bank.known_types or give the "
                            "catalog's products a product_type") for pid in zero_shot.product_id]
    classes = spark.createDataFrame(pd.DataFrame(rows, columns=["product_id", "product_type", "source", "score",
                                                                "backbone"]),
                                    "product_id string, product_type string, source string, score double, "
                                    "backbone string").selectExpr("*", "current_timestamp() AS created_at")
    return {"product_classes": lake.upsert("product_classes", classes),
            "quarantine": lake.quarantine("classify", [(pid, "type:?", "unclassified", why)
                                                       for pid, why in failures])}


def _type_from_metadata(title: str | None, attributes: str | None, known: list[str]) -> str | None:
    values = json.loads(attributes or "{}")
    for key in TYPE_KEYS:
        if isinstance(values.get(key), str) and values[key].strip():
            return values[key].strip()
    lowered = f" {(title or '').lower()} "
    matches = [t for t in known if re.search(rf"\b{re.escape(t.lower())}s?\b", lowered)]
    return max(matches, key=len) if matches else None  # "coffee cup" wins over "cup"


def _zero_shot(lake: Lakehouse, zoo: ModelZoo, product_ids: list[str], known: list[str], failures: list) -> list:
    """Mean cosine of each product's reference CLIP embeddings to "a photo of a <type>"."""
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
            failures.append((product_id, "no image embeddings to classify from; run `recontext score` first"))
            continue
        scores = (np.stack([np.asarray(v, dtype=np.float64) for v in mine]) @ texts.T).mean(axis=0)
        best = int(np.argmax(scores))
        rows.append((product_id, known[best], "clip_zero_shot", float(scores[best]), backbone))
    return rows


# --- prompt generation and curation -------------------------------------------------------


def run_prompt_bank(lake: Lakehouse, zoo: ModelZoo, settings: PromptBankSettings, seed: int = 0) -> dict[str, int]:
    """Fill the bank for every product type that has no prompts of a purpose yet (cached)."""
    spark = lake.spark
    types = sorted({r["product_type"] for r in resolved_types(lake).collect() if r["product_type"]})
    have = {(r["product_type"], r["purpose"]) for r in spark.sql(
        "SELECT DISTINCT product_type, purpose FROM prompt_bank").collect()}
    todo = [(t, p) for t in types for p in PURPOSES if (t, p) not in have]
    if not todo:
        return {"prompt_bank": 0}
    llm = _llm(zoo, settings)
    encoder = zoo.load("sentence")
    brands = {json.loads(r["attributes"] or "{}").get("brand", "") for r in
              spark.sql("SELECT attributes FROM products").collect()} - {""}
    rows = []
    for product_type, purpose in todo:
        wanted = settings.scenes_per_type if purpose == "scene" else settings.targets_per_type
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": ASK[purpose].format(n=wanted, type=product_type)}]
        candidates, answer = [], ""
        for attempt in range(2):  # small LLMs sometimes answer without a list: ask once more
            answer = llm.complete(messages, settings.max_new_tokens, settings.temperature, seed + attempt)
            candidates = _parse(answer)
            if candidates:
                break
        others = [t for t in types if t != product_type]
        curated = curate(candidates, product_type, others, brands, encoder, settings)
        if not curated:  # keep the answer, so the type counts as done and a person can see why
            curated = [(answer.strip()[:500] or "(empty answer)", "rejected", "the LLM answer held no list items")]
        for text, status, reason in curated:
            rows.append((prompt_id(product_type, purpose, text), product_type, purpose, text, status, reason,
                         "auto", llm.name, seed))
    frame = pd.DataFrame(rows, columns=TABLES["prompt_bank"].data_columns).drop_duplicates("prompt_id")
    return {"prompt_bank": lake.upsert("prompt_bank", spark.createDataFrame(frame, TABLES["prompt_bank"].data_schema())
                                       .selectExpr("*", "current_timestamp() AS created_at"))}


def _llm(zoo: ModelZoo, settings: PromptBankSettings):
    if settings.endpoint:
        from udfs.llm import OpenAICompatibleLLM

        return OpenAICompatibleLLM(settings.endpoint, settings.endpoint_model, settings.api_key_env)
    zoo.check("llm")
    return zoo.load("llm")


def _parse(answer: str) -> list[str]:
    from udfs.llm import parse_list

    return parse_list(answer)


def curate(candidates: list[str], product_type: str, other_types: list[str], brands: set[str], encoder,
           settings: PromptBankSettings) -> list[tuple[str, str, str | None]]:
    """(text, status, reason) per candidate, in order. Checks, first failing one wins:
    length; names another product type, a brand or a proper noun (a person or a brand the
    catalog does not know); near-duplicate of an earlier kept prompt (MiniLM cosine); implausible
    for the product type (MiniLM cosine to "a photo of a <type>" below the threshold)."""
    texts = [" ".join(c.replace("*", " ").replace("#", " ").split()).strip(" .,;\"'") for c in candidates]
    texts = [t for t in texts if t]
    vectors = encoder.embed(texts) if texts else np.zeros((0, 1))
    anchor = encoder.embed([f"a photo of a {product_type}"])[0]
    own_words = set(product_type.lower().split())
    passing = "approved" if settings.auto_approve else "pending"
    kept: list[int] = []
    out = []
    for i, text in enumerate(texts):
        words = text.split()
        lowered = f" {text.lower()} "
        reason = None
        if len(words) < settings.min_words:
            reason = f"too short ({len(words)} words, minimum {settings.min_words})"
        elif len(words) > settings.max_words:
            reason = f"too long ({len(words)} words, maximum {settings.max_words})"
        elif other := next((t for t in other_types if set(t.lower().split()) - own_words
                            and re.search(rf"\b{re.escape(t.lower())}s?\b", lowered)), None):
            reason = f"names another product type ({other})"
        elif brand := next((b for b in brands if re.search(rf"\b{re.escape(b.lower())}\b", lowered)), None):
            reason = f"names a brand ({brand})"
        elif name := _proper_noun(text):
            reason = f"names a person or brand ({name})"
        elif kept and (similarity := float((vectors[kept] @ vectors[i]).max())) >= settings.duplicate_similarity:
            twin = texts[kept[int(np.argmax(vectors[kept] @ vectors[i]))]]
            reason = f"near-duplicate (cosine {similarity:.2f}) of: {twin}"
        elif (plausibility := float(vectors[i] @ anchor)) < settings.min_type_similarity:
            reason = f"implausible for a {product_type} (similarity {plausibility:.2f})"
        if reason is None:
            kept.append(i)
        out.append((text, passing if reason is None else "rejected", reason))
    return out


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
    ids = ", ".join(sql_literal(p) for p in prompt_ids)
    rows = lake.spark.sql(f"SELECT * FROM prompt_bank WHERE prompt_id IN ({ids})")
    found = {r["prompt_id"] for r in rows.select("prompt_id").collect()}
    missing = sorted(set(prompt_ids) - found)
    if missing:
        raise UserError(f"unknown prompt id(s): {', '.join(missing)}")
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
    """Apply a reviewed CSV: changed statuses/reasons of known prompts, and new prompts (rows
    without a prompt_id, with product_type, purpose and text), all marked reviewed by a human."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    required = {"product_type", "purpose", "text", "status"}
    if not required <= set(frame.columns):
        raise UserError(f"{path}: needs columns {', '.join(sorted(required))} (prompt_id and reason optional)")
    bad = frame[~frame.status.isin(STATUSES) | ~frame.purpose.isin(PURPOSES)]
    if len(bad):
        raise UserError(f"{path}: row {bad.index[0] + 2} has status '{bad.iloc[0].status}' / purpose "
                        f"'{bad.iloc[0].purpose}'; statuses: {', '.join(STATUSES)}, purposes: {', '.join(PURPOSES)}")
    for optional in ("prompt_id", "reason"):
        if optional not in frame:
            frame[optional] = ""
    frame["prompt_id"] = [pid or prompt_id(t, p, x) for pid, t, p, x in
                          zip(frame.prompt_id, frame.product_type, frame.purpose, frame.text)]
    frame["reason"] = frame.reason.where(frame.reason != "", None)
    stored = lake.spark.sql("SELECT prompt_id, llm, seed FROM prompt_bank").toPandas()
    frame = frame.merge(stored, on="prompt_id", how="left")
    frame["llm"] = frame.llm.fillna("human")
    frame["reviewed_by"] = "human"
    rows = lake.spark.createDataFrame(frame[TABLES["prompt_bank"].data_columns]
                                      .astype(object).where(frame.notna(), None), TABLES["prompt_bank"].data_schema())
    return lake.upsert("prompt_bank", rows.selectExpr("*", "current_timestamp() AS created_at"))


def approved_prompts(lake: Lakehouse, purpose: str) -> pd.DataFrame:
    """prompt_id, product_type, text of the approved prompts of a purpose: all downstream reads this."""
    return lake.spark.sql(
        f"SELECT prompt_id, product_type, text FROM prompt_bank WHERE status = 'approved' "
        f"AND purpose = {sql_literal(purpose)} ORDER BY product_type, prompt_id").toPandas()

