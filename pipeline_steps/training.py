"""The three training entry points the train flow calls: one trained model directory each.

Each is one line over training_recipe.run_recipe (the sequence every neural model shares:
read the clean data, check its splits, seed, build, fit, save) with the model's recipe:

* recipe_image.py: the photo classifier (frozen or fine-tuned backbone, search vector choice);
* recipe_text.py: the text classifier (frozen or fine-tuned sentence encoder, + wide branch);
* recipe_multimodal.py: image + text from the trained towers (+ wide branch, photo calibration).

`train_model` is what the train stage calls: one process, or with `train.distributed.nproc` > 1
torchrun + DistributedDataParallel (pipeline_steps/ddp_worker.py), whose ranks run
`train_in_process` too, so 1 and N processes train through the same code.

The loop itself (device, mixed precision, schedules, early stopping, checkpoints/resume,
reproducibility, data parallelism) is training_loop.py; the model directory is model_dir.py (docs/ARCHITECTURE.md,
"Trained models"). MLflow is not imported here: the flow passes `on_epoch_end` to log metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline_steps import ddp_worker
from pipeline_steps.model_dir import TrainResult
from pipeline_steps.recipe_image import ImageRecipe
from pipeline_steps.recipe_multimodal import MultimodalRecipe
from pipeline_steps.recipe_text import TextRecipe
from pipeline_steps.training_loop import EpochCallback
from pipeline_steps.training_recipe import run_recipe

__all__ = [
    "TrainResult",
    "train_image_classifier",
    "train_in_process",
    "train_model",
    "train_multimodal_classifier",
    "train_text_classifier",
]


def train_image_classifier(
    clean_dir: str | Path,
    train_params: Mapping[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the photo classifier (one example per photo) and save it to `out_dir`.

    Args:
        clean_dir: the clean layer.
        train_params: params.yaml's `train:` section (or the whole params).
        out_dir: the model directory to write.
        resume: continue from `train.checkpoints_dir/image/last.pt` when it matches this run.
        on_epoch_end: called with (epoch, metrics) after each epoch.
        progress: show progress bars.

    Returns:
        The saved model directory, its history and the trained model.
    """
    return run_recipe(ImageRecipe(train_params, progress), clean_dir, out_dir, resume, on_epoch_end)


def train_text_classifier(
    clean_dir: str | Path,
    train_params: Mapping[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the text classifier (one example per product, `text` column) and save it to `out_dir`.

    Args: as for `train_image_classifier` (checkpoint: `train.checkpoints_dir/text/last.pt`).

    Returns:
        The saved model directory, its history, the trained model and its tokenizer.
    """
    return run_recipe(TextRecipe(train_params, progress), clean_dir, out_dir, resume, on_epoch_end)


def train_multimodal_classifier(
    clean_dir: str | Path,
    train_params: Mapping[str, Any],
    image_model_dir: str | Path,
    text_model_dir: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the image+text model from the trained towers (one example per product) and save it to `out_dir`.

    Args:
        image_model_dir: the trained image model (its directory).
        text_model_dir: the trained text model (its directory).
        the others: as for `train_image_classifier` (checkpoint: `train.checkpoints_dir/multimodal/last.pt`).

    Returns:
        The saved model directory, its history, the trained model and the text tower's tokenizer.
    """
    recipe = MultimodalRecipe(train_params, image_model_dir, text_model_dir, progress)
    return run_recipe(recipe, clean_dir, out_dir, resume, on_epoch_end)


def train_in_process(
    kind: str,
    clean_dir: str | Path,
    train_params: Mapping[str, Any],
    models_dir: str | Path,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `kind` in this process (one of the ranks under torchrun) into `models_dir/kind`.

    Args:
        kind: image, text or multimodal (the multimodal model reads the towers in `models_dir/image`, `models_dir/text`).
        models_dir: `train.models_dir`.
        the others: as for `train_image_classifier`.

    Returns:
        What the kind's train_* entry point returned.
    """
    out_dir = Path(models_dir) / kind
    if kind == "image":
        return train_image_classifier(clean_dir, train_params, out_dir, resume, on_epoch_end, progress)
    if kind == "text":
        return train_text_classifier(clean_dir, train_params, out_dir, resume, on_epoch_end, progress)
    if kind == "multimodal":
        models = Path(models_dir)
        return train_multimodal_classifier(clean_dir, train_params, models / "image", models / "text", out_dir, resume, on_epoch_end, progress)
    raise ValueError(f"unknown neural model kind {kind!r} (image, text or multimodal)")


def train_model(
    kind: str,
    clean_dir: str | Path,
    train_params: Mapping[str, Any],
    models_dir: str | Path,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> Path:
    """What the train stage runs for a neural model: in this process, or in `train.distributed.nproc`
    processes under torchrun (DistributedDataParallel, pipeline_steps/ddp_worker.py).

    Args: as for `train_in_process`; `on_epoch_end` is called in this process either way (with N
    processes, as rank 0 finishes each epoch).

    Returns:
        The model directory written (`models_dir/kind`).

    Raises:
        PipelineError: the distributed run failed (the message names the torchrun command and its exit code).
    """
    nproc = ddp_worker.distributed_nproc(train_params)
    if nproc > 1:
        return ddp_worker.launch(kind, nproc, clean_dir, train_params, models_dir, resume, on_epoch_end, progress)
    return train_in_process(kind, clean_dir, train_params, models_dir, resume, on_epoch_end, progress).model_dir
