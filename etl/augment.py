"""Augmentation jobs -> `synthetic_images`: novel views, outpainted positives, negatives.

Each job plans generation tasks per product on the driver (ids and prompts only, no pixels),
drops the tasks whose `task_key` is already stored, and runs the rest in a mapInPandas UDF that
loads each pipeline once per worker. A task's key hashes everything that determines its output
(kind, parent, prompt, model, seed, parameters), so re-runs add nothing, a new product is
augmented without touching the others, and a failed task is retried on the next run (its
failure is recorded in `quarantine`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random

import pandas as pd

from core.settings import AugmentSettings
from etl.image_sets import IMAGE_BYTES
from etl.lakehouse import Lakehouse
from etl.prompt_bank import approved_prompts, class_noun, resolved_types
from etl.step import Step
from core.tables import TABLES, sql_list, sql_literal
from core.vocabulary import AUGMENT_KINDS, AUGMENTED_POSITIVES, REFERENCE, resolve
from udfs.augmentation import OUTPUT_COLUMNS, REJECTED, generate_batches
from udfs.zoo import ModelZoo

STAGE = "augment"
TASK_SCHEMA = ("task_key string, product_id string, kind string, parent_image_id string, prompt_id string, "
               "prompt string, model string, seed int, parameters string")


def task_seed(base: int, *parts: str) -> int:
    """A per-task seed that depends only on the base seed and the task's identity."""
    return (base + int(hashlib.sha256("|".join(parts).encode()).hexdigest()[:8], 16)) % 2**31


def _task(kind: str, product_id: str, parent: str | None, prompt_id: str | None, prompt: str, model: str,
          seed: int, parameters: dict) -> dict:
    identity = json.dumps([kind, parent, prompt_id, prompt, model, seed, parameters], sort_keys=True)
    return {"task_key": hashlib.sha256(identity.encode()).hexdigest(), "product_id": product_id, "kind": kind,
            "parent_image_id": parent, "prompt_id": prompt_id, "prompt": prompt, "model": model, "seed": seed,
            "parameters": json.dumps(parameters, sort_keys=True)}


def _common(settings: AugmentSettings) -> dict:
    return {"resolution": settings.resolution, "steps": settings.steps, "guidance_scale": settings.guidance_scale}


def run_augmentation(step: str, lake: Lakehouse, zoo: ModelZoo,
                     settings: AugmentSettings | None = None) -> dict[str, int]:
    """The augmentation step `step`: the tasks of every kind it makes (AUGMENT_KINDS rows), planned
    by each kind's planner, less those of kinds not on for the product's type, run and written."""
    settings = settings or lake.settings.augment
    kinds = [k for k in AUGMENT_KINDS.values() if k.step == step]
    tasks, rejected = [], []
    for planner in dict.fromkeys(k.planner for k in kinds):
        planned, refused = resolve(planner)(lake, zoo, settings)
        tasks, rejected = tasks + planned, rejected + refused
    if any(not k.default_on for k in kinds):
        types = dict(resolved_types(lake).toPandas().itertuples(index=False))
        tasks = [t for t in tasks if AUGMENT_KINDS[t["kind"]].default_on
                 or types.get(t["product_id"]) in settings.kinds_for_types.get(t["kind"], ())]
    written = _run_tasks(lake, zoo, tasks, masked=any(k.masked for k in kinds))
    written["quarantine"] += lake.quarantine(STAGE, rejected)
    return written


def plan_novel_views(lake: Lakehouse, zoo: ModelZoo, settings: AugmentSettings) -> tuple[list, list]:
    model = zoo.name("image2video")
    frames = settings.novel_view_frames
    keep = sorted({round(i * (frames - 1) / settings.novel_views_per_image)
                   for i in range(1, settings.novel_views_per_image + 1)})  # evenly spaced, never frame 0
    parameters = {"resolution": settings.resolution, "steps": settings.video_steps, "frames": frames,
                  "keep_frames": keep}
    references = lake.spark.sql("SELECT DISTINCT product_id, image_id FROM product_images").toPandas()
    return [_task("novel_view", r.product_id, r.image_id, None, "", model,
                  task_seed(settings.seed, "novel_view", r.image_id), parameters)
            for r in references.itertuples(index=False)], []


def plan_mirrors(lake: Lakehouse, zoo: ModelZoo, settings: AugmentSettings) -> tuple[list, list]:
    """Every reference, mirrored (run_augmentation keeps the types `augment.kinds_for_types` lists)."""
    references = lake.spark.sql("SELECT DISTINCT product_id, image_id FROM product_images").toPandas()
    return [_task("mirror", r.product_id, r.image_id, None, "", "", 0, {})
            for r in references.itertuples(index=False)], []


def plan_outpaints(lake: Lakehouse, zoo: ModelZoo, settings: AugmentSettings) -> tuple[list, list]:
    """Approved scenes painted around each reference and novel view, product pixels kept."""
    mask_method = zoo.models.segmenter
    model = zoo.name("inpaint")
    scenes = approved_prompts(lake, "scene")
    types = dict(resolved_types(lake).toPandas().itertuples(index=False))
    parents = lake.spark.sql(
        f"""SELECT DISTINCT i.product_id, i.image_id FROM (
              SELECT product_id, image_id FROM product_images
              UNION ALL SELECT product_id, image_id FROM synthetic_images WHERE kind = 'novel_view') i
            JOIN masks m ON m.image_id = i.image_id AND m.method = {sql_literal(mask_method)}
            ORDER BY i.product_id, i.image_id""").toPandas()
    tasks, missing = [], []
    for parent in parents.itertuples(index=False):
        product_type = types.get(parent.product_id)
        options = scenes[scenes.product_type == product_type]
        if options.empty:
            missing.append((parent.product_id, f"type:{product_type}", "no_approved_scenes",
                            f"no approved scene prompts for product type '{product_type}'; approve some "
                            "(recontext prompts ...) or import them from a CSV"))
            continue
        chosen = random.Random(task_seed(settings.seed, "scenes", parent.image_id)).sample(
            list(options.itertuples(index=False)), min(settings.outpaints_per_image, len(options)))
        for scene in chosen:
            prompt = f"a photo of a {class_noun(product_type)}, {scene.text}"
            tasks.append(_task("outpaint", parent.product_id, parent.image_id, scene.prompt_id, prompt, model,
                               task_seed(settings.seed, "outpaint", parent.image_id, scene.prompt_id),
                               _common(settings)))
    return tasks, missing


def plan_negatives(lake: Lakehouse, zoo: ModelZoo, settings: AugmentSettings) -> tuple[list, list]:
    """Negatives to reach positives / negatives = settings.positives_per_negative per product.

    Positives are the references, novel views and outpaints. Negatives alternate between
    counterfactuals (another object of the class inpainted where the product was, in a reference
    photo or an outpainted scene; one that leaves the product region unchanged is rejected) and
    in-class negatives (text-to-image from a positive's caption with the product replaced by its
    class noun); without a masked parent, all are in-class negatives.
    """
    mask_method, caption_model, caption_prompt = zoo.models.segmenter, zoo.name("captioner"), zoo.models.caption_prompt
    types = dict(resolved_types(lake).toPandas().itertuples(index=False))
    positives = lake.spark.sql(
        f"""SELECT i.product_id, i.image_id, i.kind, m.image_id IS NOT NULL AS has_mask, c.caption FROM (
              SELECT product_id, image_id, {sql_literal(REFERENCE)} AS kind FROM product_images
              UNION ALL SELECT product_id, image_id, kind FROM synthetic_images
              WHERE kind IN ({sql_list(AUGMENTED_POSITIVES)})) i
            LEFT JOIN masks m ON m.image_id = i.image_id AND m.method = {sql_literal(mask_method)}
                              AND m.area_fraction > 0
            LEFT JOIN captions c ON c.image_id = i.image_id AND c.model = {sql_literal(caption_model)}
                                 AND c.prompt = {sql_literal(caption_prompt)}
            ORDER BY i.product_id, i.image_id""").toPandas()
    tasks = []
    for product_id, group in positives.groupby("product_id", sort=True):
        product_type = class_noun(types.get(product_id))
        wanted = math.ceil(len(group) / settings.positives_per_negative)
        # Counterfactual parents: the references (their own background, as the paper asks) and the
        # outpainted scenes, wherever a product mask says what to replace.
        scenes = group[group.kind.isin([REFERENCE, "outpaint"]) & group.has_mask.astype(bool)]
        captioned = group[group.caption.notna()]
        for i in range(wanted):
            if i % 2 == 0 and len(scenes):
                parent = scenes.iloc[(i // 2) % len(scenes)]
                tasks.append(_task("counterfactual", product_id, parent.image_id, None,
                                   f"a photo of a different {product_type}", zoo.name("inpaint"),
                                   task_seed(settings.seed, "counterfactual", product_id, str(i)),
                                   {**_common(settings), "index": i}))
            else:
                source = captioned.iloc[i % len(captioned)] if len(captioned) else None
                scene = _strip_caption_prefix(source.caption, caption_prompt) if source is not None else ""
                prompt = f"a photo of a {product_type}" + (f", {scene}" if scene else "")
                tasks.append(_task("negative", product_id, None, None, prompt, zoo.name("text2img"),
                                   task_seed(settings.seed, "negative", product_id, str(i)),
                                   {**_common(settings), "index": i,
                                    "caption_of": None if source is None else source.image_id}))
    return tasks, []


def _strip_caption_prefix(caption: str, prompt: str) -> str:
    text = caption.strip()
    return text[len(prompt):].strip(" ,") if prompt and text.lower().startswith(prompt.lower()) else text


def _run_tasks(lake: Lakehouse, zoo: ModelZoo, tasks: list[dict], masked: bool = True) -> dict[str, int]:
    """Run the tasks not stored yet; write images to synthetic_images, failures to quarantine.
    `masked`: the tasks take their parent's product mask (else no masks are read)."""
    spark = lake.spark
    if not tasks:
        return {"synthetic_images": 0, "quarantine": 0}
    planned = spark.createDataFrame(pd.DataFrame(tasks), TASK_SCHEMA)
    # Done: stored, or rejected for good (a rejected output comes out the same on a re-run).
    done = lake.spark.sql(
        f"""SELECT task_key FROM synthetic_images UNION SELECT substr(source_uri, 6) AS task_key FROM quarantine
            WHERE stage = {sql_literal(STAGE)} AND reason_code <> 'generation_failed'
              AND source_uri LIKE 'task:%'""")
    pending = planned.join(done, "task_key", "left_anti")
    if pending.isEmpty():
        return {"synthetic_images": 0, "quarantine": 0}
    method = zoo.models.segmenter
    pending.createOrReplaceTempView("_pending_tasks")
    # Parents come with their bytes and product mask; text-to-image tasks have neither.
    masks = (f"LEFT JOIN masks m ON m.image_id = t.parent_image_id AND m.method = {sql_literal(method)}" if masked
             else "LEFT JOIN (SELECT CAST(NULL AS STRING) AS image_id, CAST(NULL AS BINARY) AS mask) m ON FALSE")
    inputs = spark.sql(
        f"""SELECT t.*, p.image, m.mask FROM _pending_tasks t
            LEFT JOIN ({IMAGE_BYTES}) p ON p.image_id = t.parent_image_id {masks}""")
    schema = ", ".join(f"{name} {_type(name)}" for name in OUTPUT_COLUMNS)
    generated = inputs.mapInPandas(generate_batches(zoo), schema)
    with lake.staged(generated) as staged:
        staged.createOrReplaceTempView("_generated")
        images = lake.spark.sql(  # identical frames of one clip are stored once
            """SELECT * FROM (
                 SELECT *, row_number() OVER (PARTITION BY task_key, image_id ORDER BY parameters) AS n
                 FROM _generated WHERE error IS NULL) WHERE n = 1""")
        written = lake.upsert("synthetic_images", images)
        failures = [_failure(r) for r in staged.where("error IS NOT NULL").collect()]
    return {"synthetic_images": written, "quarantine": lake.quarantine(STAGE, failures)}


def _failure(row) -> tuple:
    """A quarantine row for a failed task: a rejected output (its code; not retried), else a
    generation error (retried on the next run)."""
    if row["error"].startswith(REJECTED):
        code, reason = row["error"][len(REJECTED):].split(": ", 1)
        return row["product_id"], f"task:{row['task_key']}", code, f"{row['kind']} rejected: {reason}"
    return (row["product_id"], f"task:{row['task_key']}", "generation_failed",
            f"{row['kind']} generation failed ({row['error']}); it is retried on the next run")


def _type(column: str) -> str:
    if column == "error":
        return "string"
    return next(c.type for c in TABLES["synthetic_images"].columns if c.name == column)


def _step(name: str, reads: tuple[str, ...], description: str) -> Step:
    """An augmentation step: it makes the kinds whose row names it, and loads their roles."""
    kinds = [k for k in AUGMENT_KINDS.values() if k.step == name]
    typed = ("products", "product_classes") if any(not k.default_on for k in kinds) else ()
    return Step(name, functools.partial(run_augmentation, name), reads=tuple(dict.fromkeys(reads + typed)),
                writes=("synthetic_images", "quarantine"), roles=tuple(sorted({k.role for k in kinds if k.role})),
                description=description)


NOVEL_VIEWS = _step("novel_views", ("product_images",),
                    "novel views of every reference from the image-to-video model")
OUTPAINT = _step("outpaint", ("product_images", "products", "product_classes", "synthetic_images", "masks",
                              "prompt_bank"),
                 "approved scenes painted around each reference and novel view (positives)")
NEGATIVES = _step("negatives", ("product_images", "products", "product_classes", "synthetic_images", "masks",
                                "captions"),
                  "in-class negatives and counterfactuals at the positive:negative ratio")
