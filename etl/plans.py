"""Generation plans and pinned evaluations.

The plan is what every arm must generate: per product with a champion adapter of ours, the first
`generation.prompts_per_product` approved target prompts of its type x `seeds_per_prompt` seeds,
at the generation settings, for each arm (ours, the baseline when enabled, any other trained
arm) with that arm's `@champion` version. The zero-shot arm (evaluation.zero_shot) has no
adapter: its "version" is the digest of the reference photos the base model's reference pipeline
is given, and its generation prompt has no token. Its rows are generation tasks: the task key hashes
adapter version, prompt, seed and settings, so an image already made for the same task is
reused, never generated twice.

An evaluation is a plan frozen in `evaluation_plans`: its id is the hash of the plan's content
(products, prompt ids, seeds, settings, each arm's adapter version), so a changed prompt bank,
setting or champion starts a new evaluation and the old one stays as it was. An evaluation is
complete when every arm has an image for every planned (product, prompt, seed); until then it
is reported incomplete, naming what is missing, and never computed on unequal sets.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from etl import tracking
from core.settings import GenerationSettings
from etl.lakehouse import Lakehouse
from etl.prompt_bank import approved_prompts, class_noun, resolved_types
from core.tables import TABLES, sql_list
from core.vocabulary import BANK

PLAN_COLUMNS = TABLES["evaluation_plans"].data_columns


def prompts(token: str, class_noun: str, text: str) -> tuple[str, str]:
    """(prompt, generation_prompt): the text with the class noun (what CLIP-T compares the image
    with), and with the rare token too (what the adapter is given)."""
    return f"a photo of a {class_noun}, {text}", f"a photo of {token} {class_noun}, {text}"


def task_key(*identity) -> str:
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def bank_task(product_id, arm, name, version, run_id, token, noun, prompt_id, prompt_text, seed,
              settings: GenerationSettings) -> dict:
    """A `generations` row's lineage for one bank prompt and seed (the image comes later)."""
    text, generation_prompt = prompts(token, noun, prompt_text)
    return {"task_key": task_key(name, version, prompt_id, seed, settings.steps, settings.guidance_scale,
                                 settings.resolution),
            "product_id": product_id, "arm": arm, "origin": BANK, "scene": None,
            "adapter_model": name, "adapter_version": version, "run_id": run_id, "token": token,
            "prompt_id": prompt_id, "prompt": text, "generation_prompt": generation_prompt, "seed": seed,
            "steps": settings.steps, "guidance": float(settings.guidance_scale)}


def arms(lake: Lakehouse, trained: pd.DataFrame) -> list[str]:
    """The arms an evaluation compares: ours, the baseline when enabled, the zero-shot arm when
    enabled, and any other trained arm."""
    evaluation = lake.settings.evaluation
    named = {tracking.OURS, *trained.arm} | ({tracking.BASELINE} if evaluation.baseline else set()) \
        | ({tracking.ZERO_SHOT} if evaluation.zero_shot else set())
    return sorted(named, key=_arm_order)


def _arm_order(arm: str) -> tuple:
    # ours, the baseline, the zero-shot arm, then the others
    return arm != tracking.OURS, arm != tracking.BASELINE, arm != tracking.ZERO_SHOT, arm


def zero_shot_champions(lake: Lakehouse, products: list[str]) -> tuple[dict, list[tuple]]:
    """product -> (name, version, None) for the zero-shot arm, as a champion is for a trained arm:
    the name is the base model's, the version the digest of the reference photos it is given
    (the product's `zero_shot_references` largest, ties by image id), so new photos are a new
    version. A base family without a reference pipeline quarantines the arm, naming why."""
    from udfs.diffusion import family_of
    from udfs.zoo import ModelZoo

    zoo = ModelZoo.from_settings(lake.settings)
    zoo.check("text2img")
    family = family_of(zoo.path("text2img"))
    if family.reference is None:
        return {}, [(p, f"arm:{tracking.ZERO_SHOT}", "no_reference_pipeline",
                     f"the base family {family.name} has no reference-conditioned pipeline; the zero-shot arm needs "
                     "one (flux2-klein has)") for p in products]
    chosen = reference_photos(lake, products, with_images=False)
    name = f"zero-shot:{zoo.name('text2img')}"
    return {p: (name, photos_version(ids), None) for p, ids in chosen.items()}, []


def photos_version(image_ids: list[str]) -> str:
    """The zero-shot arm's version: the digest of the reference photos it is given, in order."""
    return hashlib.sha256(json.dumps(list(image_ids)).encode()).hexdigest()[:12]


def reference_photos(lake: Lakehouse, products: list[str], with_images: bool = True) -> dict[str, list]:
    """product -> its `zero_shot_references` best reference photos (image ids, or encoded images)."""
    count = lake.settings.evaluation.zero_shot_references
    rows = lake.spark.sql(
        f"""SELECT product_id, image_id{', image' if with_images else ''} FROM (
                SELECT *, row_number() OVER (PARTITION BY product_id ORDER BY width * height DESC, image_id) AS n
                FROM product_images WHERE product_id IN ({sql_list(products)})) WHERE n <= {count}
            ORDER BY product_id, n""").toPandas() if products else pd.DataFrame(columns=["product_id", "image_id"])
    return {p: list(group.image if with_images else group.image_id) for p, group in rows.groupby("product_id")}


def current_plan(lake: Lakehouse) -> tuple[pd.DataFrame, list[tuple]]:
    """(plan rows without evaluation_id, quarantine rows): what every arm generates now. A product
    is planned when ours has a champion and its type has approved targets; an arm without a
    champion for it gets rows with no adapter (the evaluation reports them missing)."""
    settings = lake.settings.generation
    tracking.configure(lake.settings)
    trained = lake.spark.sql("SELECT product_id, arm, model_version, token FROM adapters").toPandas()
    tokens = {(r.product_id, r.arm, str(r.model_version)): r.token for r in trained.itertuples()}
    types = dict(resolved_types(lake).toPandas().itertuples(index=False))
    targets = approved_prompts(lake, "target")
    products = sorted(p for p in set(trained.product_id) if lake.products is None or p in lake.products)
    compared = arms(lake, trained)
    champions = {(p, a): tracking.champion(p, a) for p in products for a in compared if a != tracking.ZERO_SHOT}
    rows, failures, runs, scoring = [], [], {}, scoring_settings(lake.settings)
    if tracking.ZERO_SHOT in compared:
        zero_shot, failures = zero_shot_champions(lake, products)
        champions.update({(p, tracking.ZERO_SHOT): zero_shot.get(p) for p in products})
    seeds = range(settings.seed, settings.seed + settings.seeds_per_prompt)
    for product_id in products:
        if champions[(product_id, tracking.OURS)] is None:
            continue  # only products with a champion adapter of ours are generated
        product_type = types.get(product_id)
        chosen = targets[targets.product_type == product_type].head(settings.prompts_per_product)
        if chosen.empty:
            failures.append((product_id, f"type:{product_type}", "no_approved_targets",
                             f"no approved target prompts for product type '{product_type}'; approve some "
                             "(recontext prompts ...) or import them from a CSV"))
            continue
        for arm in arms(lake, trained):
            found = champions[(product_id, arm)]
            name, version, run_id = found or (tracking.registered_model_name(product_id, arm), None, None)
            token = tokens.get((product_id, arm, version))
            if found and arm != tracking.ZERO_SHOT and run_id not in runs:
                runs[run_id] = training_settings(run_id)
            for prompt in chosen.itertuples():
                for seed in seeds:
                    if found:
                        row = bank_task(product_id, arm, name, version, run_id, token, class_noun(product_type),
                                        prompt.prompt_id, prompt.text, seed, settings)
                        if arm == tracking.ZERO_SHOT:  # no token to say: the reference photos show the product
                            row["generation_prompt"] = row["prompt"]
                    else:  # planned, not generable until the arm has a champion
                        row = {"product_id": product_id, "arm": arm, "adapter_model": name,
                               "prompt_id": prompt.prompt_id, "seed": seed}
                    training = ZERO_SHOT_TRAINING if arm == tracking.ZERO_SHOT else runs.get(run_id)
                    rows.append({**row, "resolution": settings.resolution, "training": training, "scoring": scoring})
    plan = pd.DataFrame(rows, columns=[c for c in PLAN_COLUMNS if c != "evaluation_id"])
    return plan, failures


def evaluation_id(plan: pd.DataFrame) -> str:
    """The hash of what the plan freezes: products, prompt ids, seeds, generation and scoring
    settings, adapter versions."""
    frozen = plan[["product_id", "arm", "prompt_id", "seed", "adapter_model", "adapter_version", "steps",
                   "guidance", "resolution", "scoring"]].astype(str)
    frozen = frozen.sort_values(["product_id", "arm", "prompt_id", "seed"])
    return hashlib.sha256(frozen.to_csv(index=False).encode()).hexdigest()[:16]


def pin(lake: Lakehouse) -> tuple[str | None, int]:
    """Freeze the current plan as an evaluation (nothing is written when it is pinned already):
    (evaluation id or None when nothing is planned, rows written)."""
    plan, _ = current_plan(lake)
    if plan.empty:
        return None, 0
    plan = plan.assign(evaluation_id=evaluation_id(plan))
    return plan.evaluation_id.iloc[0], lake.upsert_rows(
        "evaluation_plans", plan.astype({"seed": "int32", "steps": "Int32", "resolution": "int32"}))


def pinned(lake: Lakehouse, evaluation_ids=None) -> pd.DataFrame:
    """Plan rows of the pinned evaluations (or of `evaluation_ids`)."""
    where = f"WHERE evaluation_id IN ({sql_list(evaluation_ids)})" if evaluation_ids is not None else ""
    frame = lake.spark.sql(f"SELECT * FROM evaluation_plans {where}").toPandas()
    # An empty result can come back without its columns: give it the table's.
    return frame if len(frame.columns) else pd.DataFrame(columns=TABLES["evaluation_plans"].column_names)


def planned_images(lake: Lakehouse, plans: pd.DataFrame) -> pd.DataFrame:
    """The plan rows with the image generated for each (image_id NULL where none is yet). A task
    that yielded two images (never on one device; possible after a device change) takes the
    first by image id, so a slot is always one image."""
    done = lake.spark.sql(
        "SELECT task_key, min(image_id) AS image_id FROM generations GROUP BY task_key").toPandas()
    return plans.merge(done, on="task_key", how="left")


def status(lake: Lakehouse, plans: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per evaluation, oldest first: evaluation_id, created_at, products (count and ids),
    plan size per arm (JSON), complete, and what is missing (one line per arm and product)."""
    plans = pinned(lake) if plans is None else plans
    columns = ["evaluation_id", "created_at", "products", "product_ids", "planned", "complete", "missing"]
    if plans.empty:
        return pd.DataFrame(columns=columns)
    images = planned_images(lake, plans)
    rows = []
    for evaluation, plan in images.groupby("evaluation_id"):
        missing = []
        for (arm, product_id), slots in plan.groupby(["arm", "product_id"]):
            if slots.adapter_version.isna().all():
                missing.append(f"{arm} {product_id}: no @champion adapter (train it, then `recontext promote "
                               f"{product_id} VERSION --arm {arm}`)")
            elif slots.image_id.isna().any():
                missing.append(f"{arm} {product_id}: {int(slots.image_id.isna().sum())} of {len(slots)} planned "
                               "images not generated (`recontext evaluate` generates them)")
        rows.append({"evaluation_id": evaluation, "created_at": plan.created_at.min(),
                     "products": int(plan.product_id.nunique()), "product_ids": sorted(set(plan.product_id)),
                     "planned": json.dumps({a: int(n) for a, n in sorted(plan.groupby("arm").size().items(),
                                                                         key=lambda item: _arm_order(item[0]))}),
                     "complete": not missing, "missing": missing})
    return pd.DataFrame(rows, columns=columns).sort_values("created_at").reset_index(drop=True)


def pending_tasks(lake: Lakehouse) -> tuple[pd.DataFrame, list[tuple]]:
    """(generation tasks not done yet, quarantine rows): the current plan's and those of every
    pinned evaluation, each task once."""
    plan, failures = current_plan(lake)
    tasks = pd.concat([plan, pinned(lake)[plan.columns]], ignore_index=True)
    tasks = tasks[tasks.task_key.notna()]
    if lake.products is not None:
        tasks = tasks[tasks.product_id.isin(lake.products)]
    done = {r["task_key"] for r in lake.spark.sql("SELECT DISTINCT task_key FROM generations").collect()}
    tasks = tasks[~tasks.task_key.isin(done)].drop_duplicates("task_key")
    tasks = tasks.drop(columns=["resolution", "training", "scoring"])
    tasks = tasks.astype({"seed": int, "steps": int, "guidance": float})
    return tasks.reset_index(drop=True), failures


def scoring_settings(settings) -> str:
    """JSON of what turns an evaluation's images into figures, frozen with its plan."""
    generation = settings.generation
    return json.dumps({"generation": {k: getattr(generation, k) for k in (
                           "rank_weights", "min_score", "keep_top", "rank_aggregate", "min_pass_probability")},
                       "raters_per_image": settings.evaluation.raters_per_image,
                       "pass_rule": settings.evaluation.pass_rule}, sort_keys=True)


# --- training settings shown beside each arm's figures ---

# The zero-shot arm trains nothing: no steps, no GPU seconds.
ZERO_SHOT_TRAINING = json.dumps({"steps": 0, "rank": None, "alpha": None, "lr": None, "prior": "none",
                                 "examples": 0, "train_seconds": 0.0})

def training_settings(run_id: str) -> str:
    """The settings an adapter was trained with, from its MLflow run (what actually ran): JSON of
    steps, rank, alpha, learning rate, prior preservation and examples."""
    from mlflow import MlflowClient

    run = MlflowClient().get_run(run_id)
    params = run.data.params
    prior = "none"
    if params.get("baseline.prior_preservation") == "True":
        prior = (f"weight {params.get('baseline.prior_loss_weight')} x "
                 f"{params.get('baseline.class_images')} class images")
    # the run's wall time: the training's device seconds per product (its task held one device)
    seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None
    return json.dumps({"steps": params.get("steps"), "rank": params.get("rank"), "alpha": params.get("lora_alpha"),
                       "lr": params.get("learning_rate"), "prior": prior, "examples": params.get("examples"),
                       "train_seconds": round(seconds, 1) if seconds is not None else None})


def describe_training(settings) -> str | None:
    """One line for an arm's figures from the training JSON of its products' adapters: a field
    that differs between products shows its range (examples usually do)."""
    parsed = [json.loads(s) for s in settings if isinstance(s, str)]
    if not parsed:
        return None

    def field(name):
        values = sorted({str(p.get(name)) for p in parsed}, key=lambda v: (len(v), v))
        return values[0] if len(values) == 1 else f"{values[0]}-{values[-1]}"

    if all(str(p.get("steps")) == "0" for p in parsed):
        return "no training (reference photos at generation), 0 device s per product"
    return (f"{field('steps')} steps, rank {field('rank')}, alpha {field('alpha')}, lr {field('lr')}, "
            f"prior {field('prior')}, {field('examples')} examples, {field('train_seconds')} device s per product "
            "(training run wall time)")
