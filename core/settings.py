"""Settings: the one place that holds every default.

Precedence: explicit arguments > environment (RECONTEXT_HOME, SPARK_REMOTE) >
`<home>/config.toml` > the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from core.vocabulary import AUGMENT_KINDS, AUGMENTED_POSITIVES, METRIC_COLUMNS

DEFAULT_HOME = Path("~/.recontext")


@dataclass(frozen=True)
class IngestSettings:
    # Catalog sources `recontext run` ingests: folders, manifests or ABO roots (format detected).
    sources: tuple[str, ...] = ()
    max_side: int = 2048  # larger images are downscaled (LANCZOS) to this longest side
    min_side: int = 64  # images whose shorter side is below this are quarantined
    max_pixels: int = 64_000_000  # larger images are quarantined as possible decompression bombs
    max_file_bytes: int = 64 * 1024 * 1024  # larger files are quarantined unread


@dataclass(frozen=True)
class ModelPath:
    path: str | None = None  # a local folder/file in the library's own layout; None = tiny model
    name: str | None = None  # backbone name recorded next to outputs; default: folder name


@dataclass(frozen=True)
class ModelSettings:
    """Which weights each model role loads. Real weights are a path here, never a code change."""

    device: str = "auto"  # auto = cuda when available, else cpu
    batch_size: int = 16  # images per forward pass inside a UDF batch
    tiny_dir: str | None = None  # where tiny random-weight models are built; default <home>/models/tiny
    tiny_family: str = "sd"  # the tiny text2img/inpaint builds: "sd" (SD 1.5 layout), "sdxl" or "flux2-klein"
    clip: ModelPath = field(default_factory=ModelPath)  # open_clip local-dir folder
    dino: ModelPath = field(default_factory=ModelPath)  # transformers DINO / DINOv2 snapshot
    captioner: ModelPath = field(default_factory=ModelPath)  # transformers image-text-to-text snapshot
    sam: ModelPath = field(default_factory=ModelPath)  # segment-anything checkpoint file (.pth)
    sam_variant: str = "tiny"  # vit_h, vit_l, vit_b for released checkpoints
    u2netp: ModelPath = field(default_factory=ModelPath)  # ONNX file; default: the packaged real one
    # diffusers snapshots; the family (SD 1.x/2.x or SDXL) is read from model_index.json
    text2img: ModelPath = field(default_factory=ModelPath)  # StableDiffusion(XL)Pipeline folder
    inpaint: ModelPath = field(default_factory=ModelPath)  # StableDiffusion(XL)InpaintPipeline folder
    image2video: ModelPath = field(default_factory=ModelPath)  # diffusers StableVideoDiffusionPipeline folder
    llm: ModelPath = field(default_factory=ModelPath)  # causal LM folder (GGUF or safetensors); default: SmolLM2
    sentence: ModelPath = field(default_factory=ModelPath)  # sentence embedder folder; default: all-MiniLM-L6-v2
    segmenter: str = "u2netp"  # the mask method used for segmented metrics: u2netp or sam
    u2netp_runtime: str = "auto"  # auto (torch on a GPU, else onnxruntime), torch or onnxruntime
    # BLIP-style models continue this prefix; instruction models get it as the question, e.g.
    # "Describe the product's colour, position, lighting, materials and details in one sentence."
    caption_prompt: str = "a photo of"


@dataclass(frozen=True)
class PromptBankSettings:
    """How the LLM fills the prompt bank and how prompts are curated."""

    endpoint: str | None = None  # OpenAI-compatible base URL (vLLM, Ollama, hosted); None = local LLM
    endpoint_model: str = ""  # model name sent to the endpoint
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key
    scenes_per_type: int = 8  # background scenes asked for per product type
    targets_per_type: int = 4  # target generation prompts asked for per product type
    max_new_tokens: int = 200
    temperature: float = 0.8
    min_words: int = 3
    max_words: int = 40
    duplicate_similarity: float = 0.9  # MiniLM cosine at or above which a prompt is a near-duplicate
    min_type_similarity: float = 0.15  # MiniLM cosine to the product type below which a scene is implausible
    auto_approve: bool = True  # prompts passing every check start approved; False = pending review
    known_types: tuple[str, ...] = ()  # zero-shot vocabulary beyond the seed bank's and the catalog's types
    # An unattended run guarantees these many approved prompts per type: the seed bank first, then
    # the LLM asked again (new seeds) up to llm_rounds times, then the generic seed prompts.
    min_scenes: int = 8
    min_targets: int = 4
    llm_rounds: int = 3
    # Degenerate text: a content word used more often than this, or for texts of 8+ words fewer
    # distinct words than this share, or adjectives making up more than this share of the words.
    max_word_repeats: int = 2
    min_type_token_ratio: float = 0.5
    max_adjective_share: float = 0.6
    # Zero-shot classification says `unknown` below this mean CLIP cosine, or when the best type
    # leads the second by less than the margin (random or poor weights give low, flat scores).
    min_zero_shot_score: float = 0.2
    min_zero_shot_margin: float = 0.01
    # Typing from titles (etl/product_types.py): a title's head phrase is a synonym of a known type
    # at this MiniLM cosine or more, this far ahead of the next; a title decision below
    # min_title_score gives no type (the images decide, else `unknown`).
    min_title_similarity: float = 0.7
    min_title_margin: float = 0.08
    min_title_score: float = 0.5
    # Brands no prompt, scene or request may name, beyond the shipped list (etl/data/brands.toml)
    # and the catalog's `brand` attributes; matched in any case, plural or possessive.
    brands: tuple[str, ...] = ()
    allow_own_brand: bool = False  # a product's own `brand` attribute may appear in its own requested scenes


@dataclass(frozen=True)
class AugmentSettings:
    """Synthetic augmentation. Defaults suit the tiny models; real SD 1.5 wants 512 px, 30 steps."""

    resolution: int = 64  # longest side of generated images (multiple of 8)
    steps: int = 8
    guidance_scale: float = 5.0
    seed: int = 0
    novel_view_frames: int = 4  # frames per image-to-video clip
    novel_views_per_image: int = 2  # frames kept as new viewpoints (evenly spaced, first frame skipped)
    video_steps: int = 4
    outpaints_per_image: int = 2  # approved scenes painted behind each reference / novel view
    positives_per_negative: float = 2.0  # the paper's 2:1 positive:negative ratio, per product
    # Kinds off by default (AUGMENT_KINDS default_on False) are made for the product types listed
    # here, e.g. {mirror = ["mug", "bottle"]} for products whose mirror image is still faithful.
    kinds_for_types: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSettings:
    """Training-set filter, rare-token sweep and DreamBooth-style LoRA (paper 2.3-2.4, A.5).
    Defaults suit the tiny models; real SD 1.5: resolution 512, steps ~1000, rank 16-64."""

    # filter
    iou_threshold: float = 0.5  # outpaints whose product mask IoU with the source is below: dropped
    # Synthetic positives scoring below min_score_vs_references x the mean score of the product's
    # references are dropped (a scale-free bar: it rejects on tiny and real models alike), and
    # below min_score when that is set.
    min_score_vs_references: float = 0.75
    min_score: float | None = None
    # Top K synthetic positives kept per kind, each kind ranked among its own (references always
    # kept): novel views score CLIP-T against their caption, outpaints against their scene prompt.
    # A kind left out keeps its row's default quota (AUGMENT_KINDS).
    positives_per_kind: dict = field(default_factory=lambda: {k.name: k.quota for k in AUGMENT_KINDS.values()
                                                              if k.positive})
    score_weights: dict = field(default_factory=lambda: {"clip_i": 1.0, "seg_clip_i": 1.0, "clip_t": 1.0})
    # rare-token sweep
    token_candidates: int = 3  # tokens tried per product in the sweep (1 = no sweep)
    sweep_steps: int = 10  # steps of each sweep run
    # LoRA (diffusers' reference trainers' practice; `profile` presets real-weight values)
    rank: int = 4
    alpha: int | None = None  # None = rank (update scale alpha/rank = 1 at every rank)
    target_modules: tuple[str, ...] | None = None  # None: the base family's (udfs/diffusion.py Family.lora_targets)
    learning_rate: float = 1e-3
    lr_scheduler: str = "constant"  # any of diffusers' get_scheduler: constant, linear, cosine, ...
    lr_warmup_steps: int = 0
    steps: int = 30  # optimizer steps
    batch_size: int = 2
    gradient_accumulation_steps: int = 1  # micro-batches of batch_size per optimizer step
    max_grad_norm: float = 1.0  # gradient clipping; 0 = off
    resolution: int = 64  # long side resized to this, short side padded (aspect kept)
    mixed_precision: str = "auto"  # auto: bf16 on CUDA (fp16 without bf16), fp32 on CPU; bf16, fp16, no
    gradient_checkpointing: bool | None = None  # None: on from resolution 768
    vae_batch_size: int = 4  # images per VAE encode when caching latents
    sample_latents: bool = False  # draw latents from the VAE posterior each step (default: its mean)
    train_text_encoder: bool = False  # LoRA on the text encoder(s) too
    # Flow-matching families (FLUX.2 [klein]) only, with diffusers' flow trainers' defaults: the
    # timestep density (none = uniform, logit_normal, mode; cosmap weights the loss) and the
    # guidance embedding's value where the transformer has one.
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5
    checkpoint_every: int = 10
    checkpoints_keep: int = 1  # newest checkpoints kept while training; all deleted once registered
    validate_every: int = 15
    validation_images: int = 2
    seed: int = 0
    experiment: str = "recontext"  # MLflow experiment
    # A product's first adapter in each arm (ours, the baseline) becomes @champion at once
    # (unattended pipelines, tests); by default people review candidates and `recontext promote`
    # one. One rule for every arm, so no arm's champion is picked differently.
    auto_promote: bool = False
    # Products trained (and generated) at once, one Spark task each (training/fanout.py); unset =
    # one per GPU this process sees, 1 without GPUs. Not part of the config hash.
    parallel_products: int | None = None


@dataclass(frozen=True)
class BaselineSettings:
    """The baseline arm, the paper's "DreamBooth + LoRA (Rank=64)": standard DreamBooth on the
    reference photos with the prior-preservation loss (class images the base model makes from
    "a photo of a <class>"). Its own rank, steps and learning rate; the rest (resolution, batch,
    precision, checkpoints) follows [training]. Defaults suit the tiny models; with real SD 1.5
    weights DreamBooth uses ~100-200 class images, ~400-1,000 steps and lr 1e-4."""

    rank: int = 64
    alpha: int | None = None  # None = rank
    steps: int = 30
    learning_rate: float = 1e-3
    prior_preservation: bool = True
    class_images: int = 4
    prior_loss_weight: float = 1.0


@dataclass(frozen=True)
class GenerationSettings:
    """Generation with the champion adapters, and post-finetuning ranking (paper 2.5)."""

    prompts_per_product: int = 4  # approved target prompts used per product (in prompt_id order)
    seeds_per_prompt: int = 2
    steps: int = 8  # 30 with real weights
    guidance_scale: float = 5.0
    resolution: int = 64  # 512 with real weights
    batch_size: int = 4  # prompts per pipeline call
    fuse_lora: str = "auto"  # fold the adapter into the weights: auto (on CUDA), on, off
    seed: int = 0
    rank_weights: dict = field(default_factory=lambda: {"clip_t": 1.0, "clip_i": 1.0, "dino_i": 1.0})
    min_score: float = -3.0  # generations whose aggregate is below are not kept
    keep_top: int = 4  # top N kept per product
    # "sum" (the weights above) or "learned": the pass probability of the learned ranker
    # (`recontext evaluate` fits it on human ratings), with its own threshold.
    rank_aggregate: str = "sum"
    min_pass_probability: float = 0.0


@dataclass(frozen=True)
class EvaluationSettings:
    """Automatic and human evaluation, ours against the baseline arm (paper 3, appendix A.3)."""

    baseline: bool = True  # train and generate the plain DreamBooth + LoRA baseline arm
    # The zero-shot arm: no training, the base family's reference pipeline (FLUX.2 [klein]) given
    # the product's `zero_shot_references` best reference photos (largest first) and the scene prompt.
    zero_shot: bool = False
    zero_shot_references: int = 3
    raters_per_image: int = 3  # an image's verdict needs this many raters
    # "all_questions" (the paper: a rater passes an image when all 8 answers are yes; the image
    # passes when a majority of its raters pass it) or "per_question" (every question has a yes
    # from a majority of raters).
    pass_rule: str = "all_questions"
    ranker_min_images: int = 20  # rated images needed before the learned ranker is fit
    ranker_folds: int = 5  # held-out evaluation: folds grouped by product


# Presets for real weights (`profile = "sd15"`, `"sdxl"` or `"flux2-klein"` in config.toml); any key set in the
# file wins over its preset. Training follows the paper's appendix A.5 (rank 64 for ~1,800 steps;
# rank 1 needs ~700) and diffusers' DreamBooth LoRA examples (lr 1e-4, constant schedule).
PROFILES: dict[str, dict[str, dict]] = {
    "sd15": {
        "augment": {"resolution": 512, "steps": 30, "guidance_scale": 7.5, "video_steps": 25},
        "training": {"resolution": 512, "rank": 64, "steps": 1800, "learning_rate": 1e-4, "batch_size": 4,
                     "sweep_steps": 200, "checkpoint_every": 250, "validate_every": 500, "validation_images": 4},
        "baseline": {"rank": 64, "steps": 1000, "learning_rate": 1e-4, "class_images": 100},
        "generation": {"resolution": 512, "steps": 30, "guidance_scale": 7.5, "batch_size": 8},
    },
    "sdxl": {
        "augment": {"resolution": 1024, "steps": 30, "guidance_scale": 5.0, "video_steps": 25},
        "training": {"resolution": 1024, "rank": 64, "steps": 1800, "learning_rate": 1e-4, "batch_size": 1,
                     "gradient_accumulation_steps": 4, "sweep_steps": 200, "checkpoint_every": 250,
                     "validate_every": 500, "validation_images": 4},
        "baseline": {"rank": 64, "steps": 1000, "learning_rate": 1e-4, "class_images": 100},
        "generation": {"resolution": 1024, "steps": 30, "guidance_scale": 5.0, "batch_size": 4},
    },
    # FLUX.2 [klein] base (undistilled): the pipeline's defaults (50 steps, guidance 4.0) and
    # diffusers' klein DreamBooth LoRA README (1024 px, lr 1e-4, batch 1 x 4 accumulated).
    "flux2-klein": {
        "augment": {"resolution": 1024, "steps": 50, "guidance_scale": 4.0, "video_steps": 25},
        "training": {"resolution": 1024, "rank": 16, "steps": 1800, "learning_rate": 1e-4, "batch_size": 1,
                     "gradient_accumulation_steps": 4, "sweep_steps": 200, "checkpoint_every": 250,
                     "validate_every": 500, "validation_images": 4},
        "baseline": {"rank": 64, "steps": 1000, "learning_rate": 1e-4, "class_images": 100},
        "generation": {"resolution": 1024, "steps": 50, "guidance_scale": 4.0, "batch_size": 4},
    },
}


def _with_profile(values: dict, origin: str) -> dict:
    """The profile's presets under the file's own values (a section's keys merge, the file wins)."""
    name = values.pop("profile", None)
    if name is None:
        return values
    if name not in PROFILES:
        raise ValueError(f"unknown profile '{name}' in {origin}; profiles: {', '.join(PROFILES)}")
    merged = {section: dict(preset) for section, preset in PROFILES[name].items()}
    for key, value in values.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


@dataclass(frozen=True)
class Settings:
    home: Path
    spark_remote: str | None = None  # a Spark Connect URL; None = embedded Sail engine
    arrow_batch_rows: int = 256  # rows per Arrow batch into pandas UDFs (rows carry image bytes)
    retention_hours: int = 168  # `recontext maintain` keeps table files that versions this recent need
    ingest: IngestSettings = field(default_factory=IngestSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    prompt_bank: PromptBankSettings = field(default_factory=PromptBankSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    baseline: BaselineSettings = field(default_factory=BaselineSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    @property
    def lakehouse(self) -> Path:
        return self.home / "lakehouse"

    @classmethod
    def load(cls, home: str | Path | None = None, **overrides) -> "Settings":
        home = Path(home or os.environ.get("RECONTEXT_HOME") or DEFAULT_HOME).expanduser().resolve()
        values: dict = {}
        config_file = home / "config.toml"
        if config_file.exists():
            values = tomllib.loads(config_file.read_text())
        if os.environ.get("SPARK_REMOTE"):
            values["spark_remote"] = os.environ["SPARK_REMOTE"]
        values.update(overrides)
        values = _with_profile(values, str(config_file))
        settings = cls(home=home, **_build(cls, values, str(config_file)))
        validate(settings, str(config_file))
        return settings


# Every enumerated setting and its allowed values, checked when settings load (a wrong value fails
# there, not later on a worker). Keys of dict settings that name vocabulary entries are checked
# against them too (KEYED_BY).
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("models", "tiny_family"): ("sd", "sdxl", "flux2-klein"),  # udfs/diffusion.py FAMILIES (a test holds them equal)
    ("models", "segmenter"): ("u2netp", "sam"),
    ("models", "sam_variant"): ("tiny", "vit_h", "vit_l", "vit_b"),
    ("models", "u2netp_runtime"): ("auto", "torch", "onnxruntime"),
    # diffusers.optimization.SchedulerType (tests/training/test_training_settings.py checks the list)
    ("training", "lr_scheduler"): ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                   "constant_with_warmup", "piecewise_constant"),
    ("training", "mixed_precision"): ("auto", "bf16", "fp16", "no"),
    ("generation", "fuse_lora"): ("auto", "on", "off"),
    ("generation", "rank_aggregate"): ("sum", "learned"),
    ("evaluation", "pass_rule"): ("all_questions", "per_question"),
}
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # models.device: what torch.device takes here


# Dict settings whose keys are vocabulary entries: metric names and augmentation kinds.
KEYED_BY: dict[tuple[str, str], tuple[str, ...]] = {
    ("training", "score_weights"): METRIC_COLUMNS, ("generation", "rank_weights"): METRIC_COLUMNS,
    ("training", "positives_per_kind"): AUGMENTED_POSITIVES, ("augment", "kinds_for_types"): tuple(AUGMENT_KINDS)}


def validate(settings: "Settings", origin: str) -> None:
    """Refuse enumerated values outside their allowed values, naming them."""
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(settings, section), key)
        if value not in allowed:
            raise ValueError(f"{section}.{key} = {value!r} in {origin} is not one of: {', '.join(allowed)}")
    for (section, key), allowed in KEYED_BY.items():
        unknown = sorted(set(getattr(getattr(settings, section), key)) - set(allowed))
        if unknown:
            raise ValueError(f"{section}.{key} names {', '.join(map(repr, unknown))} in {origin}; "
                             f"allowed keys: {', '.join(allowed)}")
    if not DEVICE.fullmatch(str(settings.models.device)):
        raise ValueError(f"models.device = {settings.models.device!r} in {origin} is not one of: auto, cpu, mps, "
                         "cuda, cuda:<index>")


def _build(cls, values: dict, origin: str) -> dict:
    """Turn nested dicts from TOML into the nested dataclasses, rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in fields or key == "home":
            raise ValueError(f"unknown setting '{key}' in {origin}; known: {sorted(set(fields) - {'home'})}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if isinstance(value, dict) and dataclasses.is_dataclass(sub):  # a section (not a dict setting)
            value = sub(**_build(sub, value, f"{origin} [{key}]"))
        out[key] = value
    return out
