"""What a neural model has to say to be trained (`Recipe`), and the one function that trains any recipe.

Why: the image, text and multimodal models were trained by three copies of one sequence
(read the clean data, check its splits, seed, build, fingerprint, fit, write the model
directory). `run_recipe` is that sequence, once; a recipe (pipeline_steps/recipe_*.py) only
says what differs: how its model is built, what trains and with which AdamW groups, its
datasets, what follows the fit, and its keys of config.json.

Frozen parts (a frozen image backbone, text encoder or towers) are run once over the data by
the recipe's `datasets`, and only the head trains on the stored vectors: the same result as
running the frozen part every epoch, many times faster.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from pipeline_steps import datasets as ds
from pipeline_steps.errors import DataValidationError
from pipeline_steps.model_dir import TrainResult, base_config, save_model_dir, train_result
from pipeline_steps.train_params import model_params
from pipeline_steps.training_loop import (
    EpochCallback,
    LoopSettings,
    deterministic,
    fit,
    lr_scale,
    main_rank_first,
    ranks,
    run_fingerprint,
    seed_everything,
)

#: an AdamW parameter group: {"params": [...], "lr": float, "weight_decay": float}
ParamGroup = dict[str, Any]


def param_group(parameters: Any, lr: float, weight_decay: float) -> ParamGroup:
    """One AdamW group (the loop drops the parameters that do not require grad)."""
    return {"params": list(parameters), "lr": lr, "weight_decay": weight_decay}


class Recipe(ABC):
    """One neural model's training, minus the sequence `run_recipe` runs for every model.

    A subclass sets `kind`, `examples` and `table`, and reads and checks all of its knobs in
    `__init__` (before any data is read), `settings` (`loop_settings`) among them. `run_recipe` then calls, in this order: `labels`, `load`,
    (seed) `build`, `data_identity`, `trainable`, `datasets`, (fit) `after_fit`,
    `saved_config`, `saved_files`.
    """

    kind: str
    examples: str  # what one example is, for messages: "photos" or "products"
    table: str  # the clean table holding the examples (clean_schema.IMAGES_FILE / PRODUCTS_FILE)
    settings: LoopSettings
    tokenizer: Any = None  # returned in TrainResult by text-based models

    def __init__(self, train_params: Mapping[str, Any], progress: bool = True) -> None:
        """Keep the model's flat params; the subclass then checks its knobs.

        Args:
            train_params: params.yaml's `train:` section (or the whole params).
            progress: show progress bars.

        Raises:
            ConfigError: there is no `train.<kind>` section (the subclass: a knob is missing or
                wrong, naming its key).
        """
        self.params: dict[str, Any] = model_params(train_params, self.kind)  # saved in config.json
        self.train_params = train_params  # train.distributed, read by run_recipe under torchrun
        self.progress = progress

    @abstractmethod
    def labels(self, data: ds.CleanData, split: str) -> list[int]:
        """The labels of `split`'s examples (checked before anything is built)."""

    def load(self, data: ds.CleanData) -> None:
        """Load what the model is built from (a pretrained encoder, trained towers); not seeded."""

    @abstractmethod
    def build(self, data: ds.CleanData) -> nn.Module:
        """The whole model that is saved (seeded: random initialisations happen here)."""

    @abstractmethod
    def data_identity(self, data: ds.CleanData) -> list[Any]:
        """What identifies the training data in the checkpoint fingerprint (resume refuses a mismatch)."""

    @abstractmethod
    def trainable(self) -> tuple[nn.Module, list[ParamGroup]]:
        """The module `fit` trains (the model, or its head over stored features) and its AdamW groups;
        freezes what does not train."""

    @abstractmethod
    def datasets(self, data: ds.CleanData, settings: LoopSettings) -> tuple[Dataset, Dataset, Callable]:
        """(train set, val set, collate) for the module `trainable` returned."""

    def after_fit(self, data: ds.CleanData, settings: LoopSettings, trained: nn.Module, val_set: Dataset) -> None:
        """Whatever is fitted or chosen once training is over (default: nothing)."""

    @abstractmethod
    def saved_config(self, data: ds.CleanData) -> dict[str, Any]:
        """The model's own config.json keys (added to `model_dir.base_config`)."""

    def saved_files(self) -> dict[str, Any]:
        """`save_model_dir`'s extra files: `encoder_files` and/or `wide` (default: none)."""
        return {}


def check_splits(labels_by_split: Mapping[str, Sequence[int]], classes: Sequence[str], what: str, source: Path) -> None:
    """Training needs a non-empty train and val split, and every class in train.

    Args:
        labels_by_split: split -> the labels of its examples.
        classes: the class names in label-code order.
        what: what an example is ("photos", "products"), for the message.
        source: the clean table they come from, for the message.

    Raises:
        DataValidationError: a split is empty or a class has no train example.
    """
    for split in ("train", "val"):
        if len(labels_by_split.get(split, [])) == 0:
            raise DataValidationError(f"{source}: split '{split}' has no {what}; training needs train and val examples")
    present = set(int(label) for label in labels_by_split["train"])
    missing = [name for index, name in enumerate(classes) if index not in present]
    if missing:
        raise DataValidationError(
            f"{source}: class(es) {missing} have no {what} in the train split, so the model could never "
            "predict them; fix the split (cleaning.split) or the class list (cleaning.min_products_per_class)"
        )


def run_recipe(
    recipe: Recipe,
    clean_dir: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Train `recipe`'s model on the clean data and save it as a model directory.

    Args:
        recipe: the model's recipe, its knobs already read and checked.
        clean_dir: the clean layer (`data.clean_dir`).
        out_dir: the model directory to write (atomically).
        resume: continue from the model's checkpoint when it matches this run.
        on_epoch_end: called with (epoch, metrics) after each epoch (the flow logs to MLflow).

    Under torch.distributed (pipeline_steps/ddp_worker.py under torchrun) every rank runs this with the
    same arguments: rank 0 computes the recipe's datasets first (filling the feature caches the others
    then read), `fit` trains data-parallel, and only rank 0 runs `after_fit` and writes `out_dir`; the
    other ranks return the fit's result with the base config and write nothing.

    Returns:
        The model directory, the history and the trained model.

    Raises:
        DataValidationError: the clean data cannot train the model (an empty split, a class without train examples).
        PipelineError: `resume` found a checkpoint of other params or data.
    """
    here = ranks()
    data = ds.load_clean(clean_dir)
    check_splits({s: recipe.labels(data, s) for s in ("train", "val")}, data.classes, recipe.examples, data.clean_dir / recipe.table)
    recipe.load(data)
    settings = replace(recipe.settings, lr_scale=lr_scale(recipe.train_params, here.world))
    seed_everything(settings.seed)
    with deterministic(settings.num_threads):
        model = recipe.build(data)
        settings = replace(settings, fingerprint=run_fingerprint(recipe.kind, recipe.params, recipe.data_identity(data), here.world, settings.lr_scale))
        trained, groups = recipe.trainable()
        with main_rank_first():
            train_set, val_set, collate = recipe.datasets(data, settings)
        outcome = fit(trained, groups, train_set, val_set, collate, settings, resume, on_epoch_end)
        if here.main:
            recipe.after_fit(data, settings, trained, val_set)

    config = base_config(recipe.kind, data.classes, recipe.params, outcome, settings.device)
    if here.world > 1:
        config["training"].update(processes=here.world, lr_scale=settings.lr_scale)  # DistributedDataParallel (train.distributed)
    if not here.main:
        return train_result(recipe.kind, Path(out_dir), outcome, settings.device, config, model.cpu(), recipe.tokenizer)
    config.update(recipe.saved_config(data))
    model.cpu().eval()
    save_model_dir(out_dir, config, model, outcome.history, **recipe.saved_files())
    return train_result(recipe.kind, Path(out_dir), outcome, settings.device, config, model, recipe.tokenizer)
