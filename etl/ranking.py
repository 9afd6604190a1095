"""Post-finetuning ranking -> `ranked_generations` (paper 2.5).

Our arm only (the baseline has none), the prompt bank's generations only (a request ranks its own
images: training/imagine.py): every generation is scored with the metrics job's
columns, aggregated (sum of CLIP-T + CLIP-I + DINO by default, `generation.rank_weights`; or
the learned ranker's pass probability with `generation.rank_aggregate = "learned"`), those below
the threshold dropped and the top `generation.keep_top` per product kept.
"""

from __future__ import annotations

import pandas as pd

from core.settings import GenerationSettings
from core.errors import UserError
from etl.lakehouse import Lakehouse
from etl.step import CHAMPIONS, Step
from core.tables import TABLES
from etl.training_set import keep_first
from core.vocabulary import BANK, EVALUATED, aggregate_score, from_bank
from etl import tracking
from etl.ranker import MODEL_NAME, features


def rank_generations(scores: pd.DataFrame, settings: GenerationSettings, ranker=None,
                     champions: dict | None = None) -> pd.DataFrame:
    """Per product: aggregate, threshold, rank, keep the top N. `scores` has product_id,
    image_id, adapter_version and the metric columns. The aggregate is the weighted sum, or with
    a learned `ranker` (model, version) its pass probability (threshold `min_pass_probability`).
    With `champions` ({product_id: version}) only the champion version's generations compete;
    the others are never kept (reason: not the champion version). Rows keep their `origin`
    (default: the bank) and `arm` (default: ours).

    The same pixels from two tasks (two prompts or seeds; tiny models do it) are one image: one
    row per (product, arm, image), the champion version's row first, then the lowest task key."""
    scores = scores.copy()
    for column, default in (("origin", BANK), ("arm", tracking.OURS), ("task_key", "")):
        if column not in scores:
            scores[column] = default
    scores["_stale"] = [champions is not None and champions.get(p) != v
                        for p, v in zip(scores.product_id, scores.adapter_version)]
    scores = (scores.sort_values(["product_id", "arm", "image_id", "_stale", "task_key"])
              .drop_duplicates(["product_id", "arm", "image_id"]))
    stale = scores.pop("_stale").astype(bool)
    if ranker is None:
        scores["score"], threshold = aggregate_score(scores, settings.rank_weights), settings.min_score
        scores["ranked_by"] = "sum"
    else:
        model, version = ranker
        scores["score"], threshold = model.predict_proba(features(scores))[:, 1], settings.min_pass_probability
        scores["ranked_by"] = f"{MODEL_NAME} v{version}"
    scores["rank"], scores["kept"], scores["reason"] = None, False, None
    scores.loc[stale, "reason"] = [f"not the champion version (v{champions.get(p)}); kept for lineage"
                                   for p in scores.product_id[stale]]
    below = ~stale & (scores.score < threshold)
    scores.loc[below, "reason"] = [f"score {s:.3f} below {threshold}" for s in scores.score[below]]
    for _, group in scores[~below & ~stale].groupby(["product_id", "arm"]):
        ordered = group.sort_values(["score", "image_id"], ascending=[False, True])
        keep_first(scores, list(ordered.index), settings.keep_top, "kept",
                   lambda rank: f"over the top {settings.keep_top} (rank {rank})")
    scores["rank"] = scores["rank"].astype("Int32")
    return scores[TABLES["ranked_generations"].data_columns].reset_index(drop=True)


def configured_ranker(lake: Lakehouse, aggregate: str | None = None):
    """The learned ranker (model, version) when `aggregate` (default: `generation.rank_aggregate`)
    is "learned", else None."""
    aggregate = aggregate or lake.settings.generation.rank_aggregate
    if aggregate not in ("sum", "learned"):
        raise UserError(f"generation.rank_aggregate must be 'sum' or 'learned', not {aggregate!r}")
    if aggregate == "sum":
        return None
    from etl.ranker import load_champion

    tracking.configure(lake.settings)
    return load_champion()


def run_ranking(lake: Lakehouse, zoo=None) -> dict[str, int]:
    settings = lake.settings.generation
    ranker = configured_ranker(lake)
    metrics = ", ".join(f"m.{c}" for c in EVALUATED)
    scores = lake.spark.sql(
        f"""SELECT g.product_id, g.arm, g.image_id, g.adapter_version, g.task_key, {metrics}
           FROM generations g JOIN image_metrics m ON m.image_id = g.image_id AND m.product_id = g.product_id
           WHERE g.arm = 'ours' AND {from_bank("g")}"""
    ).toPandas()
    if scores.empty:
        return {"ranked_generations": 0}
    champions = {p: v for (p, _), v in tracking.champion_versions(
        lake.settings, [(p, tracking.OURS) for p in scores.product_id]).items()}
    return {"ranked_generations": lake.upsert_rows("ranked_generations",
                                                   rank_generations(scores, settings, ranker, champions))}


RANK = Step("rank", run_ranking, reads=("generations", "image_metrics", CHAMPIONS), writes=("ranked_generations",),
            description="post-finetuning ranking: aggregate, threshold, top N per product")
