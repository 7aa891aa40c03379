"""The three training entry points the train flow calls: one trained model directory each.

Each is one line over training_recipe.run_recipe (the sequence every neural model shares:
read the clean data, check its splits, seed, build, fit, save) with the model's recipe:

* recipe_image.py: the photo classifier (frozen or fine-tuned backbone, search vector choice);
* recipe_text.py: the text classifier (frozen or fine-tuned sentence encoder, + wide branch);
* recipe_multimodal.py: image + text from the trained towers (+ wide branch, photo calibration).

The loop itself (device, mixed precision, schedules, early stopping, checkpoints/resume,
reproducibility) is training_loop.py; the model directory is model_dir.py (docs/ARCHITECTURE.md,
"Trained models"). MLflow is not imported here: the flow passes `on_epoch_end` to log metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline_steps.model_dir import TrainResult
from pipeline_steps.recipe_image import ImageRecipe
from pipeline_steps.recipe_multimodal import MultimodalRecipe
from pipeline_steps.recipe_text import TextRecipe
from pipeline_steps.training_loop import EpochCallback
from pipeline_steps.training_recipe import run_recipe

__all__ = ["TrainResult", "train_image_classifier", "train_multimodal_classifier", "train_text_classifier"]


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
