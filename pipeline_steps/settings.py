"""The typed shape of params.yaml: every knob, its type, its range and its accepted values.

`validate(params)` runs when params are loaded (pipeline_steps.config.load_params, and again
after a stage's `--set` overrides in flows.common.load_params), so a mistyped key, a wrong
type or an out-of-range value stops the stage before any work, with the key's dotted path
and what it accepts. Every field is required: a knob missing from params.yaml is an error
here, not a default hidden in code (the one exception, `train.<model>.label_smoothing`,
is an explicit per-model override of `train.label_smoothing`).

The models mirror params.yaml section by section; accepted values repeat the constants
the code checks (e.g. training_loop.LR_SCHEDULES) because importing those modules would pull
torch into every stage: tests/test_settings.py checks that both lists agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from pipeline_steps.errors import ConfigError
from pipeline_steps.model_kinds import INDEX_KINDS

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Port = Annotated[int, Field(ge=0, le=65535)]
Auto = Literal["auto"]

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
             "resnet18", "resnet34", "resnet50", "efficientnet_b0", "mobilenet_v3_small")
AUGMENTATIONS = ("random_resized_crop", "horizontal_flip", "vertical_flip", "color_jitter",
                 "rotation", "grayscale", "trivial_augment", "random_erasing")
RANKING_FUSIONS = ("dense", "blend", "rrf")


class Section(BaseModel):
    """A params.yaml mapping: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data and sample

class DataSettings(Section):
    raw_dir: str
    validated_dir: str
    clean_dir: str


class QuirkSettings(Section):
    duplicate_listing: Fraction
    empty_description: Fraction
    bad_price: Fraction
    carriage_return: Fraction
    category_without_separator: Fraction
    no_image: Fraction
    odd_image_mode: Fraction


class SampleSettings(Section):
    seed: NonNegativeInt
    n_products: PositiveInt
    max_images_per_product: NonNegativeInt
    image_size_min: PositiveInt
    image_size_max: PositiveInt
    quirks: QuirkSettings
    label_noise: Fraction

    @model_validator(mode="after")
    def _sizes_ordered(self) -> SampleSettings:
        if self.image_size_min > self.image_size_max:
            raise ValueError(f"image_size_min ({self.image_size_min}) is above image_size_max ({self.image_size_max})")
        return self


# --------------------------------------------------------------------------- validation and cleaning

TextColumn = Literal["id", "product_name", "product_description", "category", "location", "price"]


class TextMaxChars(Section):
    id: PositiveInt
    product_name: PositiveInt
    product_description: PositiveInt
    category: PositiveInt
    location: PositiveInt
    price: PositiveInt


class TextHygieneSettings(Section):
    control_chars: Literal["strip", "reject"]
    invalid_unicode: Literal["strip", "reject"]
    invisible_in_names: Literal["strip", "reject"]
    max_chars: TextMaxChars
    truncate: list[TextColumn]


class ValidationSettings(Section):
    max_reject_fraction: Fraction
    min_image_side: PositiveInt
    max_image_side: PositiveInt
    max_image_pixels: PositiveInt
    allowed_image_modes: list[str] = Field(min_length=1)
    location_requires_county: StrictBool
    data_docs_dir: str
    clean_data_docs_dir: str
    text: TextHygieneSettings


class PriceOutlierSettings(Section):
    max_price: NonNegativeFloat
    min_price: NonNegativeFloat


class CleaningTextSettings(Section):
    strip_gumtree_suffix: StrictBool


class SplitSettings(Section):
    seed: NonNegativeInt
    val_fraction: Fraction
    test_fraction: Fraction

    @model_validator(mode="after")
    def _room_for_training(self) -> SplitSettings:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave rows for training (sum below 1)")
        return self


class CleaningSettings(Section):
    image_size: PositiveInt
    pad_colour: Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=3)]
    min_products_per_class: PositiveInt
    dedupe_subset: list[str] = Field(min_length=1)
    price_outlier: PriceOutlierSettings
    text: CleaningTextSettings
    num_workers: PositiveInt | Auto
    split: SplitSettings


# --------------------------------------------------------------------------- training

class NeighbourSettings(Section):
    """`train.image.neighbours`: the vote of the nearest train photos (pipeline_steps/photo_neighbours.py)."""

    k: PositiveInt
    temperature: PositiveFloat
    smoothing: Annotated[float, Field(gt=0.0, le=1.0)]
    weight: NonNegativeFloat


class ImageTrainSettings(Section):
    backbone: Literal[BACKBONES]  # type: ignore[valid-type]
    weights: str | None
    input_size: PositiveInt | None
    mode: Literal["auto", "frozen", "tail", "fine_tune"]
    tail_blocks: NonNegativeInt
    backbone_lr: PositiveFloat
    trainable_blocks: PositiveInt | Literal["all"]
    freeze_backbone: Auto | StrictBool
    features_dir: str
    search_embedding: Literal["auto", "backbone", "head"]
    product_pooling: Literal["mean_log", "mean"]
    neighbours: NeighbourSettings
    augmentation: list[Literal[AUGMENTATIONS]] | None  # type: ignore[valid-type]
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    weight_decay: NonNegativeFloat
    embedding_dim: PositiveInt
    dropout: Probability
    feature_dropout: Probability
    label_smoothing: Probability | None = None  # None: train.label_smoothing


class WideSettings(Section):
    """The TF-IDF ("wide") branch's knobs, shared by the text and multimodal models (the multimodal
    model's vectoriser settings apply when its text tower has no wide branch to reuse)."""

    wide: StrictBool
    wide_max_features: PositiveInt
    wide_char_ngram_range: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]
    wide_title: StrictBool
    wide_lr: PositiveFloat
    wide_weight_decay: NonNegativeFloat
    wide_dropout: Probability


class TextTrainSettings(WideSettings):
    encoder: str
    max_length: PositiveInt
    fine_tune: StrictBool
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    encoder_lr: PositiveFloat
    weight_decay: NonNegativeFloat
    hidden_dim: PositiveInt
    dropout: Probability
    label_smoothing: Probability | None = None  # None: train.label_smoothing


class MultimodalTrainSettings(WideSettings):
    image_pooling: Literal["mean", "max"]
    fusion: Literal["concat", "residual"]
    image_input: Literal["backbone", "head"]
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    weight_decay: NonNegativeFloat
    hidden_dim: PositiveInt
    modality_dropout: Probability
    dropout: Probability
    fine_tune_towers: StrictBool
    tower_lr: PositiveFloat
    wide_init: Literal["tower", "zero"]
    photo_calibration: Literal["none", "val"]  # issue 9: photo weight per class fitted on val
    label_smoothing: Probability | None = None  # None: train.label_smoothing


class BaselineSettings(Section):
    tfidf_max_features: PositiveInt
    logreg_c: PositiveFloat
    char_ngrams: StrictBool
    char_ngram_range: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]
    title_ngrams: StrictBool
    sublinear_tf: StrictBool
    max_iter: PositiveInt
    pixel_size: PositiveInt
    pixel_logreg_c: PositiveFloat
    price_alpha: NonNegativeFloat


class DistributedTrainSettings(Section):
    nproc: PositiveInt  # > 1: torchrun + DistributedDataParallel (pipeline_steps/ddp_worker.py)
    lr_scaling: Literal["linear", "sqrt", "none"]  # training_loop.LR_SCALINGS


class TrainSettings(Section):
    seed: NonNegativeInt
    device: Literal["auto", "cpu", "cuda"]
    mixed_precision: StrictBool
    num_workers: NonNegativeInt
    num_threads: PositiveInt | None
    lr_schedule: Literal["onecycle", "cosine"]
    early_stopping_patience: PositiveInt
    grad_clip: NonNegativeFloat
    label_smoothing: Probability
    models_dir: str
    checkpoints_dir: str
    distributed: DistributedTrainSettings
    image: ImageTrainSettings
    text: TextTrainSettings
    multimodal: MultimodalTrainSettings
    baselines: BaselineSettings


# --------------------------------------------------------------------------- evaluate, registry

class EvaluateSettings(Section):
    metrics_dir: str
    plots_dir: str


class PromotionSettings(Section):
    classifier_metric: str
    price_metric: str
    classifier_min_improvement: NonNegativeFloat
    price_min_improvement: NonNegativeFloat


class RegistrySettings(Section):
    tracking_uri: str = Field(min_length=1)
    artifact_root: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    model_prefix: str = Field(min_length=1)
    champion_alias: str = Field(min_length=1)
    challenger_alias: str = Field(min_length=1)
    summary_file: str
    promotion: PromotionSettings


# --------------------------------------------------------------------------- index and ranking

class LexicalSettings(Section):
    k1: NonNegativeFloat
    b: Fraction
    title_weight: NonNegativeInt
    min_df: PositiveInt


class RankingSettings(Section):
    fusion: Literal["auto", "dense", "blend", "rrf"]
    fusion_grid: list[Literal[RANKING_FUSIONS]] = Field(min_length=1)  # type: ignore[valid-type]
    lexical_weight: Auto | Fraction
    lexical_weight_grid: list[Fraction] = Field(min_length=1)
    category_weight: Auto | NonNegativeFloat
    category_weight_grid: list[NonNegativeFloat] = Field(min_length=1)
    neighbour_weight: Auto | NonNegativeFloat
    neighbour_weight_grid: list[NonNegativeFloat] = Field(min_length=1)
    neighbour_k: PositiveInt
    similar_photo_weight: Auto | Fraction
    similar_photo_weight_grid: list[Fraction] = Field(min_length=1)
    n_candidates: PositiveInt
    rrf_k: PositiveInt
    fit_metric: Annotated[str, Field(pattern=r"^(ndcg|precision)@[1-9][0-9]*$")]


class IndexSettings(Section):
    dir: str
    champions_dir: str
    embeddings_dir: str
    kinds: list[Literal[INDEX_KINDS]] = Field(min_length=1)  # type: ignore[valid-type]
    factory: str = Field(min_length=1)
    nprobe: PositiveInt
    ef_search: PositiveInt
    ef_construction: PositiveInt
    batch_size: PositiveInt
    use_gpu: Auto | StrictBool
    eval_k: list[PositiveInt] = Field(min_length=1)
    lexical: LexicalSettings
    ranking: RankingSettings


# --------------------------------------------------------------------------- serving, team, scale-out

class ServeSettings(Section):
    bundle_dir: str
    package_file: str
    bento_name: str = Field(min_length=1)
    bundle_model: str = Field(min_length=1)
    max_k: PositiveInt
    max_image_bytes: PositiveInt
    max_image_pixels: PositiveInt
    max_text_chars: PositiveInt
    model_text_chars: PositiveInt
    batch_max_size: PositiveInt
    batch_max_latency_ms: PositiveInt
    torch_threads: Auto | PositiveInt


class TeamPostgresSettings(Section):
    port: Port
    os_user: str
    mlflow_database: str
    prefect_database: str


class TeamMlflowSettings(Section):
    port: Port
    workers: PositiveInt
    artifacts_destination: str


class TeamPrefectSettings(Section):
    port: Port


class TeamSettings(Section):
    dir: str
    postgres: TeamPostgresSettings
    mlflow: TeamMlflowSettings
    prefect: TeamPrefectSettings
    work_pool: str
    work_pool_type: str
    deployment_stages: list[str] = Field(min_length=1)
    lock_database_url: str | None
    lock_timeout_s: PositiveFloat
    lock_lease_s: PositiveFloat


class DistributedSettings(Section):
    index_on_dask: StrictBool
    dask_address: str | None
    n_workers: PositiveInt
    threads_per_worker: PositiveInt
    dashboard_address: str | None
    shard_size: PositiveInt
    index_train_points: PositiveInt
    work_dir: str


class Settings(Section):
    """All of params.yaml."""

    data: DataSettings
    sample: SampleSettings
    validation: ValidationSettings
    cleaning: CleaningSettings
    train: TrainSettings
    evaluate: EvaluateSettings
    registry: RegistrySettings
    index: IndexSettings
    serve: ServeSettings
    team: TeamSettings
    distributed: DistributedSettings


_UNION_MEMBER_LABELS = {"int", "float", "str", "bool", "none", "list", "constrained-int", "constrained-float"}


def _key(loc: tuple[Any, ...]) -> str:
    """The dotted params key of a pydantic error location (union member labels dropped)."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_MEMBER_LABELS))]
    return ".".join(parts) or "<top level>"


def _describe(key: str, errors: list[Mapping[str, Any]]) -> str:
    """One line per key: what is wrong and what is accepted (a union's members joined by 'or')."""
    kind = errors[0]["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}' (a typo? every accepted key is declared in pipeline_steps/settings.py)"
    if kind == "missing":
        return f"key '{key}' is missing (every knob has to be in params.yaml; see pipeline_steps/settings.py)"
    messages = list(dict.fromkeys(str(e["msg"]).removeprefix("Value error, ") for e in errors))
    return f"key '{key}' is {errors[0].get('input')!r}: " + "; or ".join(messages)


def _problems(error: ValidationError, prefix: str = "") -> str:
    """Every offending key of a ValidationError, one per line."""
    by_key: dict[str, list[Mapping[str, Any]]] = {}
    for item in error.errors():
        key = _key(item["loc"])
        by_key.setdefault(f"{prefix}.{key}" if prefix and key != "<top level>" else (prefix or key), []).append(item)
    return "\n  ".join(_describe(key, errors) for key, errors in by_key.items())


def validate(params: Mapping[str, Any], source: str = "params.yaml") -> Settings:
    """Check a whole params mapping against the schema.

    Args:
        params: the parsed params.yaml (after any `--set` overrides).
        source: the file's name, for the message.

    Returns:
        The typed settings.

    Raises:
        ConfigError: naming every offending key with what it accepts (one per line).
    """
    try:
        return Settings.model_validate(dict(params))
    except ValidationError as error:
        raise ConfigError(f"{source} is not valid:\n  {_problems(error)}") from None


SectionT = TypeVar("SectionT", bound=Section)


def section(model: type[SectionT], values: Mapping[str, Any], key: str) -> SectionT:
    """One section of params.yaml as typed settings (for a step given only its own section).

    Args:
        model: the section's class, e.g. RankingSettings.
        values: the section's mapping, e.g. params["index"]["ranking"].
        key: its dotted path in params.yaml, for the message, e.g. "index.ranking".

    Raises:
        ConfigError: naming every offending key under `key`.
    """
    try:
        return model.model_validate(dict(values))
    except ValidationError as error:
        raise ConfigError(f"params.yaml section '{key}' is not valid:\n  {_problems(error, key)}") from None
