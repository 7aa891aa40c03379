"""A trained model's directory: what `save_model_dir` writes and what a training call returns.

Why a module of its own: every neural recipe ends the same way, and the directory is the
contract with inference (docs/ARCHITECTURE.md, "Trained models"): config.json + model.pt +
history.json (+ encoder/ with the tokenizer and encoder config for text-based models, +
the wide branch's vectoriser), written atomically so a crash never leaves half a model.
config.json starts with the keys every model has (`base_config`); the recipe adds its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline_steps import models
from pipeline_steps.io_utils import atomic_dir, write_json
from pipeline_steps.photo_neighbours import NeighbourVote
from pipeline_steps.training_loop import FitOutcome, cpu_state

#: config.json's `format_version`.
FORMAT_VERSION = 1


@dataclass
class TrainResult:
    """What a `train_*` call produced: the model directory and how training went."""

    kind: str
    model_dir: Path
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    device: str
    seconds: float
    config: dict[str, Any]
    model: nn.Module = field(repr=False)  # the saved (best-val-loss) model, in eval mode
    tokenizer: Any = field(default=None, repr=False)


def _versions() -> dict[str, str]:
    import torchvision
    import transformers

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "transformers": transformers.__version__}


def save_model_dir(
    out_dir: str | Path,
    config: dict[str, Any],
    model: nn.Module,
    history: list[dict[str, float]],
    encoder_files: tuple[Any, nn.Module] | None = None,
    wide: models.WideFeaturizer | None = None,
    neighbours: NeighbourVote | None = None,
) -> Path:
    """Write config.json + model.pt + history.json (+ encoder/, + tfidf.joblib, + neighbours.npz) atomically as `out_dir`.

    Args:
        out_dir: the model directory (replaced as a whole).
        config: config.json's content.
        model: the trained model; its state dict goes to model.pt.
        history: the per-epoch metrics.
        encoder_files: (tokenizer, transformer) whose tokenizer and config go to encoder/.
        wide: the wide branch's fitted vectoriser.
        neighbours: the image model's stored train photos (neighbours.npz).

    Returns:
        `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        torch.save(cpu_state(model), tmp / "model.pt")
        write_json(tmp / "history.json", history)
        if wide is not None:
            wide.save(tmp / models.WIDE_FILE)
        if neighbours is not None:
            neighbours.save(tmp)
        if encoder_files is not None:
            tokenizer, transformer = encoder_files
            tokenizer.save_pretrained(str(tmp / "encoder"))
            transformer.config.save_pretrained(str(tmp / "encoder"))
        write_json(tmp / "config.json", config)
    return out_dir


def base_config(kind: str, classes: Sequence[str], params: Mapping[str, Any], outcome: FitOutcome, device: torch.device) -> dict[str, Any]:
    """The config.json keys every trained model has: kind, classes, params, how training went, versions.

    Args:
        kind: image, text or multimodal.
        classes: the class names in label-code order.
        params: the model's flat params.
        outcome: what `fit` returned.
        device: where it trained.

    Returns:
        The dict the recipe adds its own keys to.
    """
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "classes": list(classes),
        "params": dict(params),
        "training": {
            "best_epoch": outcome.best_epoch,
            "best_val_loss": outcome.best_val_loss,
            "epochs_run": len(outcome.history),
            "stopped_early": outcome.stopped_early,
            "device": device.type,
            "seconds": round(outcome.seconds, 2),
        },
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }


def train_result(
    kind: str, out_dir: Path, outcome: FitOutcome, device: torch.device, config: dict, model: nn.Module, tokenizer: Any = None
) -> TrainResult:
    """The `TrainResult` of a saved model (`model` is put in eval mode)."""
    return TrainResult(
        kind, Path(out_dir), outcome.history, outcome.best_epoch, outcome.best_val_loss, outcome.stopped_early,
        device.type, outcome.seconds, config, model.eval(), tokenizer,
    )
