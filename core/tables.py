"""Every Delta table of the lakehouse, declared once: name, columns, key, partitioning, comment.

Nothing else in the project spells a schema: jobs select `TABLES[name].column_names` and the
lakehouse creates, registers and merges from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.vocabulary import (AUGMENT_KINDS, AUGMENTED_NEGATIVES, AUGMENTED_POSITIVES, EMBEDDING_VARIANTS, EVALUATED,
                             LABELS, METRICS, REFERENCE)


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # Spark SQL type
    comment: str


@dataclass(frozen=True)
class Table:
    name: str
    comment: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # MERGE keys: a re-run updates rows with these keys instead of adding
    partition_by: tuple[str, ...] = ()
    # Columns that record when a row was written; a change in them alone is not a change.
    audit: tuple[str, ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def data_columns(self) -> list[str]:
        """Everything but the audit timestamps: what a job produces before writing."""
        return [c for c in self.column_names if c not in self.audit]

    def data_schema(self) -> str:
        """Spark schema string of the data columns (for createDataFrame and pandas UDFs)."""
        return ", ".join(f"{c.name} {c.type}" for c in self.columns if c.name not in self.audit)

    @property
    def compared(self) -> list[str]:
        """Columns whose change makes a re-run update a row."""
        return [c for c in self.column_names if c not in self.key and c not in self.audit]

    def ddl_columns(self) -> str:
        # All columns nullable: Sail drops appended columns after NOT NULL ones (docs/engine.md).
        return ", ".join(f"{c.name} {c.type} COMMENT {sql_literal(c.comment)}" for c in self.columns)


def sql_literal(text: str) -> str:
    """A Spark SQL string literal for `text`."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_list(values) -> str:
    """The inside of a Spark SQL `IN (...)`: string literals, comma separated."""
    return ", ".join(sql_literal(v) for v in values)


def _table(name, comment, columns, key, **kw) -> Table:
    return Table(name, comment, tuple(Column(*c) for c in columns), tuple(key), **kw)


TABLES: dict[str, Table] = {
    t.name: t
    for t in [
        _table(
            "products",
            "One row per catalog product.",
            [
                ("product_id", "STRING", "catalog id; safe to use in paths"),
                ("title", "STRING", "product title (English when the source has several)"),
                ("product_type", "STRING", "product type or class noun; NULL until classified"),
                ("attributes", "STRING", "free attributes as a JSON object"),
                ("source", "STRING", "where the product came from: format and location"),
                ("ingested_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["product_id"],
            audit=("ingested_at",),
        ),
        _table(
            "product_images",
            "Reference photos of each product, normalized and deduplicated.",
            [
                ("image_id", "STRING", "sha256 of the normalized pixels (mode, size, bytes)"),
                ("product_id", "STRING", "products.product_id"),
                ("role", "STRING", "'reference' for catalog photos"),
                ("image", "BINARY", "encoded image: the original bytes when kept as-is, else PNG"),
                ("format", "STRING", "encoding of `image`: JPEG, PNG or WEBP"),
                ("width", "INT", "pixels, after orientation and downscaling"),
                ("height", "INT", "pixels, after orientation and downscaling"),
                ("has_alpha", "BOOLEAN", "image is RGBA with a real alpha channel (a mask hint)"),
                ("original_format", "STRING", "format of the source file"),
                ("normalization", "STRING", "what was changed, comma separated; '' when kept as-is"),
                ("source_uri", "STRING", "the file it was read from"),
                ("ingested_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["image_id", "product_id"],
            audit=("ingested_at",),
        ),
        _table(
            "quarantine",
            "Inputs that could not be used, with a reason a person can act on.",
            [
                ("stage", "STRING", "pipeline stage that rejected the input"),
                ("product_id", "STRING", "product it belongs to, as given by the source"),
                ("source_uri", "STRING", "file, manifest line or record that was rejected"),
                ("reason_code", "STRING", "short category, e.g. truncated, too_small"),
                ("reason", "STRING", "what is wrong and what to do about it"),
                ("source", "STRING", "the source being processed"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["stage", "product_id", "source_uri"],
            audit=("created_at",),
        ),
        _table(
            "product_classes",
            "Product types for products whose catalog gave none, with how they were found ('unknown' "
            "when zero-shot scores were too low to trust).",
            [
                ("product_id", "STRING", "products.product_id"),
                ("product_type", "STRING", "the assigned type"),
                ("source", "STRING", "attribute, title_head, title_similarity, title_open (etl/product_types.py), "
                                     "clip_zero_shot or human (metadata: rows from before the title typing)"),
                ("score", "DOUBLE", "confidence: 1.0 for an attribute or a person; below 1.0 from a title; mean "
                                    "CLIP cosine of the references to the type's text for zero-shot"),
                ("backbone", "STRING", "the model behind the score: the sentence model for titles, the CLIP model "
                                       "for zero-shot; '' for attributes"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["product_id"],
            audit=("created_at",),
        ),
        _table(
            "prompt_bank",
            "LLM-written scene and target prompts per product type, curated; only approved ones are used.",
            [
                ("prompt_id", "STRING", "sha256 of product type, purpose and text (first 16 hex)"),
                ("product_type", "STRING", "the product type the prompt was written for"),
                ("purpose", "STRING", "scene (outpainted backgrounds) or target (final generation)"),
                ("text", "STRING", "the prompt"),
                ("status", "STRING", "approved, rejected or pending"),
                ("reason", "STRING", "why it was rejected (or the reviewer's note)"),
                ("reviewed_by", "STRING", "auto (curation checks) or human"),
                ("llm", "STRING", "the model that wrote it (or 'human' for imported prompts; NULL for seeds)"),
                ("source", "STRING", "seed (the curated seed bank shipped with recontext), llm or human"),
                ("seed", "INT", "generation seed"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["prompt_id"],
            audit=("created_at",),
        ),
        _table(
            "synthetic_images",
            "Augmentations: novel views, outpainted positives, in-class negatives, counterfactuals.",
            [
                ("image_id", "STRING", "sha256 of the image's pixels"),
                ("product_id", "STRING", "products.product_id"),
                ("kind", "STRING", f"{', '.join(AUGMENTED_POSITIVES)} (positives); "
                                   f"{', '.join(AUGMENTED_NEGATIVES)} (negatives)"),
                ("parent_image_id", "STRING", "the image it was made from; NULL for text-to-image negatives"),
                ("task_key", "STRING", "hash of everything that determines the output; re-runs skip done keys"),
                ("prompt_id", "STRING", "prompt_bank.prompt_id, when a bank prompt was used"),
                ("prompt", "STRING", "the exact prompt given to the model"),
                ("model", "STRING", "model name"),
                ("seed", "INT", "generator seed"),
                ("parameters", "STRING", "JSON: steps, guidance, size, frame index, ..."),
                ("image", "BINARY", "PNG"),
                ("width", "INT", "pixels"),
                ("height", "INT", "pixels"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            # Two tasks may yield the same pixels (tiny models do): keyed by task, not by image.
            key=["task_key", "image_id"],
            audit=("created_at",),
        ),
        _table(
            "training_images",
            "The filtered training set: every image considered, selected or not and why. Training "
            "reads a pinned Delta version of this table.",
            [
                ("product_id", "STRING", "products.product_id"),
                ("image_id", "STRING", "the image"),
                ("kind", "STRING", ", ".join((REFERENCE, *AUGMENT_KINDS))),
                ("is_positive", "BOOLEAN", "shows the product (trained with the rare token)"),
                ("score", "DOUBLE", "weighted sum of metric columns (training.score_weights)"),
                ("rank", "INT", "rank among the product's eligible synthetic positives / negatives"),
                ("selected", "BOOLEAN", "in the training set"),
                ("reason", "STRING", "why not selected: mask IoU below threshold, score below minimum, over quota"),
                ("mask_iou", "DOUBLE", "image_metrics.mask_iou"),
                ("caption", "STRING", "the fine-grained caption used in its training prompt"),
                ("config_hash", "STRING", "hash of the filter settings"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["product_id", "image_id"],
            audit=("created_at",),
        ),
        _table(
            "adapters",
            "Trained LoRA adapters, one per product, training-set version and training config.",
            [
                ("product_id", "STRING", "products.product_id"),
                ("arm", "STRING", "ours (augmented, filtered training set) or baseline (DreamBooth on the references)"),
                ("token", "STRING", "the rare token that means this product"),
                ("token_scores", "STRING", "JSON: validation score of every token tried in the sweep"),
                ("training_set_version", "BIGINT", "Delta version of training_images (ours) or product_images (baseline) it was trained on"),
                ("config_hash", "STRING", "hash of the training settings and base model"),
                ("run_id", "STRING", "MLflow run"),
                ("model_name", "STRING", "MLflow registered model"),
                ("model_version", "STRING", "registered model version"),
                ("alias", "STRING", "alias given at registration (candidate)"),
                ("final_loss", "DOUBLE", "mean loss of the last 10 steps"),
                ("clip_i", "DOUBLE", "last validation CLIP-I against the references"),
                ("dino_i", "DOUBLE", "last validation DINO against the references"),
                ("images", "INT", "training examples (positives + negatives)"),
                ("device", "STRING", "where its task trained it: cuda:<n> or cpu"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["product_id", "arm", "training_set_version", "config_hash"],
            audit=("created_at",),
        ),
        _table(
            "generations",
            "Images generated with each product's champion adapter (and its baseline), with full lineage.",
            [
                ("image_id", "STRING", "sha256 of the image's pixels"),
                ("product_id", "STRING", "products.product_id"),
                ("task_key", "STRING", "hash of adapter version, prompt (or scene), seed and parameters"),
                ("arm", "STRING", "ours or baseline (adapters.arm), or zero_shot (no adapter: reference photos)"),
                ("adapter_model", "STRING", "MLflow registered model"),
                ("adapter_version", "STRING", "its version (the champion when generated)"),
                ("run_id", "STRING", "MLflow run that trained the adapter"),
                ("token", "STRING", "the adapter's rare token"),
                ("origin", "STRING", "bank (the batch pipeline's approved target prompts) or on_demand (a "
                                     "request: recontext imagine, the serving model); NULL in rows written before "
                                     "requests existed (bank)"),
                ("prompt_id", "STRING", "prompt_bank.prompt_id of the target prompt; NULL on demand"),
                ("scene", "STRING", "on demand: the scene text asked for; NULL for the bank"),
                ("prompt", "STRING", "the prompt with the class noun (used for CLIP-T)"),
                ("generation_prompt", "STRING", "the prompt given to the model (with the token)"),
                ("seed", "INT", "generator seed"),
                ("scheduler", "STRING", "scheduler class"),
                ("steps", "INT", "inference steps"),
                ("guidance", "DOUBLE", "classifier-free guidance scale"),
                ("image", "BINARY", "PNG"),
                ("width", "INT", "pixels"),
                ("height", "INT", "pixels"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["task_key", "image_id"],
            audit=("created_at",),
        ),
        _table(
            "ranked_generations",
            "Post-finetuning ranking: every generation's aggregate score, rank and whether it is kept.",
            [
                ("product_id", "STRING", "products.product_id"),
                ("image_id", "STRING", "generations.image_id"),
                ("score", "DOUBLE", "the aggregate: weighted sum of metric columns (generation.rank_weights) "
                                    "or the learned ranker's pass probability"),
                ("ranked_by", "STRING", "the aggregate used: 'sum', or 'recontext-ranker v<N>'"),
                ("rank", "INT", "rank within the product among generations above the threshold (on demand: "
                                "within the request)"),
                ("kept", "BOOLEAN", "in the product's top N"),
                ("reason", "STRING", "why not kept: below the score threshold, or over the top N"),
                ("adapter_version", "STRING", "adapter version that generated it"),
                ("origin", "STRING", "generations.origin: bank (the batch ranking) or on_demand (one request's "
                                     "ranking); NULL in rows written before requests existed (bank)"),
                ("arm", "STRING", "generations.arm of the adapter that made it (the batch ranking ranks ours); "
                                  "NULL in rows written before the column existed (ours)"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            # One row per image and arm: identical pixels from two tasks are one ranked row.
            key=["product_id", "arm", "image_id"],
            audit=("created_at",),
        ),
        _table(
            "masks",
            "Product masks per image and method.",
            [
                ("image_id", "STRING", "the masked image"),
                ("method", "STRING", "u2netp (salient object), sam (box prompted) or alpha (the image's own)"),
                ("model", "STRING", "model name, or 'alpha'"),
                ("mask", "BINARY", "PNG, mode L, 255 = product"),
                ("area_fraction", "DOUBLE", "product pixels / all pixels"),
                ("bbox", "ARRAY<INT>", "[x0, y0, x1, y1] of the product pixels, end-exclusive"),
                ("score", "DOUBLE", "the model's confidence in the mask, 0..1"),
                ("model_fingerprint", "STRING", "name@digest of the weights it came from (a change recomputes it)"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["image_id", "method"],
            audit=("created_at",),
        ),
        _table(
            "captions",
            "Fine-grained captions from a vision-language model, with the prompt that asked for them.",
            [
                ("image_id", "STRING", "the captioned image"),
                ("model", "STRING", "captioner name"),
                ("prompt", "STRING", "instruction prompt given to the captioner"),
                ("caption", "STRING", "the caption"),
                ("model_fingerprint", "STRING", "name@digest of the weights it came from (a change recomputes it)"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["image_id", "model", "prompt"],
            audit=("created_at",),
        ),
        _table(
            "embeddings",
            "Image embeddings, once per image, backbone and variant, so metrics never re-run models.",
            [
                ("image_id", "STRING", "the embedded image"),
                ("backbone", "STRING", "model name, e.g. tiny-clip or ViT-B-32"),
                ("role", "STRING", "clip or dino"),
                ("variant", "STRING", "; ".join(f"{v.name} ({v.description})" for v in EMBEDDING_VARIANTS.values())),
                ("mask_method", "STRING", "masks.method of the mask a masked variant used; '' for full"),
                ("vector", "ARRAY<FLOAT>", "unit-norm embedding"),
                ("model_fingerprint", "STRING", "name@digest of the weights it came from (a change recomputes it)"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["image_id", "backbone", "variant", "mask_method"],
            audit=("created_at",),
        ),
        _table(
            "text_embeddings",
            "CLIP text embeddings of captions and prompts, keyed by the text's sha256.",
            [
                ("text_id", "STRING", "sha256 of the text"),
                ("backbone", "STRING", "CLIP model name"),
                ("text", "STRING", "the embedded text"),
                ("vector", "ARRAY<FLOAT>", "unit-norm embedding"),
                ("model_fingerprint", "STRING", "name@digest of the weights it came from (a change recomputes it)"),
                ("created_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["text_id", "backbone"],
            audit=("created_at",),
        ),
        _table(
            "image_metrics",
            "Per-image fidelity metrics in raw cosine, with the backbones that produced them.",
            [
                ("image_id", "STRING", "the scored image"),
                ("product_id", "STRING", "its product"),
                ("kind", "STRING", "reference, or the synthetic/generated kind"),
                *((m.name, "DOUBLE", m.comment) for m in METRICS),
                ("n_references", "INT", "reference images compared against"),
                ("text", "STRING", "the caption or prompt used for clip_t"),
                ("text_source", "STRING", "caption or prompt"),
                ("clip_backbone", "STRING", "CLIP model name"),
                ("dino_backbone", "STRING", "DINO model name"),
                ("mask_method", "STRING", "mask method for the segmented metrics and mask_iou"),
                ("iou_against", "STRING", "what mask_iou compares with: alpha, or parent:<image_id>"),
                ("models", "STRING", "fingerprints (name@digest) of the CLIP, DINO, segmenter and captioner weights "
                                     "the scores come from; a change recomputes the product's rows"),
                ("metric_versions", "STRING", "name=version of every metric (core.vocabulary.METRICS) when the row "
                                              "was computed; a new or changed metric recomputes the product's rows"),
                ("computed_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["image_id", "product_id"],
            audit=("computed_at",),
        ),
        _table(
            "human_ratings",
            "Answers of human raters to the eight questions of the paper's appendix A.3, per image.",
            [
                ("rater", "STRING", "rater id as given in the ratings file"),
                ("image_id", "STRING", "generations.image_id"),
                ("question", "STRING", "question id (etl.ratings.QUESTIONS)"),
                ("answer", "STRING", "yes, maybe, no or unclear"),
                ("product_id", "STRING", "the image's product"),
                ("source_uri", "STRING", "ratings file and line it came from"),
                ("source", "STRING", "human (people's answers) or synthetic (made-up raters: demo and tests)"),
                ("imported_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["rater", "image_id", "question"],
            audit=("imported_at",),
        ),
        _table(
            "rated_images",
            "Verdict per rated image of each evaluation (evaluation.pass_rule): by default a rater passes an "
            "image when all eight answers are yes, and the image passes when a majority of its raters pass it.",
            [
                ("evaluation_id", "STRING", "evaluation_plans.evaluation_id"),
                ("image_id", "STRING", "generations.image_id"),
                ("product_id", "STRING", "its product"),
                ("arm", "STRING", "generations.arm: ours, baseline or zero_shot"),
                ("raters", "INT", "distinct raters of the image"),
                ("passed", "BOOLEAN", "the verdict under evaluation.pass_rule"),
                ("failed_questions", "STRING", "questions without a yes majority, comma separated"),
                ("score", "DOUBLE", "automatic aggregate (generation.rank_weights) of the image"),
                ("kept", "BOOLEAN", "kept by the ranking of the evaluation's images (ours); false for the "
                                    "baseline, which is not ranked"),
                ("ratings_source", "STRING", "human, synthetic or mixed: who answered"),
                ("computed_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["evaluation_id", "arm", "product_id", "image_id"],
            audit=("computed_at",),
        ),
        _table(
            "evaluation_metrics",
            "The paper's Table 2 per evaluation, arm, selection, dataset and product: mean metrics of the "
            "images the evaluation's plan pinned (selection 'all': every planned image, the same prompts and "
            "seeds in every arm; 'ranked': ours, the kept top N), with pass rates where ratings exist. Only "
            "complete evaluations have rows.",
            [
                ("evaluation_id", "STRING", "evaluation_plans.evaluation_id: the pinned plan these figures cover"),
                ("arm", "STRING", "an arm of the plan: ours, baseline or zero_shot"),
                ("selection", "STRING", "all (every generation of the champion version) or ranked (kept top N)"),
                ("dataset", "STRING", "products.source the products came from"),
                ("product_id", "STRING", "the product, or '(all)' for the dataset row"),
                ("products", "INT", "products evaluated"),
                ("images", "INT", "generated images evaluated"),
                *((name, "DOUBLE", f"mean {LABELS[name]}") for name in EVALUATED),
                ("score", "DOUBLE", "mean automatic aggregate (generation.rank_weights)"),
                ("rated_images", "INT", "images with at least evaluation.raters_per_image raters"),
                ("image_pass_rate", "DOUBLE", "fraction of rated images that pass"),
                ("product_pass_rate", "DOUBLE", "fraction of rated products with at least one passing image"),
                ("pearson_score_pass", "DOUBLE", "Pearson correlation of the aggregate with human pass (0/1)"),
                ("ranking_gain", "DOUBLE", "ranked rows: image pass rate of the kept images / of all images - 1 "
                                           "(the paper's +30.9%)"),
                ("ratings_source", "STRING", "human, synthetic or mixed: who rated; figures from synthetic "
                                             "ratings say nothing about quality"),
                ("training", "STRING", "the arm's training settings (steps, rank, alpha, lr, prior preservation, "
                                       "examples) from its adapters' MLflow runs"),
                ("selected_after_results", "BOOLEAN", "an adapter version it evaluates was promoted after an "
                                                      "evaluation of its product existed: figures selected after "
                                                      "seeing results"),
                ("computed_at", "TIMESTAMP", "when this row was last written"),
            ],
            key=["evaluation_id", "arm", "selection", "dataset", "product_id"],
            audit=("computed_at",),
        ),
        _table(
            "evaluation_plans",
            "Pinned evaluations: per evaluation, the images every arm must generate (products, prompts, "
            "seeds, generation settings, each arm's adapter version), frozen when the evaluation was created.",
            [
                ("evaluation_id", "STRING", "hash of the plan's content: a changed bank, setting or champion "
                                            "is a new evaluation"),
                ("arm", "STRING", "ours, baseline or zero_shot"),
                ("product_id", "STRING", "products.product_id"),
                ("prompt_id", "STRING", "prompt_bank.prompt_id of the target prompt"),
                ("seed", "INT", "generator seed"),
                ("task_key", "STRING", "generations.task_key of the image that fills this slot; NULL while the "
                                       "arm has no champion for the product"),
                ("adapter_model", "STRING", "MLflow registered model"),
                ("adapter_version", "STRING", "the arm's @champion version when pinned; NULL when it had none"),
                ("run_id", "STRING", "MLflow run that trained the adapter"),
                ("token", "STRING", "the adapter's rare token"),
                ("origin", "STRING", "always bank"),
                ("scene", "STRING", "always NULL (bank prompts)"),
                ("prompt", "STRING", "the prompt with the class noun (used for CLIP-T)"),
                ("generation_prompt", "STRING", "the prompt given to the model (with the token)"),
                ("steps", "INT", "inference steps"),
                ("guidance", "DOUBLE", "classifier-free guidance scale"),
                ("resolution", "INT", "pixels per side"),
                ("training", "STRING", "JSON: the adapter's training settings (steps, rank, alpha, lr, prior, "
                                       "examples) from its MLflow run"),
                ("scoring", "STRING", "JSON: the ranking and pass-rule settings its figures are computed with"),
                ("created_at", "TIMESTAMP", "when the evaluation was pinned"),
            ],
            key=["evaluation_id", "arm", "product_id", "prompt_id", "seed"],
            audit=("created_at",),
        ),
        _table(
            "promotions",
            "Every `recontext promote`: which version became an arm's champion, and which evaluations of the "
            "product existed then (a promotion after them selects on seen results).",
            [
                ("product_id", "STRING", "products.product_id"),
                ("arm", "STRING", "ours or baseline"),
                ("model_version", "STRING", "the version made @champion"),
                ("after_evaluations", "STRING", "evaluation ids of the product that existed, comma separated; "
                                                "'' when none"),
                ("promoted_at", "TIMESTAMP", "when"),
            ],
            key=["product_id", "arm", "model_version", "after_evaluations"],
            audit=("promoted_at",),
        ),
        _table(
            "job_runs",
            "One row per stage of every `recontext run`: what ran, how long, what it wrote, how it ended.",
            [
                ("run_id", "STRING", "the run (one invocation of recontext run)"),
                ("stage", "STRING", "stage name in jobs/pipeline.toml"),
                ("status", "STRING", "running, succeeded, skipped (inputs unchanged), failed, or killed "
                                     "(the process died; found by the next run)"),
                ("started_at", "TIMESTAMP", "stage start"),
                ("finished_at", "TIMESTAMP", "stage end; NULL while running"),
                ("seconds", "DOUBLE", "wall time"),
                ("products", "INT", "products in the run's scope (all, or --products)"),
                ("rows_written", "BIGINT", "rows written over all tables"),
                ("tables_written", "STRING", "JSON: rows written per table"),
                ("inputs", "STRING", "JSON fingerprint of the stage's inputs after it ran (table versions, "
                                     "config hash, source listing, registry aliases)"),
                ("error", "STRING", "the error, for a failed stage"),
                ("host", "STRING", "machine that ran it"),
                ("pid", "INT", "process id"),
                ("base_model_loads", "INT", "diffusion pipelines loaded from disk during the stage by any "
                                            "process, driver or Spark worker (each records its loads under "
                                            "<home>/logs/model_loads; the zoo keeps one per process)"),
            ],
            key=["run_id", "stage"],
        ),
    ]
}
