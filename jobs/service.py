"""`recontext-service`: on-demand requests (training/imagine.py) as one MLflow pyfunc model.

    recontext --home H service register        # logs and registers it, alias @champion
    MLFLOW_TRACKING_URI=sqlite:///H/mlflow/mlflow.db \\
        mlflow models serve -m models:/recontext-service@champion --env-manager local -p 5000
    curl -s localhost:5000/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_records": [{"product_id": "coffee-cup", "scene": "on a marble kitchen counter", "n": 4}]}'

Input rows: product_id, scene, n, and optionally seed and keep. Output: one row per kept image,
best first per request: the request's row number, rank, score and metrics, the PNG as base64,
the adapter model and version, the prompt and seed, `base_model_loads` (text2img pipelines
loaded by this process so far: it stays 1 while the server reuses its base model), and
`model_weights` (JSON: each model role the request ran and its kind of weights; "tiny random
weights" means its images and scores say nothing about fidelity).

How it finds the home: the model config (`{"home": ...}`, written at registration) names the
home folder; `RECONTEXT_HOME` set in the serving environment overrides it. The home's tables
(products, adapters, reference embeddings) and its MLflow registry are read at each request:
each product's `@champion` is resolved per request, so a promotion takes effect without
redeploying, and each request writes its lineage rows to the home like `recontext imagine`.
Models load on the first request and stay loaded (the zoo's per-process cache).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pandas as pd

from core.vocabulary import RANKING_METRICS

SERVICE_NAME = "recontext-service"
ROOT = Path(__file__).resolve().parent.parent
CODE = ("core", "etl", "training", "udfs", "jobs")  # the packages the model carries (code_paths)
OUTPUT_COLUMNS = ["request", "product_id", "scene", "rank", "score", *RANKING_METRICS, "image_png_base64",
                  "width", "height", "seed", "prompt", "adapter_model", "adapter_version", "base_model_loads",
                  "model_weights"]

from mlflow.pyfunc import PythonModel


class RecontextService(PythonModel):
    def load_context(self, context) -> None:
        from core.settings import Settings
        from etl.lakehouse import Lakehouse
        from training.imagine import Imaginer

        home = os.environ.get("RECONTEXT_HOME") or (context.model_config or {}).get("home")
        self.imaginer = Imaginer(Lakehouse(Settings.load(home)))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from core.errors import UserError
        from udfs.zoo import LOADS

        answers = []
        for number, request in enumerate(model_input.to_dict(orient="records")):
            try:
                images = self.imaginer(str(request["product_id"]), str(request["scene"]), _int(request.get("n"), 4),
                                       _int(request.get("keep")), _int(request.get("seed")))
            except UserError as err:  # the caller's mistake: HTTP 400 with the one-line reason
                raise MlflowException(f"request {number}: {err}", error_code=INVALID_PARAMETER_VALUE) from None
            kept = images[images.kept.astype(bool)]
            answers.append(kept.assign(request=number, image_png_base64=[base64.b64encode(b).decode()
                                                                          for b in kept.image]))
        out = pd.concat(answers, ignore_index=True) if answers else pd.DataFrame(columns=OUTPUT_COLUMNS)
        # model_weights: JSON, role -> kind of weights ("tiny random weights": the scores mean nothing)
        return out.assign(base_model_loads=LOADS["text2img"], model_weights=json.dumps(
            self.imaginer.model_weights(), sort_keys=True))[OUTPUT_COLUMNS].astype({"rank": "int64"})


def _int(value, default=None):
    return default if value is None or pd.isna(value) else int(value)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([
        ColSpec("string", "product_id"), ColSpec("string", "scene"), ColSpec("long", "n"),
        ColSpec("long", "seed", required=False), ColSpec("long", "keep", required=False)]))


def requirements() -> list[str]:
    """The project's own dependencies: what a serving environment must install."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return [r for r in requires("recontext") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        return []


def register_service(settings) -> str:
    """Log the service with a config naming this home, register it as `recontext-service` and
    alias the new version `champion`; returns the version."""
    import mlflow
    from mlflow import MlflowClient

    from etl import tracking

    experiment = tracking.configure(settings)
    with mlflow.start_run(experiment_id=experiment, run_name=SERVICE_NAME), tracking.registry_messages():
        info = mlflow.pyfunc.log_model(
            name="service", python_model=RecontextService(), model_config={"home": str(settings.home)},
            code_paths=[str(ROOT / c) for c in CODE], signature=signature(),
            pip_requirements=requirements() or None, registered_model_name=SERVICE_NAME)
    version = str(info.registered_model_version)
    MlflowClient().set_registered_model_alias(SERVICE_NAME, tracking.CHAMPION, version)
    return version
