"""MLflow: where runs are tracked, and the adapter registry.

The embedded default store is `<home>/mlflow` (SQLite backend `mlflow.db`, artifacts in
`artifacts/`); `MLFLOW_TRACKING_URI` points elsewhere (a tracking server, Databricks).
One registered model per product, `recontext-<product_id>`: versions are that product's
adapters, so aliases (`candidate` on every new version, `champion` on the promoted one) and
permissions work per product, the way the registry's UI lists them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading

from core.settings import Settings
from core.errors import UserError

CANDIDATE, CHAMPION = "candidate", "champion"
OURS, BASELINE = "ours", "baseline"  # the trained arms: the paper's method, plain DreamBooth + LoRA
ZERO_SHOT = "zero_shot"  # no adapter: the base model conditioned on reference photos (etl/plans.py)
TRAINING_KEY = "recontext.training_key"  # run tag: product|arm|training-set version|config hash
# The user's choice, read once: mlflow.set_tracking_uri() writes this variable itself, so reading
# it later would make a second home in the same process log into the first home's store.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def registered_model_name(product_id: str, arm: str = OURS) -> str:
    return f"recontext-{product_id}" if arm == OURS else f"recontext-{product_id}-{arm}"


def store_uri(settings: Settings) -> str:
    """The embedded store's URI (tracking and registry) of a home."""
    return f"sqlite:///{settings.home / 'mlflow' / 'mlflow.db'}"


def configure(settings: Settings) -> str:
    """Point MLflow at the store and return the experiment id (created on first use)."""
    import logging

    import mlflow
    from diffusers.utils import logging as diffusers_logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # system-metrics start/stop chatter
    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" on UNet-only adapters
    store = settings.home / "mlflow"
    uri = _USER_TRACKING_URI
    if not uri:
        store.mkdir(parents=True, exist_ok=True)
        uri = store_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(settings.training.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None if _USER_TRACKING_URI else (store / "artifacts").as_uri()
    return mlflow.create_experiment(settings.training.experiment, artifact_location=location)


# A log_batch request's limits (MLflow's REST API): 1000 entities, of which at most 100 params
# and 100 tags.
BATCH_ENTITIES, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100


def log_batch(client, run_id: str, metrics=(), params: dict | None = None, tags: dict | None = None) -> None:
    """Log metrics (mlflow.entities.Metric), params and tags of a run in as few requests as the
    API's limits allow (one, for a product's run)."""
    from mlflow.entities import Param, RunTag

    params = [Param(k, str(v)) for k, v in (params or {}).items()]
    tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    metrics = list(metrics)
    while params or tags or metrics:
        batch_params, params = params[:BATCH_PARAMS], params[BATCH_PARAMS:]
        batch_tags, tags = tags[:BATCH_TAGS], tags[BATCH_TAGS:]
        room = BATCH_ENTITIES - len(batch_params) - len(batch_tags)
        batch_metrics, metrics = metrics[:room], metrics[room:]
        client.log_batch(run_id, metrics=batch_metrics, params=batch_params, tags=batch_tags)


@functools.cache
def _adapter_requirements() -> list[str]:
    """The pip requirements logged with every adapter, inferred once per process instead of once
    per model (MLflow reads the installed packages' metadata for it)."""
    import mlflow

    return mlflow.diffusers.get_default_pip_requirements()


_quiet = {"depth": 0, "saved": None}
_quiet_lock = threading.Lock()


@contextlib.contextmanager
def registry_messages():
    """Around MLflow calls that register models: MLflow prints "Successfully registered model",
    "Created version ..." straight to stderr (`eprint`), between the stages' progress lines. They
    show only when the root logger is at INFO (`--verbose`). (MLflow's own disable_logging() is
    undone by MLflow itself when a module it imports on first use exits its logging guard, so
    eprint's stream is swapped for a null one instead; nested and concurrent uses share it.)"""
    from mlflow.utils import logging_utils

    if logging.getLogger().isEnabledFor(logging.INFO):
        yield
        return
    with _quiet_lock:
        if _quiet["depth"] == 0:
            _quiet["saved"] = logging_utils.MLFLOW_LOGGING_STREAM
            logging_utils.MLFLOW_LOGGING_STREAM = open(os.devnull, "w")
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0:
                logging_utils.MLFLOW_LOGGING_STREAM.close()
                logging_utils.MLFLOW_LOGGING_STREAM = _quiet["saved"]


def is_server() -> bool:
    """Whether the configured store is reached over the network (a tracking server, Databricks)."""
    import mlflow

    return not mlflow.get_tracking_uri().startswith(("sqlite:", "file:", "/"))


def connect(tracking_uri: str) -> None:
    """Point this process at a store the driver configured (a training task on a Spark worker)."""
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)


def log_adapter(adapter_dir, base_model: str) -> str:
    """Log the adapter with the mlflow.diffusers flavor in the active run (the training task);
    returns the logged model's URI, which `register_adapter` registers."""
    import mlflow

    from udfs.diffusion import family_of

    family = family_of(base_model)  # recorded so a reader knows which pipeline class takes the adapter
    info = mlflow.diffusers.log_model(str(adapter_dir), base_model=base_model, name="adapter",
                                      pip_requirements=_adapter_requirements(),
                                      metadata={"base_family": family.name, "base_pipeline": family.text2img})
    mlflow.set_tag("base_pipeline", family.text2img)
    return info.model_uri


def register_adapter(model_uri: str, product_id: str, arm: str, training_key: str,
                     auto_promote: bool = False) -> str:
    """Register a logged adapter as a version of the product's model (tagged with its training
    key), alias it `candidate`; with `auto_promote` a product's first adapter in the arm becomes
    its champion. One policy for every arm: the baseline is promoted by the same rule as ours, so
    neither arm's champion is chosen differently from the other's."""
    import mlflow
    from mlflow import MlflowClient

    name = registered_model_name(product_id, arm)
    with registry_messages():
        version = str(mlflow.register_model(model_uri, name, tags={TRAINING_KEY: training_key}).version)
    client = MlflowClient()
    client.set_registered_model_alias(name, CANDIDATE, version)
    if auto_promote and CHAMPION not in client.get_registered_model(name).aliases:
        client.set_registered_model_alias(name, CHAMPION, version)
    return version


SEARCH_NAMES = 100  # model names per registry search (a GET request's filter)


def registered_versions(training_keys: dict[str, str]) -> dict[str, tuple[str, object]]:
    """{model name: (version, run)} of the registered versions tagged with the training key given
    for their model ({name: key}); names with none are left out. One registry search per 100
    names (the driver plans every product of a batch at once), narrowed to the keys' arm and
    training-set version, so a product's older versions are not fetched."""
    from mlflow import MlflowClient

    client, found = MlflowClient(), {}
    names = sorted(training_keys)
    for start in range(0, len(names), SEARCH_NAMES):
        chunk = names[start:start + SEARCH_NAMES]
        _, arm, version, _ = training_keys[chunk[0]].rsplit("|", 3)  # one arm and version per batch
        listed = ", ".join(f"'{n}'" for n in chunk)
        query = (f"name IN ({listed}) "
                 f"AND tags.`{TRAINING_KEY}` LIKE '%|{arm}|{version}|%'")
        token = None
        while True:
            page = client.search_model_versions(query, page_token=token)
            for model_version in page:
                name = model_version.name
                if model_version.tags.get(TRAINING_KEY) == training_keys[name] and name not in found:
                    found[name] = (str(model_version.version), client.get_run(model_version.run_id))
            token = page.token
            if not token:
                break
    return found


def promote(settings: Settings, product_id: str, version: str, arm: str = OURS) -> None:
    """Give `version` of the product's adapter in `arm` the `champion` alias (moving it from any
    other). `recontext promote` also records it (etl.evaluation.record_promotion)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure(settings)
    name = registered_model_name(product_id, arm)
    try:
        MlflowClient().get_model_version(name, str(version))
    except MlflowException:
        raise UserError(f"no version {version} of {name} in the registry; see `recontext sql \"SELECT "
                        f"product_id, arm, model_version FROM adapters\"`") from None
    MlflowClient().set_registered_model_alias(name, CHAMPION, str(version))


def champion(product_id: str, arm: str = OURS) -> tuple[str, str, str] | None:
    """(model name, version, run id) of the product's champion adapter in `arm`, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = registered_model_name(product_id, arm)
    try:
        version = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return name, str(version.version), version.run_id


def champion_versions(settings: Settings, pairs) -> dict[tuple[str, str], str]:
    """{(product_id, arm): champion version} for the (product_id, arm) pairs that have one.
    Ranking and evaluation work within these versions only; generations of older versions stay
    for lineage."""
    configure(settings)
    return {(p, a): found[1] for p, a in sorted(set(pairs)) if (found := champion(p, a)) is not None}

