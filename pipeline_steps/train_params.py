"""Reading one model's knobs out of params.yaml's `train:` section, naming the key when one is wrong.

Why a module of its own: the training loop (training_loop.py) and every model recipe
(recipe_*.py) read their knobs the same way, and a wrong or missing value must fail with
the params.yaml key spelled out (`train.image.epochs`, `train.grad_clip`) before any data
is read. pipeline_steps/settings.py checks the file at load; these checks name the key for
a hand-built dict (tests, benchmarks). No defaults here: every knob is in params.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline_steps.errors import ConfigError

#: keys of `train:` itself (not of `train.<kind>`), so their messages say `train.<key>`.
SHARED_NUMBERS = ("seed", "early_stopping_patience", "num_workers", "num_threads", "grad_clip", "label_smoothing")


def model_params(train_params: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Flatten `train:` for one model: the shared scalars + the `train.<kind>` section.

    Args:
        train_params: the `train:` section itself or the whole params dict.
        kind: image, text or multimodal.

    Returns:
        One flat dict; a key of `train.<kind>` wins over the shared one, except
        `train.<kind>.label_smoothing: null` (the schema's default), which means "use
        train.label_smoothing".

    Raises:
        ConfigError: there is no `train.<kind>` section.
    """
    train = train_params["train"] if isinstance(train_params.get("train"), Mapping) else train_params
    if not isinstance(train.get(kind), Mapping):
        raise ConfigError(f"params.yaml has no section 'train.{kind}'")
    shared = {key: value for key, value in train.items() if not isinstance(value, Mapping)}
    section = {key: value for key, value in train[kind].items() if not (key == "label_smoothing" and value is None)}
    return {**shared, **section}


def required_key(params: Mapping[str, Any], key: str, full_key: str) -> Any:
    """`params[key]`, or a ConfigError naming the params.yaml key `full_key`.

    Raises:
        ConfigError: `key` is missing (every knob has to be in params.yaml).
    """
    if key not in params:
        raise ConfigError(f"params.yaml key '{full_key}' is missing (every knob has to be in params.yaml)")
    return params[key]


def checked_number(params: Mapping[str, Any], key: str, kind: str, minimum: float = 0, integer: bool = False) -> Any:
    """`params[key]` as a number >= `minimum` (an int when `integer`).

    Args:
        params: one model's flat params (`model_params`).
        key: the knob; a shared one (SHARED_NUMBERS) is named `train.<key>`, else `train.<kind>.<key>`.
        kind: the model, for the key's name.
        minimum: the smallest allowed value.
        integer: whether the value must be a whole number.

    Returns:
        The value as int or float.

    Raises:
        ConfigError: missing, not a number, below `minimum` or not whole when `integer`.
    """
    full_key = f"train.{key}" if key in SHARED_NUMBERS else f"train.{kind}.{key}"
    value = required_key(params, key, full_key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or (integer and int(value) != value):
        kind_of = "an integer" if integer else "a number"
        raise ConfigError(f"params.yaml key '{full_key}' must be {kind_of} >= {minimum}, got {value!r}")
    return int(value) if integer else float(value)
