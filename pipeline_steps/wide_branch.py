"""The wide (TF-IDF) branch's knobs, AdamW group and config.json record, shared by the text and multimodal recipes.

Why a module of its own: both models can add the same lexical branch (a TF-IDF bag ->
linear layer whose logits are added to the deep head's, models.WideLinear), read from
`train.<kind>.wide_*` with the same checks and recorded in config.json the same way.
The benchmarks train the branch alone with these settings too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from pipeline_steps import models
from pipeline_steps.config import require_choice
from pipeline_steps.errors import ConfigError
from pipeline_steps.train_params import checked_number, required_key


def wide_enabled(params: Mapping[str, Any], kind: str) -> bool:
    """`train.<kind>.wide`: true adds the TF-IDF branch, false trains the deep model only.

    Args:
        params: the model's flat params.
        kind: text or multimodal.

    Returns:
        Whether the model has a wide branch.

    Raises:
        ConfigError: the key is missing or not a boolean.
    """
    return bool(require_choice(required_key(params, "wide", f"train.{kind}.wide"), f"train.{kind}.wide", (True, False)))


def wide_settings(params: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The TF-IDF vectoriser settings of the wide branch, from `train.<kind>.wide_*` (checked).

    `wide_max_features`, `wide_char_ngram_range` and `wide_title` are params.yaml knobs; the word
    n-gram range, sublinear tf and the char min_df are fixed (models.WIDE_DEFAULTS).

    Args:
        params: the model's flat params.
        kind: text or multimodal.

    Returns:
        models.WideFeaturizer's settings.

    Raises:
        ConfigError: a `wide_*` key is missing or out of range, naming it.
    """
    settings = dict(models.WIDE_DEFAULTS)
    settings["max_features"] = checked_number(params, "wide_max_features", kind, minimum=1, integer=True)
    for key in ("char_ngram_range",):
        value = required_key(params, f"wide_{key}", f"train.{kind}.wide_{key}")
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            or value[0] > value[1]
        ):
            raise ConfigError(f"params.yaml key 'train.{kind}.wide_{key}' must be [low, high] with 1 <= low <= high, got {value!r}")
        settings[key] = [int(v) for v in value]
    settings["title"] = bool(require_choice(required_key(params, "wide_title", f"train.{kind}.wide_title"), f"train.{kind}.wide_title", (True, False)))
    return settings


def wide_optimizer_settings(params: Mapping[str, Any], kind: str) -> dict[str, float]:
    """AdamW lr / weight decay of the wide layer, and the dropout on its features.

    Args:
        params: the model's flat params (`wide_lr`, `wide_weight_decay`, `wide_dropout`).
        kind: text or multimodal.

    Returns:
        {"lr", "weight_decay", "dropout"}.
    """
    return {
        "lr": checked_number(params, "wide_lr", kind),
        "weight_decay": checked_number(params, "wide_weight_decay", kind),
        "dropout": checked_number(params, "wide_dropout", kind),
    }


def wide_param_groups(wide: nn.Module | None, wide_opt: Mapping[str, float] | None) -> list[dict[str, Any]]:
    """The wide layer's AdamW group (its own lr and weight decay), or none without a wide layer."""
    if wide is None or not wide_opt:
        return []
    return [{"params": list(wide.parameters()), "lr": wide_opt["lr"], "weight_decay": wide_opt["weight_decay"]}]


def wide_architecture(featurizer: models.WideFeaturizer | None, wide_opt: Mapping[str, float] | None, source: str) -> dict[str, Any] | None:
    """config.json's record of the wide branch (None: the model has none)."""
    if featurizer is None:
        return None
    return {
        **featurizer.to_config(),
        "dropout": float(wide_opt["dropout"]) if wide_opt else 0.0,
        "source": source,
        "logits": "added to the deep head's logits (0 for a row without text)",
    }

