"""On-demand recontextualization: a product and a scene in, ranked faithful images out.

    from training.imagine import imagine
    imagine(lake, "coffee-cup", "on a marble kitchen counter, morning light", n=8, keep=2)

One request takes the batch pipeline's path for one product: the prompt from the product's
champion adapter (its rare token, class noun, then the scene), `n` images from
training.generate.render at the resolution the adapter was trained at, the metrics of
etl/metrics.py (`score_product`: the new images' embeddings, made here by the models the
embeddings job uses, against the product's stored reference embeddings), ranked by
etl.ranking.rank_generations among the request's images. The arguments pass the checks that
need no data first (training/requests.py: the CLI runs them before the engine starts), then the
prompt bank's checks against the home's types and brands (etl/prompt_bank.scene_refusal); a
refused scene is an error, never edited.

Written with lineage (origin 'on_demand', the scene, seed and adapter version): `generations`,
`image_metrics` and `ranked_generations`. Batch ranking, evaluation (Table 2) and the report
read the prompt bank's generations only. Reads: products, product_classes, adapters,
embeddings, the registry's champions. Models: text2img, clip, dino and the segmenter, loaded
once per process by the zoo (udfs/zoo.py LOADS counts them): a notebook's or a server's next
request reuses them. Not a pipeline step: nothing in the stage graph depends on requests.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import pandas as pd

from etl import tracking
from core.errors import UserError
from etl.lakehouse import Lakehouse
from etl.metrics import input_column, metric_constants, score_product, stored_vector_columns, stored_vector_joins
from etl.prompt_bank import class_noun, resolved_types, scene_refusal
from core.tables import sql_list, sql_literal
from core.vocabulary import BANK, GENERATED, METRIC_COLUMNS, ON_DEMAND, REFERENCE, vector_inputs
from etl.plans import prompts, task_key
from training.generate import adapter_on, image_row
from udfs.diffusion import render
from etl.ranking import configured_ranker, rank_generations
from training.requests import REFUSED, checked_request
from udfs.imaging import decode_rgb
from udfs.inference import variant_image
from udfs.zoo import SEGMENTER, ModelZoo

log = logging.getLogger(__name__)
ROLES = ("text2img", "clip", "dino", SEGMENTER)  # the models a request runs (its figures come from these)
# What a request returns per image: ranking, metrics, the PNG, lineage.
OUTPUT = ["product_id", "rank", "kept", "score", "ranked_by", "reason", *METRIC_COLUMNS, "image_id", "image", "width",
          "height", "seed", "scene", "prompt", "generation_prompt", "arm", "adapter_model", "adapter_version", "steps",
          "guidance", "task_key"]
_adapter_dirs: dict[tuple[str, str], str] = {}  # (model, version) -> downloaded adapter, once per process


@dataclass(frozen=True)
class Adapter:
    """A product's champion adapter and what a prompt and an image size need from it."""

    product_id: str
    arm: str
    name: str
    version: str
    run_id: str
    token: str
    class_noun: str
    resolution: int  # the training resolution (its MLflow run's `resolution` parameter)


class Imaginer:
    """Answers requests on one home; models stay loaded in the process between requests."""

    def __init__(self, lake: Lakehouse, zoo: ModelZoo | None = None):
        self.lake = lake
        self.zoo = zoo or ModelZoo.from_settings(lake.settings)
        tracking.configure(lake.settings)

    def model_weights(self) -> dict[str, str]:
        """role -> the kind of weights it loads (tiny random weights, packaged, configured): every
        answer carries it, since figures from tiny models mean nothing."""
        return self.zoo.weights_kinds([self.zoo.models.segmenter if r == SEGMENTER else r for r in ROLES])

    def adapter(self, product_id: str, arm: str = tracking.OURS) -> Adapter:
        """The product's current champion (resolved per request, so a promotion takes effect at once)."""
        from mlflow import MlflowClient

        types = resolved_types(self.lake).where(f"product_id = {sql_literal(product_id)}").collect()
        if not types:
            known = [r["product_id"] for r in self.lake.spark.sql(
                "SELECT product_id FROM products ORDER BY product_id LIMIT 20").collect()]
            raise UserError(f"unknown product {product_id!r}; products: {', '.join(known) or '(none)'}", REFUSED)
        champion = tracking.champion(product_id, arm)
        if champion is None:
            raise UserError(f"{product_id} has no @champion adapter in arm {arm!r}: train it (`recontext train "
                            f"--products {product_id}`) and promote a version (`recontext promote {product_id} "
                            "VERSION`)", REFUSED)
        name, version, run_id = champion
        tokens = self.lake.spark.sql(
            f"SELECT token FROM adapters WHERE product_id = {sql_literal(product_id)} AND arm = {sql_literal(arm)} "
            f"AND model_version = {sql_literal(version)}").collect()
        if not tokens:
            raise UserError(f"version {version} of {name} is not in the adapters table (registered by another "
                            "home?); promote one this home trained")
        params = MlflowClient().get_run(run_id).data.params
        resolution = int(params.get("resolution", self.lake.settings.generation.resolution))
        return Adapter(product_id, arm, name, version, run_id, tokens[0]["token"],
                       class_noun(types[0]["product_type"]), resolution)

    def __call__(self, product_id: str, scene: str, n: int = 4, keep: int | None = None, seed: int | None = None,
                 arm: str = tracking.OURS) -> pd.DataFrame:
        """Generate, score, rank and record `n` images of the product in the scene; returns one row
        per image (kept first, by rank) with its PNG bytes, metrics, score and lineage."""
        settings = self.lake.settings.generation
        request = checked_request(self.lake.settings, product_id, scene, n, keep, seed, arm)  # no data needed
        product_id, scene, n, keep, seed, arm = (request.product_id, request.scene, request.n, request.keep,
                                                 request.seed, request.arm)
        adapter = self.adapter(product_id, arm)
        reason = scene_refusal(self.lake, scene, adapter.class_noun, product_id)
        if reason:
            raise UserError(f"scene refused: {reason}: {scene!r}", REFUSED)
        text, generation_prompt = prompts(adapter.token, adapter.class_noun, scene)
        tasks = [{"task_key": task_key(adapter.name, adapter.version, f"scene:{scene}", s, settings.steps,
                                       settings.guidance_scale, adapter.resolution),
                  "product_id": product_id, "arm": arm, "origin": ON_DEMAND, "scene": scene,
                  "adapter_model": adapter.name, "adapter_version": adapter.version, "run_id": adapter.run_id,
                  "token": adapter.token, "prompt_id": None, "prompt": text, "generation_prompt": generation_prompt,
                  "seed": s, "steps": settings.steps, "guidance": float(settings.guidance_scale)}
                 for s in range(seed, seed + n)]
        images, scheduler = self._generate(adapter, generation_prompt, [t["seed"] for t in tasks])
        generated = pd.DataFrame([image_row(t, image, scheduler) for t, image in zip(tasks, images)])
        # Two seeds can give the same pixels: one image, scored and ranked once (both tasks are kept).
        unique = generated.drop_duplicates("image_id")
        metrics = self._score(product_id, list(unique.image_id), [decode_rgb(b) for b in unique.image], text)
        ranked = rank_generations(metrics.assign(adapter_version=adapter.version, origin=ON_DEMAND, arm=adapter.arm),
                                  dataclasses.replace(settings, keep_top=keep), configured_ranker(self.lake),
                                  {product_id: adapter.version})
        self._record(generated, metrics, ranked)
        out = ranked.drop(columns=["product_id", "adapter_version", "origin", "arm"]).merge(
            metrics[["image_id", *METRIC_COLUMNS]], on="image_id").merge(unique, on="image_id")
        return out[OUTPUT].sort_values(["kept", "rank", "score", "image_id"], ascending=[False, True, False, True],
                               na_position="last").reset_index(drop=True)

    def _generate(self, adapter: Adapter, generation_prompt: str, seeds: list[int]) -> tuple[list, str]:
        """The images, and the scheduler that made them."""
        import mlflow

        settings = self.lake.settings.generation
        key = (adapter.name, adapter.version)
        if key not in _adapter_dirs:
            _adapter_dirs[key] = mlflow.diffusers.load_model(f"models:/{adapter.name}/{adapter.version}").adapter_path
        # The zoo's pipeline is shared by the process: the adapter is on it only while this request renders.
        with self.zoo.exclusive("text2img"), adapter_on(self.zoo, _adapter_dirs[key], settings) as pipeline:
            images = render(pipeline, [generation_prompt] * len(seeds), seeds, settings.steps,
                            settings.guidance_scale, adapter.resolution, settings.batch_size)
            return images, type(pipeline.scheduler).__name__

    def _score(self, product_id: str, image_ids: list[str], images: list, text: str) -> pd.DataFrame:
        """image_metrics rows of the new images: score_product over the product's stored reference
        inputs and the new images' inputs, made as the masks and embeddings jobs make them (each
        input a metric names, each variant prepared by its own function)."""
        zoo = self.zoo
        references = self._reference_inputs(product_id)
        masks = [m.mask if m.area_fraction > 0 else None for m in zoo.load(zoo.models.segmenter).segment(images)]
        new = pd.DataFrame({"image_id": image_ids, "product_id": product_id, "kind": GENERATED, "is_reference": False,
                            "text": text, "text_source": "prompt", "mask": None, "source_mask": None,
                            "iou_against": None})  # generated images have no source mask
        for role, variant in vector_inputs():
            prepared = {}
            for i, (image, mask) in enumerate(zip(images, masks)):
                try:  # as the embeddings job: a variant that cannot be made has no vector
                    prepared[i] = variant_image(variant, image, mask)
                except ValueError:
                    pass
            vectors = dict(zip(prepared, zoo.load(role).embed_images(list(prepared.values())))) if prepared else {}
            new[input_column(f"{role}:{variant}")] = [vectors.get(i) for i in range(len(images))]
        new[input_column("text")] = [zoo.load("clip").embed_texts([text])[0]] * len(images)
        scored = score_product(pd.concat([references, new], ignore_index=True), metric_constants(zoo))
        return scored[scored.image_id.isin(image_ids)].reset_index(drop=True)

    def _reference_inputs(self, product_id: str) -> pd.DataFrame:
        """The product's reference photos with their stored vectors (every variant a metric reads)."""
        references = self.lake.spark.sql(
            f"""SELECT i.image_id, {stored_vector_columns()}
                FROM (SELECT DISTINCT image_id FROM product_images
                      WHERE product_id = {sql_literal(product_id)} AND role = '{REFERENCE}') i
                {stored_vector_joins(self.zoo, "i")}""").toPandas()
        if references.empty or references[input_column("clip:full")].isna().all():
            raise UserError(f"{product_id}'s reference photos have no stored embeddings; run `recontext score` first")
        return references.assign(product_id=product_id, kind=REFERENCE, is_reference=True, text=None,
                                 text_source=None, text_vector=None, mask=None, source_mask=None, iou_against=None)

    def _record(self, generated: pd.DataFrame, metrics: pd.DataFrame, ranked: pd.DataFrame) -> None:
        """Lineage rows. An image the prompt bank also made (same pixels) keeps its batch ranking."""
        lake = self.lake
        lake.upsert_rows("generations", generated.astype({"seed": "int32", "steps": "int32"}))
        lake.upsert_rows("image_metrics", metrics)
        product = sql_literal(ranked.product_id.iloc[0])
        banked = {r["image_id"] for r in lake.spark.sql(
            f"SELECT image_id FROM ranked_generations WHERE product_id = {product} "
            f"AND coalesce(arm, '{tracking.OURS}') = {sql_literal(ranked.arm.iloc[0])} AND coalesce(origin, '{BANK}') "
            f"= '{BANK}' AND image_id IN ({sql_list(ranked.image_id)})").collect()}
        if banked:
            ranked = ranked[~ranked.image_id.isin(banked)]
        if len(ranked):
            lake.upsert_rows("ranked_generations", ranked)


def imagine(lake: Lakehouse, product_id: str, scene: str, n: int = 4, keep: int | None = None,
            seed: int | None = None, arm: str = tracking.OURS, zoo: ModelZoo | None = None) -> pd.DataFrame:
    """One request, for notebooks and scripts: see Imaginer.__call__."""
    return Imaginer(lake, zoo)(product_id, scene, n, keep, seed, arm)
