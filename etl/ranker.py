"""The learned ranker (beyond the paper): logistic regression from the metric columns to the
human verdict, fit on `rated_images`, registered in MLflow as `recontext-ranker`.

It is judged by held-out Pearson correlation with the human pass (folds grouped by product, so a
product's images never sit on both sides) against the plain aggregate on the same images. A
version that beats the aggregate gets the `champion` alias; `generation.rank_aggregate =
"learned"` then ranks by its pass probability. Fit again only when the ratings changed.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd

from core.errors import UserError
from etl.evaluation import pearson
from core.vocabulary import EVALUATED as METRICS, aggregate_score
from etl.lakehouse import Lakehouse
from etl.step import REGISTERED_MODELS, Step
from etl import tracking

log = logging.getLogger(__name__)
MODEL_NAME = "recontext-ranker"


def features(frame: pd.DataFrame) -> np.ndarray:
    return frame[list(METRICS)].astype(float).fillna(0.0).to_numpy()


def _model():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))


def held_out(frame: pd.DataFrame, weights: dict, folds: int) -> dict:
    """Out-of-fold pass probabilities -> Pearson with `passed`, beside the aggregate's Pearson."""
    from sklearn.model_selection import GroupKFold, KFold

    y = frame.passed.astype(int).to_numpy()
    x = features(frame)
    groups = frame.product_id.to_numpy()
    splits = (GroupKFold(n_splits=min(folds, len(set(groups)))).split(x, y, groups) if len(set(groups)) >= 2
              else KFold(n_splits=min(folds, len(frame)), shuffle=True, random_state=0).split(x))
    predicted = np.full(len(frame), np.nan)
    for train, test in splits:
        if len(set(y[train])) < 2:  # a fold with one class: predict its base rate
            predicted[test] = y[train].mean()
        else:
            predicted[test] = _model().fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    return {"heldout_pearson_learned": pearson(predicted, y),
            "heldout_pearson_sum": pearson(aggregate_score(frame, weights), y),
            "images": len(frame), "products": len(set(groups)), "pass_rate": float(y.mean())}


def rated(lake: Lakehouse) -> pd.DataFrame:
    """Rated images with their metrics; an image in several evaluations is one example (its
    latest verdict)."""
    metrics = ", ".join(f"m.{c}" for c in METRICS)
    frame = lake.spark.sql(
        f"""SELECT r.image_id, r.product_id, r.passed, r.ratings_source, {metrics} FROM rated_images r
            JOIN image_metrics m ON m.image_id = r.image_id AND m.product_id = r.product_id
            WHERE r.passed IS NOT NULL ORDER BY r.image_id, r.product_id, r.computed_at DESC""").toPandas()
    return frame.drop_duplicates(["image_id", "product_id"]).reset_index(drop=True)


def run_fit_ranker(lake: Lakehouse, zoo=None) -> dict[str, int]:
    """Fit, judge on held-out folds, register; promote when it beats the aggregate and every
    rating came from people (a ranker fit on synthetic ratings stays @candidate)."""
    import mlflow
    from mlflow import MlflowClient

    settings = lake.settings
    frame = rated(lake)
    if len(frame) < settings.evaluation.ranker_min_images or frame.passed.nunique() < 2:
        log.info("learned ranker not fit: %d rated images (%d needed, both verdicts)", len(frame),
                 settings.evaluation.ranker_min_images)
        return {REGISTERED_MODELS: 0}
    digest = hashlib.sha256(frame[["image_id", "passed", "ratings_source", *METRICS]].to_csv(index=False)
                            .encode()).hexdigest()[:16]  # people's ratings replacing synthetic ones: a refit
    experiment = tracking.configure(settings)
    if mlflow.search_runs([experiment], filter_string=f"tags.ratings_digest = '{digest}'").shape[0]:
        return {REGISTERED_MODELS: 0}  # fit on exactly these ratings already
    report = held_out(frame, settings.generation.rank_weights, settings.evaluation.ranker_folds)
    model = _model().fit(features(frame), frame.passed.astype(int).to_numpy())
    synthetic = bool((frame.ratings_source != "human").any())
    with mlflow.start_run(experiment_id=experiment, run_name="learned ranker",
                          tags={"ratings_digest": digest, "ratings_source": "synthetic" if synthetic else "human"}):
        mlflow.log_params({"features": ",".join(METRICS), "model": "StandardScaler+LogisticRegression(C=1)",
                           "folds": settings.evaluation.ranker_folds})
        mlflow.log_metrics({k: v for k, v in report.items() if v is not None})
        with tracking.registry_messages():
            info = mlflow.sklearn.log_model(model, name="ranker", registered_model_name=MODEL_NAME,
                                            input_example=features(frame)[:2])
    version = str(info.registered_model_version)
    learned, plain = report["heldout_pearson_learned"], report["heldout_pearson_sum"]
    better = learned is not None and (plain is None or learned > plain)
    if synthetic:
        log.info("learned ranker v%s fit on synthetic ratings: @candidate only, never @champion", version)
    MlflowClient().set_registered_model_alias(
        MODEL_NAME, tracking.CHAMPION if better and not synthetic else tracking.CANDIDATE, version)
    log.info("learned ranker v%s: held-out r=%s vs aggregate r=%s", version, learned, plain)
    return {REGISTERED_MODELS: 1}  # a model version, not a table row


def load_champion():
    """(model, version) of the champion ranker: an sklearn pipeline with predict_proba over METRICS."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient().get_model_version_by_alias(MODEL_NAME, tracking.CHAMPION).version
        return mlflow.sklearn.load_model(f"models:/{MODEL_NAME}/{version}"), str(version)
    except MlflowException:
        raise UserError(f"generation.rank_aggregate is 'learned' but {MODEL_NAME} has no @champion: import human "
                        "ratings (recontext ratings import) so `recontext evaluate` can fit one, or promote a "
                        "version, or set rank_aggregate = 'sum'") from None


FIT_RANKER = Step("fit_ranker", run_fit_ranker, reads=("rated_images", "image_metrics"), writes=(REGISTERED_MODELS,),
                  description="the learned ranker, refit when the ratings change")
