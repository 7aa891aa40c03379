"""One training loop for every neural model, and the three `train_*` entry points.

Why one loop: seeding, device and mixed precision, the LR schedule, early
stopping, checkpoints/resume, the progress bar and the per-epoch callback
behave the same for the image, text and multimodal models, and are tested once.

* Device: `train.device` auto -> CUDA (with torch.autocast mixed precision when
  `train.mixed_precision`) if present, else CPU; the same code runs on both.
* Reproducible: seeded (python, numpy, torch), deterministic algorithms where
  torch has them, and each epoch's shuffling comes from a generator seeded by
  (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
* Checkpoint each epoch at `train.checkpoints_dir/<kind>/last.pt` (model, optimizer,
  scheduler, scaler, epoch, RNG states, history, best weights); `resume=True`
  continues from it. Only the last one is kept: each is complete, older ones
  would only cost disk.
* Early stopping on validation loss; the saved model has the best-val-loss weights.
* The result is a self-contained model directory (docs/ARCHITECTURE.md, "Trained
  models") written atomically: config.json + model.pt + history.json
  (+ encoder/ with the tokenizer and encoder config for text-based models).

Frozen encoders (text `fine_tune: false`, multimodal `fine_tune_towers: false`)
are run once over the data and only the head is trained on the stored vectors:
the same result as running the frozen encoder every epoch, many times faster.
MLflow is not imported here: the flow passes `on_epoch_end` to log metrics.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline_steps import datasets as ds
from pipeline_steps import image_features, models
from pipeline_steps.config import require_choice, resolve_path
from pipeline_steps.errors import ConfigError, DataValidationError, PipelineError
from pipeline_steps.io_utils import atomic_dir, atomic_path, file_sha256, write_json

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
FORMAT_VERSION = 1
LR_SCHEDULES = ("onecycle", "cosine")
DEVICES = ("auto", "cpu", "cuda")
#: shared keys that do not change what is learned, so a checkpoint may be resumed across them.
RUNTIME_KEYS = ("device", "num_workers", "num_threads", "mixed_precision", "models_dir", "checkpoints_dir", "features_dir")


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


# --------------------------------------------------------------------------- params


def model_params(train_params: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Flatten `train:` for one model: the shared scalars + the `train.<kind>` section.

    Accepts the `train:` section itself or the whole params dict.
    """
    train = train_params["train"] if isinstance(train_params.get("train"), Mapping) else train_params
    if not isinstance(train.get(kind), Mapping):
        raise ConfigError(f"params.yaml has no section 'train.{kind}'")
    shared = {key: value for key, value in train.items() if not isinstance(value, Mapping)}
    # `train.<kind>.label_smoothing: null` (the schema's default) means "use train.label_smoothing"
    section = {key: value for key, value in train[kind].items() if not (key == "label_smoothing" and value is None)}
    return {**shared, **section}


def _number(params: Mapping[str, Any], key: str, kind: str, minimum: float = 0, integer: bool = False) -> Any:
    full_key = f"train.{kind}.{key}" if key not in ("seed", "early_stopping_patience", "num_workers", "num_threads", "grad_clip", "label_smoothing") else f"train.{key}"
    value = _required(params, key, full_key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or (integer and int(value) != value):
        kind_of = "an integer" if integer else "a number"
        raise ConfigError(f"params.yaml key '{full_key}' must be {kind_of} >= {minimum}, got {value!r}")
    return int(value) if integer else float(value)


def _required(params: Mapping[str, Any], key: str, full_key: str) -> Any:
    """`params[key]`, or a ConfigError naming the params.yaml key (every knob is in params.yaml:
    pipeline_steps/settings.py checks that at load, this names it for a hand-built dict)."""
    if key not in params:
        raise ConfigError(f"params.yaml key '{full_key}' is missing (every knob has to be in params.yaml)")
    return params[key]


@dataclass(frozen=True)
class LoopSettings:
    """The knobs of `fit`, read and checked from params before any data is touched."""

    kind: str
    epochs: int
    batch_size: int
    seed: int
    device: torch.device
    mixed_precision: bool
    patience: int
    lr_schedule: str
    num_workers: int
    checkpoint_dir: Path
    num_threads: int | None
    grad_clip: float
    label_smoothing: float
    fingerprint: str = ""
    progress: bool = True


def resolve_device(name: Any) -> torch.device:
    require_choice(name, "train.device", DEVICES)
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("params.yaml key 'train.device' is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def loop_settings(params: Mapping[str, Any], kind: str, progress: bool = True) -> LoopSettings:
    return LoopSettings(
        kind=kind,
        epochs=_number(params, "epochs", kind, minimum=1, integer=True),
        batch_size=_number(params, "batch_size", kind, minimum=1, integer=True),
        seed=_number(params, "seed", kind, integer=True),
        device=resolve_device(_required(params, "device", "train.device")),
        mixed_precision=bool(_required(params, "mixed_precision", "train.mixed_precision")),
        patience=_number(params, "early_stopping_patience", kind, minimum=1, integer=True),
        lr_schedule=require_choice(_required(params, "lr_schedule", "train.lr_schedule"), "train.lr_schedule", LR_SCHEDULES),
        num_workers=_number(params, "num_workers", kind, integer=True),
        num_threads=(
            _number(params, "num_threads", kind, minimum=1, integer=True)
            if _required(params, "num_threads", "train.num_threads") is not None
            else None
        ),
        checkpoint_dir=resolve_path(_required(params, "checkpoints_dir", "train.checkpoints_dir")) / kind,
        grad_clip=_number(params, "grad_clip", kind),
        label_smoothing=_number(params, "label_smoothing", kind),
        progress=progress,
    )


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- reproducibility


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def deterministic(num_threads: int | None = None) -> Iterator[None]:
    """Deterministic kernels (warn-only where torch has none) and the CPU thread count, for
    the duration of training.

    `num_threads` (train.num_threads; None = torch's default, one per core): on a CPU
    shared with other busy processes, torch's spinning worker threads can slow training
    down many times over, and 1 thread is then much faster. The previous global settings
    are restored afterwards, so other code in the process is not affected.
    """
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    previous_benchmark, previous_threads = torch.backends.cudnn.benchmark, torch.get_num_threads()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous_benchmark
        torch.set_num_threads(previous_threads)


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- validation of the data


def check_splits(labels_by_split: Mapping[str, Sequence[int]], classes: Sequence[str], what: str, source: Path) -> None:
    """Training needs a non-empty train and val split, and every class in train."""
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


# --------------------------------------------------------------------------- the loop


@dataclass
class FitOutcome:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    seconds: float


def _to_device(inputs: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in inputs.items()}


def _autocast(device: torch.device, enabled: bool) -> Any:
    if device.type != "cuda" or not enabled:
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule. OneCycle: warm-up then cosine annealing; cosine: 5% linear warm-up then cosine."""
    if schedule == "onecycle":
        max_lr = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(total_steps, 2), pct_start=0.2)
    warmup = max(1, int(0.05 * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loader(dataset: Dataset, settings: LoopSettings, collate: Callable, shuffle: bool, epoch: int = 0) -> DataLoader:
    drop_last = shuffle and len(dataset) > settings.batch_size and len(dataset) % settings.batch_size == 1
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate,
        num_workers=settings.num_workers,
        pin_memory=settings.device.type == "cuda",
        drop_last=drop_last,  # a last batch of 1 breaks BatchNorm in training mode
    )


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size if (n > batch_size and n % batch_size == 1) else math.ceil(n / batch_size)


def warmup_steps(schedule: str, total_steps: int) -> int:
    """Steps until the learning rate peaks (OneCycle: 20% of training; cosine: 5% linear warm-up)."""
    return int(0.2 * max(total_steps, 2)) if schedule == "onecycle" else max(1, int(0.05 * total_steps))


def warmup_epochs(schedule: str, steps_per_epoch: int, epochs: int) -> int:
    """Epochs that end before the learning rate peaks: early stopping does not count them.

    While the LR is still rising (OneCycle's first 20%), a model trained from scratch often has a
    flat or worse val loss for an epoch or two before it starts learning; counting those epochs
    as "no improvement" stopped the image model at 16-22% accuracy on the real photos.
    """
    return sum(1 for epoch in range(1, epochs + 1) if epoch * steps_per_epoch < warmup_steps(schedule, steps_per_epoch * epochs))


@torch.inference_mode()
def evaluate_loss(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` over a loader (eval mode)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for inputs, labels in loader:
        labels = labels.to(device)
        with _autocast(device, amp):
            logits = model(**_to_device(inputs, device))
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += len(labels)
    return total_loss / max(count, 1), correct / max(count, 1)


def _checkpoint_path(settings: LoopSettings) -> Path:
    return settings.checkpoint_dir / "last.pt"


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


def fit(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    train_set: Dataset,
    val_set: Dataset,
    collate: Callable,
    settings: LoopSettings,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
) -> FitOutcome:
    """Train `model` (forward(**inputs) -> logits) with AdamW; leave the best-val-loss weights in it.

    `param_groups`: AdamW groups with their own lr/weight_decay (e.g. encoder vs head).
    """
    device, amp = settings.device, settings.mixed_precision and settings.device.type == "cuda"
    model.to(device)
    groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in param_groups]
    optimizer = torch.optim.AdamW([group for group in groups if group["params"]])
    steps_per_epoch = _steps_per_epoch(len(train_set), settings.batch_size)
    scheduler = _make_scheduler(optimizer, settings.lr_schedule, steps_per_epoch * settings.epochs)
    amp_fp16 = amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=amp_fp16)

    history: list[dict[str, float]] = []
    best_state, best_epoch, best_val_loss, bad_epochs, stopped_early = _cpu_state(model), 0, math.inf, 0, False
    start_epoch, spent = 0, 0.0
    checkpoint_file = _checkpoint_path(settings)
    if resume and checkpoint_file.is_file():
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
        if checkpoint.get("fingerprint") != settings.fingerprint:
            raise PipelineError(
                f"checkpoint {checkpoint_file} was written for other params or data than this run's; "
                "train without resume to start over (or restore the params it was made with)"
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        _set_rng_state(checkpoint["rng"])
        history, start_epoch, spent = list(checkpoint["history"]), int(checkpoint["epoch"]), float(checkpoint["seconds"])
        best_state, best_epoch, best_val_loss = checkpoint["best_state"], int(checkpoint["best_epoch"]), float(checkpoint["best_val_loss"])
        bad_epochs, stopped_early = int(checkpoint["bad_epochs"]), bool(checkpoint["stopped_early"])
        log.info("%s: resuming from %s after epoch %d", settings.kind, checkpoint_file, start_epoch)
    elif resume:
        log.info("%s: no checkpoint at %s, starting from scratch", settings.kind, checkpoint_file)

    val_loader = _loader(val_set, settings, collate, shuffle=False)
    warmup = warmup_epochs(settings.lr_schedule, steps_per_epoch, settings.epochs)
    epoch = start_epoch
    while epoch < settings.epochs and not stopped_early:
        started = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            _loader(train_set, settings, collate, shuffle=True, epoch=epoch),
            desc=f"{settings.kind} {epoch + 1}/{settings.epochs}",
            total=steps_per_epoch,
            disable=not settings.progress,
            leave=False,
        )
        for inputs, labels in bar:
            labels = labels.to(device, non_blocking=True)
            with _autocast(device, amp):
                logits = model(**_to_device(inputs, device))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=settings.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if settings.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], settings.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.detach().argmax(dim=1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        val_loss, val_accuracy = evaluate_loss(model, val_loader, device, amp)
        epoch += 1
        seconds = time.perf_counter() - started
        spent += seconds
        metrics = {
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": optimizer.param_groups[-1]["lr"],
            "epoch_seconds": seconds,
        }
        history.append({"epoch": epoch, **metrics})
        if val_loss < best_val_loss:
            best_state, best_epoch, best_val_loss, bad_epochs = _cpu_state(model), epoch, val_loss, 0
        elif epoch > warmup:  # epochs ending during the LR warm-up do not count towards patience
            bad_epochs += 1
            stopped_early = bad_epochs >= settings.patience and epoch < settings.epochs
        log.info(
            "%s epoch %d/%d: train_loss %.4f acc %.3f | val_loss %.4f acc %.3f (%.1fs)",
            settings.kind, epoch, settings.epochs, metrics["train_loss"], metrics["train_accuracy"], val_loss, val_accuracy, seconds,
        )
        _save_checkpoint(
            checkpoint_file,
            {
                "format": FORMAT_VERSION,
                "kind": settings.kind,
                "fingerprint": settings.fingerprint,
                "epoch": epoch,
                "seconds": spent,
                "model": _cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
                "history": history,
                "best_state": best_state,
                "best_epoch": best_epoch,
                "best_val_loss": best_val_loss,
                "bad_epochs": bad_epochs,
                "stopped_early": stopped_early,
            },
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, dict(metrics))
        if stopped_early:
            log.info("%s: early stop after epoch %d (best val_loss %.4f at epoch %d)", settings.kind, epoch, best_val_loss, best_epoch)

    model.load_state_dict(best_state)
    model.eval()
    return FitOutcome(history, best_epoch, best_val_loss, stopped_early, spent)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


# --------------------------------------------------------------------------- model directory


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
) -> Path:
    """Write config.json + model.pt + history.json (+ encoder/, + tfidf.joblib) atomically as `out_dir`."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        torch.save(_cpu_state(model), tmp / "model.pt")
        write_json(tmp / "history.json", history)
        if wide is not None:
            wide.save(tmp / models.WIDE_FILE)
        if encoder_files is not None:
            tokenizer, transformer = encoder_files
            tokenizer.save_pretrained(str(tmp / "encoder"))
            transformer.config.save_pretrained(str(tmp / "encoder"))
        write_json(tmp / "config.json", config)
    return out_dir


def _base_config(kind: str, classes: Sequence[str], params: Mapping[str, Any], outcome: FitOutcome, device: torch.device) -> dict[str, Any]:
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


def _result(kind: str, out_dir: Path, outcome: FitOutcome, device: torch.device, config: dict, model: nn.Module, tokenizer: Any = None) -> TrainResult:
    return TrainResult(
        kind, Path(out_dir), outcome.history, outcome.best_epoch, outcome.best_val_loss, outcome.stopped_early,
        device.type, outcome.seconds, config, model.eval(), tokenizer,
    )


def _with_fingerprint(settings: LoopSettings, value: str) -> LoopSettings:
    return replace(settings, fingerprint=value)


def _fingerprint_for(kind: str, params: Mapping[str, Any], data_ids: Any) -> str:
    return fingerprint({"kind": kind, "params": {k: v for k, v in params.items() if k not in RUNTIME_KEYS}, "data": data_ids})


# --------------------------------------------------------------------------- image


def _clean_image_size(data: ds.CleanData, paths: Sequence[Path]) -> int | None:
    """Side of the (square) clean photos, so inference can letterbox raw photos the same way."""
    if not len(paths):
        return None
    width, height = ds.load_rgb(paths[0]).size
    return width if width == height else None


IMAGE_MODES = ("auto", "frozen", "fine_tune")
SEARCH_EMBEDDINGS = ("auto", "backbone", "head")


def image_features_dir(params: Mapping[str, Any]) -> Path:
    """`train.image.features_dir`: the frozen backbone's feature cache (train_image stage output)."""
    return resolve_path(params["features_dir"])


def resolve_image_mode(value: Any, device: torch.device, pretrained: bool = True) -> str:
    """auto: frozen pretrained backbone on CPU (minutes), fine-tuning on CUDA; a randomly initialised
    backbone (weights: null) is always trained (freezing random features would learn nothing)."""
    mode = require_choice(value if value is not None else "auto", "train.image.mode", IMAGE_MODES)
    if mode != "auto":
        return mode
    return "frozen" if device.type != "cuda" and pretrained else "fine_tune"


def _trainable_blocks(params: Mapping[str, Any]) -> int | str:
    value = params["trainable_blocks"]
    if value == "all":
        return "all"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"params.yaml key 'train.image.trainable_blocks' must be an integer >= 1 or 'all', got {value!r}")
    return int(value)


def same_category_precision(
    vectors: np.ndarray, labels: np.ndarray, products: np.ndarray, queries: np.ndarray, k: int = 10
) -> float:
    """Image -> image precision@k on L2-normalised `vectors` (cosine): for each query row, the k
    nearest *other products* (one hit per product, the query's own product excluded) and the share
    of them in the query's category. The same rule as the index stage's metric."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    scores = unit[queries] @ unit.T
    hits = []
    for row, query in enumerate(queries):
        order = np.argsort(-scores[row])
        seen: set[Any] = {products[query]}
        found = 0
        for j in order:
            if products[j] in seen:
                continue
            seen.add(products[j])
            hits.append(labels[j] == labels[query])
            found += 1
            if found == k:
                break
    return float(np.mean(hits)) if hits else 0.0


@torch.inference_mode()
def choose_search_embedding(
    model: models.ImageClassifier, features: torch.Tensor, frame: Any, choice: str, k: int = 10
) -> dict[str, Any]:
    """Pick the photo index's vector by image -> image precision@k on the val split: the pooled
    backbone features or the head's penultimate layer. Queries: val photos; searched: train + val
    photos. Both are scored and recorded even when `choice` forces one."""
    model.eval().cpu()
    labels, products = frame["label"].to_numpy(), frame["product_id"].astype(str).to_numpy()
    queries = np.flatnonzero((frame["split"] == "val").to_numpy())
    candidates = {
        "backbone": features.float().numpy(),
        "head": model.embed_features(features.float()).numpy(),
    }
    scores = {name: round(same_category_precision(vectors, labels, products, queries, k), 4) for name, vectors in candidates.items()}
    winner = max(scores, key=lambda name: (scores[name], name == "backbone")) if choice == "auto" else choice
    return {
        "vector": winner,
        "dim": int(candidates[winner].shape[1]),
        "chosen_by": f"val precision@{k}" if choice == "auto" else "train.image.search_embedding",
        f"val_precision_at_{k}": scores,
        "margin": round(scores[winner] - min(scores.values()), 4),
        "queries": int(len(queries)),
    }


class FeatureHead(nn.Module):
    """The trainable part of a frozen-backbone image model: embedding + classifier on stored features."""

    def __init__(self, model: models.ImageClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head_logits(features)

    def train(self, mode: bool = True) -> FeatureHead:
        nn.Module.train(self, False)  # the backbone is never run here: keep it (and its BN) in eval mode
        self.model.embedding.train(mode)
        self.model.feature_dropout.train(mode)
        self.model.dropout.train(mode)
        self.model.classifier.train(mode)
        self.training = mode
        return self


def train_image_classifier(
    clean_dir: str | Path,
    train_params: Mapping[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the photo classifier (one example per photo) and save it to `out_dir`.

    `train.image.mode` frozen: the backbone's pooled features are computed once per photo
    (cached in `train.image.features_dir`) and only the head trains; fine_tune: the last
    `trainable_blocks` blocks (or all) train with augmentation, mixed precision on CUDA.
    """
    params = model_params(train_params, "image")
    backbone = models.check_backbone(params["backbone"])
    weights_spec = models.describe_weights(backbone, params["weights"])
    augmentation = models.check_augmentation(params["augmentation"])
    require_choice(params["freeze_backbone"], "train.image.freeze_backbone", models.FREEZE_CHOICES)
    search_choice = require_choice(params["search_embedding"], "train.image.search_embedding", SEARCH_EMBEDDINGS)
    trainable_blocks = _trainable_blocks(params)
    lr, weight_decay = _number(params, "lr", "image"), _number(params, "weight_decay", "image")
    settings = loop_settings(params, "image", progress)
    mode = resolve_image_mode(params["mode"], settings.device, weights_spec["type"] != "none")
    models.build_image_preprocessor(params, weights_spec)  # checks input_size before any data is read

    data = ds.load_clean(clean_dir)
    images_file = Path(clean_dir) / "images.parquet"
    check_splits({s: data.images_of(s)["label"].tolist() for s in ("train", "val")}, data.classes, "photos", images_file)

    seed_everything(settings.seed)
    with deterministic(settings.num_threads):
        model = models.build_image_classifier({**params, "freeze_backbone": False}, len(data.classes))
        train_frame = data.images_of("train")
        source_size = _clean_image_size(data, [data.clean_dir / p for p in train_frame["path"][:1]])
        preprocessor = models.build_image_preprocessor(params, weights_spec, source_size)
        ids = {s: data.images_of(s)["image_id"].astype(str).tolist() for s in ("train", "val")}
        settings = _with_fingerprint(settings, _fingerprint_for("image", params, [fingerprint(ids), data.classes, weights_spec, mode]))
        feature_stats = image_features.FeatureStats()
        if mode == "frozen":
            model.freeze_backbone()
            frame = data.images_of(None)  # every split: the index stage reuses the test photos' features
            features = image_features.backbone_features(
                backbone, model.backbone, preprocessor, [data.clean_dir / rel for rel in frame["path"]],
                cache_dir=image_features_dir(params), device=settings.device, progress=progress, stats=feature_stats,
            )
            split = frame["split"].to_numpy()
            train_set, val_set = (
                ds.TensorDictDataset({"features": features[torch.from_numpy(split == s)]}, frame.loc[split == s, "label"].tolist())
                for s in ("train", "val")
            )
            head = [*model.embedding.parameters(), *model.classifier.parameters()]
            groups = [{"params": head, "lr": lr, "weight_decay": weight_decay}]
            outcome = fit(FeatureHead(model), groups, train_set, val_set, ds.collate_tensor_dicts, settings, resume, on_epoch_end)
        else:
            freeze = params["freeze_backbone"]
            if trainable_blocks != "all" and (freeze is True or (freeze == "auto" and weights_spec["type"] != "none")):
                model.freeze_all_but_last_block(int(trainable_blocks))
            train_set = ds.image_dataset(data, "train", models.TrainImageTransform(preprocessor, augmentation))
            val_set = ds.image_dataset(data, "val", preprocessor)
            groups = [{"params": list(model.parameters()), "lr": lr, "weight_decay": weight_decay}]
            outcome = fit(model, groups, train_set, val_set, ds.collate_images, settings, resume, on_epoch_end)
            frame = data.images_of(None)
            frame = frame[frame["split"].isin(["train", "val"])].reset_index(drop=True)
            features = image_features.extract(model.backbone, preprocessor, [data.clean_dir / rel for rel in frame["path"]], settings.device, progress=progress)
        search = choose_search_embedding(model, features, frame, search_choice)
        log.info("image search embedding: %s (val precision@10 %s)", search["vector"], search["val_precision_at_10"])

    frozen = not any(p.requires_grad for p in model.backbone.parameters())
    config = _base_config("image", data.classes, params, outcome, settings.device)
    config.update(
        {
            "embedding_dim": search["dim"],
            "search_embedding": search,
            "architecture": {
                "type": "ImageClassifier",
                "backbone": backbone,
                "feature_dim": model.feature_dim,
                "embedding_dim": model.embedding_dim,
                "dropout": float(params["dropout"]),
                "feature_dropout": float(params["feature_dropout"]),
                "n_classes": len(data.classes),
                "initial_weights": weights_spec,
                "mode": mode,
                "frozen_backbone": frozen,
                "trainable_backbone_modules": [] if frozen else [n for n, m in model.backbone.named_modules() if n and any(p.requires_grad for p in m.parameters(recurse=False))][:50],
                "embedding": "ReLU(Linear(backbone features)): the penultimate layer",
            },
            "preprocessing": {"image": preprocessor.to_config(), "augmentation": augmentation if mode == "fine_tune" else []},
            "features": {
                "cache_file": feature_stats.cache_file,
                "photos": feature_stats.total,
                "reused": feature_stats.reused,
                "computed": feature_stats.computed,
            },
        }
    )
    save_model_dir(out_dir, config, model, outcome.history)
    return _result("image", Path(out_dir), outcome, settings.device, config, model.cpu())


# --------------------------------------------------------------------------- wide branch


def wide_enabled(params: Mapping[str, Any], kind: str) -> bool:
    """`train.<kind>.wide`: true adds the TF-IDF branch, false trains the deep model only."""
    return bool(require_choice(_required(params, "wide", f"train.{kind}.wide"), f"train.{kind}.wide", (True, False)))


def wide_settings(params: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The TF-IDF vectoriser settings of the wide branch, from `train.<kind>.wide_*` (checked).

    `wide_max_features`, `wide_char_ngram_range` and `wide_title` are params.yaml knobs; the word
    n-gram range, sublinear tf and the char min_df are fixed (models.WIDE_DEFAULTS).
    """
    settings = dict(models.WIDE_DEFAULTS)
    settings["max_features"] = _number(params, "wide_max_features", kind, minimum=1, integer=True)
    for key in ("char_ngram_range",):
        value = _required(params, f"wide_{key}", f"train.{kind}.wide_{key}")
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            or value[0] > value[1]
        ):
            raise ConfigError(f"params.yaml key 'train.{kind}.wide_{key}' must be [low, high] with 1 <= low <= high, got {value!r}")
        settings[key] = [int(v) for v in value]
    settings["title"] = bool(require_choice(_required(params, "wide_title", f"train.{kind}.wide_title"), f"train.{kind}.wide_title", (True, False)))
    return settings


def wide_optimizer_settings(params: Mapping[str, Any], kind: str, lr: float) -> dict[str, float]:
    """AdamW lr / weight decay of the wide layer, and the dropout on its features."""
    return {
        "lr": _number(params, "wide_lr", kind),
        "weight_decay": _number(params, "wide_weight_decay", kind),
        "dropout": _number(params, "wide_dropout", kind),
    }


# --------------------------------------------------------------------------- text


@torch.inference_mode()
def encode_texts(
    encoder: models.TextEncoder,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    device: torch.device,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "encoding texts",
) -> torch.Tensor:
    """Pooled encoder vectors of `texts` (n, d) float32 on CPU, in input order.

    Texts are sorted by length first so each batch pads to similar lengths (less work).
    Full precision even on CUDA, so the stored vectors equal what inference computes.
    """
    encoder.eval().to(device)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros((len(texts), encoder.output_dim), dtype=torch.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        index = order[start : start + batch_size]
        tokens = _to_device(ds.tokenize(tokenizer, [texts[i] for i in index], max_length), device)
        out[index] = encoder(**tokens).float().cpu()
    return out


def cached_text_embeddings(
    cache_dir: Path,
    identity: Mapping[str, Any],
    encoder: models.TextEncoder,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    device: torch.device,
    progress: bool = True,
) -> torch.Tensor:
    """`encode_texts`, stored under `cache_dir` keyed by encoder identity + max_length + sha of the texts.

    Encoding is the slow part of frozen-encoder training (minutes on CPU) and its result only
    changes when the encoder, max_length or the texts do, so re-runs and the multimodal model
    (which reuses the text tower) read it back.
    """
    texts_sha = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
    key = fingerprint({"encoder": identity, "max_length": int(max_length), "texts": texts_sha})
    path = Path(cache_dir) / f"text-{key[:32]}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key and stored["embeddings"].shape[0] == len(texts):
            return stored["embeddings"]
    embeddings = encode_texts(encoder, tokenizer, texts, max_length, device, progress=progress)
    with atomic_path(path) as tmp:
        torch.save({"key": key, "identity": dict(identity), "embeddings": embeddings}, tmp)
    return embeddings


def _wide_architecture(featurizer: models.WideFeaturizer | None, wide_opt: Mapping[str, float] | None, source: str) -> dict[str, Any] | None:
    """config.json's record of the wide branch (None: the model has none)."""
    if featurizer is None:
        return None
    return {
        **featurizer.to_config(),
        "dropout": float(wide_opt["dropout"]) if wide_opt else 0.0,
        "source": source,
        "logits": "added to the deep head's logits (0 for a row without text)",
    }


def _embedding_cache_dir(params: Mapping[str, Any]) -> Path:
    return resolve_path(params["checkpoints_dir"]) / "embedding_cache"


def train_text_classifier(
    clean_dir: str | Path,
    train_params: Mapping[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the text classifier (one example per product, `text` column) and save it to `out_dir`."""
    params = model_params(train_params, "text")
    encoder_name = _required(params, "encoder", "train.text.encoder")
    models.resolve_encoder_source(encoder_name)
    max_length = _number(params, "max_length", "text", minimum=8, integer=True)
    fine_tune = bool(params["fine_tune"])
    lr, weight_decay = _number(params, "lr", "text"), _number(params, "weight_decay", "text")
    encoder_lr = _number(params, "encoder_lr", "text") if fine_tune else 0.0
    use_wide = wide_enabled(params, "text")
    wide_config = wide_settings(params, "text") if use_wide else None
    wide_opt = wide_optimizer_settings(params, "text", lr) if use_wide else None
    settings = loop_settings(params, "text", progress)

    data = ds.load_clean(clean_dir)
    products_file = Path(clean_dir) / "products.parquet"
    check_splits({s: data.products_of(s)["label"].tolist() for s in ("train", "val")}, data.classes, "products", products_file)
    tokenizer, transformer = models.load_pretrained_encoder(encoder_name)

    seed_everything(settings.seed)
    with deterministic(settings.num_threads):
        splits = {s: data.products_of(s) for s in ("train", "val")}
        # the wide branch's vocabulary and idf come from the train split only
        featurizer = models.WideFeaturizer.fit(splits["train"]["text"].tolist(), wide_config) if use_wide else None
        model = models.build_text_classifier(transformer, params, len(data.classes), featurizer.n_features if featurizer else None)
        ids = {s: frame["product_id"].astype(str).tolist() for s, frame in splits.items()}
        settings = _with_fingerprint(settings, _fingerprint_for("text", params, [fingerprint(ids), data.classes]))
        wide_groups = (
            [{"params": list(model.wide.parameters()), "lr": wide_opt["lr"], "weight_decay": wide_opt["weight_decay"]}]
            if model.wide is not None and wide_opt
            else []
        )
        if fine_tune:
            train_set, val_set = (ds.text_dataset(data, s) for s in ("train", "val"))
            groups = [
                {"params": list(model.encoder.parameters()), "lr": encoder_lr, "weight_decay": weight_decay},
                {"params": list(model.head.parameters()), "lr": lr, "weight_decay": weight_decay},
                *wide_groups,
            ]
            collate = ds.TextCollate(tokenizer, max_length, featurizer)
            outcome = fit(model, groups, train_set, val_set, collate, settings, resume, on_epoch_end)
        else:
            model.encoder.requires_grad_(False)
            identity = {"encoder": encoder_name, "weights": "pretrained"}
            vectors = {
                s: cached_text_embeddings(
                    _embedding_cache_dir(params), identity, model.encoder, tokenizer, frame["text"].tolist(), max_length, settings.device, progress
                )
                for s, frame in splits.items()
            }
            sparse = {s: featurizer.transform(frame["text"].tolist()) if featurizer else None for s, frame in splits.items()}
            train_set, val_set = (
                ds.TensorDictDataset({"embedding": vectors[s]}, splits[s]["label"].tolist(), sparse=sparse[s]) for s in ("train", "val")
            )
            groups = [{"params": list(model.head.parameters()), "lr": lr, "weight_decay": weight_decay}, *wide_groups]
            trained = models.WideAndDeepHead(model.head, model.wide) if model.wide is not None else model.head
            outcome = fit(trained, groups, train_set, val_set, ds.collate_tensor_dicts, settings, resume, on_epoch_end)

    config = _base_config("text", data.classes, params, outcome, settings.device)
    config.update(
        {
            "embedding_dim": model.embedding_dim,
            "architecture": {
                "type": "TextClassifier",
                "encoder": encoder_name,
                "encoder_dir": "encoder",
                "fine_tuned": fine_tune,
                "hidden_dim": int(params["hidden_dim"]),
                "dropout": float(params["dropout"]),
                "n_classes": len(data.classes),
                "embedding": "mean of the encoder's token vectors over the attention mask",
                "wide": _wide_architecture(featurizer, wide_opt, "fitted on the train split"),
            },
            "preprocessing": {"text": {"column": "text", "max_length": max_length, "truncation": True}},
        }
    )
    model.cpu().eval()
    save_model_dir(out_dir, config, model, outcome.history, encoder_files=(tokenizer, model.encoder.transformer), wide=featurizer)
    return _result("text", Path(out_dir), outcome, settings.device, config, model, tokenizer)


# --------------------------------------------------------------------------- multimodal


@torch.inference_mode()
def product_image_embeddings(
    image_tower: models.ImageClassifier,
    preprocessor: models.ImagePreprocessor,
    paths_per_product: Sequence[Sequence[Path]],
    device: torch.device,
    pooling: str = "mean",
    batch_size: int = 64,
    progress: bool = True,
    feature_cache_dir: Path | None = None,
    image_input: str = "head",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled image-tower embedding per product (n, d) + whether it has any photo (n,).

    The photos' backbone features come from the frozen-feature cache when it holds them (the
    image model's training filled it with the same backbone), else they are computed (not stored).
    """
    image_tower.eval().to(device)
    flat = [(row, path) for row, paths in enumerate(paths_per_product) for path in paths]
    features = image_features.backbone_features(
        image_tower.backbone_name, image_tower.backbone, preprocessor, [path for _, path in flat],
        cache_dir=feature_cache_dir, device=device, batch_size=batch_size, progress=progress, write=False,
    )
    dim = models.image_input_dim(image_tower, image_input)
    if not flat:
        vectors = torch.zeros((0, dim))
    elif image_input == "backbone":
        vectors = features.float()
    else:
        vectors = image_tower.embed_features(features.to(device)).float().cpu()
    owner = torch.tensor([row for row, _ in flat], dtype=torch.long)
    return models.pool_per_owner(vectors, owner, len(paths_per_product), pooling)


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
    """Train the image+text model from the trained towers (one example per product).

    A product's photos are averaged into one image embedding (`image_pooling: mean`): one
    example per product gives the same weighting as the text model, and a listing with ten
    photos does not count ten times. With `fine_tune_towers: false` (default) the towers stay
    as trained and only the fusion head learns, on tower embeddings computed once.
    """
    from pipeline_steps.inference import load_model_module  # rebuilds a trained tower; no training code there

    params = model_params(train_params, "multimodal")
    pooling = require_choice(params["image_pooling"], "train.multimodal.image_pooling", models.IMAGE_POOLING)
    image_input = require_choice(params["image_input"], "train.multimodal.image_input", models.IMAGE_INPUTS)
    fine_tune = bool(params["fine_tune_towers"])
    photo_calibration = require_choice(params["photo_calibration"], "train.multimodal.photo_calibration", PHOTO_CALIBRATIONS)
    lr, weight_decay = _number(params, "lr", "multimodal"), _number(params, "weight_decay", "multimodal")
    tower_lr = _number(params, "tower_lr", "multimodal") if fine_tune else 0.0
    use_wide = wide_enabled(params, "multimodal")
    wide_opt = wide_optimizer_settings(params, "multimodal", lr) if use_wide else None
    settings = loop_settings(params, "multimodal", progress)

    data = ds.load_clean(clean_dir)
    products_file = Path(clean_dir) / "products.parquet"
    check_splits({s: data.products_of(s)["label"].tolist() for s in ("train", "val")}, data.classes, "products", products_file)
    image_loaded = load_model_module(image_model_dir, expected_kind="image")
    text_loaded = load_model_module(text_model_dir, expected_kind="text")
    for loaded, directory in ((image_loaded, image_model_dir), (text_loaded, text_model_dir)):
        if loaded.config["classes"] != data.classes:
            raise PipelineError(f"{directory} was trained on other classes than {Path(clean_dir) / 'labels.json'}; retrain it first")
    image_tower, text_tower = image_loaded.module, text_loaded.module
    preprocessor, tokenizer = image_loaded.preprocessor, text_loaded.tokenizer
    max_length = int(text_loaded.config["preprocessing"]["text"]["max_length"])

    calibration: dict[str, Any] = {"mode": "none"}
    if photo_calibration == "val" and fine_tune:
        log.warning("train.multimodal.photo_calibration: val applies to frozen towers only (fine_tune_towers: false); not fitted")
    seed_everything(settings.seed)
    with deterministic(settings.num_threads):
        fusion = models.build_fusion_head(
            params, models.image_input_dim(image_tower, image_input), text_tower.embedding_dim, len(data.classes),
            text_head=copy.deepcopy(text_tower.head),  # used by `fusion: residual` only
        )
        splits = {s: data.products_of(s) for s in ("train", "val")}
        featurizer, wide, wide_source = _multimodal_wide(params, use_wide, wide_opt, text_loaded, splits["train"]["text"].tolist(), len(data.classes))
        text_tower.wide = None  # the multimodal model adds its own wide logits (`model.wide`), not the tower's
        model = models.MultimodalClassifier(image_tower, text_tower, fusion, pooling, wide=wide, image_input=image_input)
        wide_groups = (
            [{"params": list(wide.parameters()), "lr": wide_opt["lr"], "weight_decay": wide_opt["weight_decay"]}] if wide is not None and wide_opt else []
        )
        lineage = {"image_model": file_sha256(Path(image_model_dir) / "model.pt"), "text_model": file_sha256(Path(text_model_dir) / "model.pt")}
        ids = {s: frame["product_id"].astype(str).tolist() for s, frame in splits.items()}
        settings = _with_fingerprint(settings, _fingerprint_for("multimodal", params, [fingerprint(ids), data.classes, lineage]))
        if fine_tune:
            augmentation = image_loaded.config["preprocessing"].get("augmentation", [])
            train_set = ds.multimodal_dataset(data, "train", models.TrainImageTransform(preprocessor, augmentation))
            val_set = ds.multimodal_dataset(data, "val", preprocessor)
            towers = [*image_tower.parameters(), *text_tower.parameters()]
            groups = [
                {"params": towers, "lr": tower_lr, "weight_decay": weight_decay},
                {"params": list(fusion.parameters()), "lr": lr, "weight_decay": weight_decay},
                *wide_groups,
            ]
            collate = ds.MultimodalCollate(tokenizer, max_length, preprocessor.input_size, featurizer)
            outcome = fit(model, groups, train_set, val_set, collate, settings, resume, on_epoch_end)
        else:
            model.image_tower.requires_grad_(False)
            model.text_tower.requires_grad_(False)
            text_config = text_loaded.config["architecture"]
            identity = (
                {"encoder": text_config["encoder"], "weights": "pretrained"}
                if not text_config.get("fine_tuned")
                else {"encoder": text_config["encoder"], "weights": lineage["text_model"]}
            )
            by_product = data.image_paths_by_product()
            features = {}
            for split, frame in splits.items():
                image_emb, image_present = product_image_embeddings(
                    image_tower, preprocessor, [by_product.get(p, []) for p in frame["product_id"]], settings.device, pooling,
                    progress=progress, feature_cache_dir=image_features_dir(model_params(train_params, "image")), image_input=image_input,
                )
                text_emb = cached_text_embeddings(
                    _embedding_cache_dir(params), identity, text_tower.encoder, tokenizer, frame["text"].tolist(), max_length, settings.device, progress
                )
                features[split] = {
                    "image_emb": image_emb,
                    "image_present": image_present,
                    "text_emb": text_emb,
                    "text_present": torch.tensor([bool(t) for t in frame["text"]], dtype=torch.bool),
                }
            sparse = {s: featurizer.transform(frame["text"].tolist()) if featurizer else None for s, frame in splits.items()}
            train_set, val_set = (ds.TensorDictDataset(features[s], splits[s]["label"].tolist(), sparse=sparse[s]) for s in ("train", "val"))
            groups = [{"params": list(fusion.parameters()), "lr": lr, "weight_decay": weight_decay}, *wide_groups]
            trained = models.FusionWithWide(fusion, wide) if wide is not None else fusion
            outcome = fit(trained, groups, train_set, val_set, ds.collate_tensor_dicts, settings, resume, on_epoch_end)
            if photo_calibration == "val":
                calibration = fit_photo_calibration(model, trained, val_set)
                log.info("photo calibration on val: %s", calibration)

    config = _base_config("multimodal", data.classes, params, outcome, settings.device)
    config.update(
        {
            "embedding_dim": fusion.embedding_dim,
            "architecture": {
                "type": "MultimodalClassifier",
                "image_pooling": pooling,
                "image_input": image_input,
                "fusion": "residual" if fusion.residual else "concat",
                "hidden_dim": fusion.embedding_dim,
                "dropout": float(params["dropout"]),
                "modality_dropout": fusion.modality_dropout,
                "towers_fine_tuned": fine_tune,
                "photo_calibration": calibration,
                "n_classes": len(data.classes),
                "image_dim": models.image_input_dim(image_tower, image_input),
                "text_dim": text_tower.embedding_dim,
                "embedding": "ReLU(Linear([LayerNorm(image), LayerNorm(text)])): the fused hidden layer",
                "image_tower": image_loaded.config["architecture"],
                "text_tower": {**{k: v for k, v in text_loaded.config["architecture"].items() if k != "wide"}, "encoder_dir": "encoder"},
                "wide": _wide_architecture(featurizer, wide_opt, wide_source),
            },
            "preprocessing": {
                "image": image_loaded.config["preprocessing"]["image"],
                "augmentation": image_loaded.config["preprocessing"].get("augmentation", []),
                "text": text_loaded.config["preprocessing"]["text"],
            },
            "towers": {"image_model": str(image_model_dir), "text_model": str(text_model_dir), "sha256": lineage},
        }
    )
    model.cpu().eval()
    save_model_dir(out_dir, config, model, outcome.history, encoder_files=(tokenizer, text_tower.encoder.transformer), wide=featurizer)
    return _result("multimodal", Path(out_dir), outcome, settings.device, config, model, tokenizer)


PHOTO_CALIBRATIONS = ("none", "val")


@torch.no_grad()
def _val_outputs(model: models.MultimodalClassifier, trained: nn.Module, val_set: Dataset) -> tuple[torch.Tensor, ...]:
    trained.eval()
    base, photo, present, labels = [], [], [], []
    for inputs, y in DataLoader(val_set, batch_size=256, shuffle=False, collate_fn=ds.collate_tensor_dicts):
        base.append(trained(**inputs).float())
        photo.append(model.photo_log_proba(inputs["image_emb"]))
        present.append(inputs["image_present"].bool())
        labels.append(y)
    return torch.cat(base), torch.cat(photo), torch.cat(present), torch.cat(labels)


def _fit_calibration(
    base: torch.Tensor, photo: torch.Tensor, labels: torch.Tensor, l2: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, b, log s) minimising cross-entropy of s * base + w * photo + b (+ l2 on all three) by L-BFGS."""
    n_classes = base.shape[1]
    weight = torch.zeros(n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    log_scale = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias, log_scale], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = base * log_scale.exp() + photo * weight + bias
        loss = F.cross_entropy(logits, labels) + l2 * (weight.square().sum() + bias.square().sum() + log_scale.square().sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach(), log_scale.detach()


PHOTO_CALIBRATION_L2 = (1e-1, 1e-2, 1e-3, 1e-4)


def fit_photo_calibration(
    model: models.MultimodalClassifier, trained: nn.Module, val_set: Dataset, steps: int = 200, folds: int = 2, seed: int = 0
) -> dict[str, Any]:
    """Fit the multimodal model's photo term on the val split: for a product with a photo,
    logits = s * fusion logits + w * log P_image(pooled photos) + b (w, b per class, s a scalar): a stacker
    on outputs the towers did not train on. The L2 strength is chosen by `folds`-fold cross-validation
    inside val (lowest held-out cross-entropy), then w, b, s are refitted on all of val and written into
    `model`. The summary's `val_cv_accuracy_*` are honest (each product scored by a fit that did not see it)."""
    base, photo, present, labels = _val_outputs(model, trained, val_set)
    rows = torch.nonzero(present).squeeze(1)
    fold = torch.from_numpy(np.random.default_rng(seed).integers(0, folds, len(rows)))
    cv: dict[float, tuple[float, int]] = {}
    for l2 in PHOTO_CALIBRATION_L2:
        loss, correct = 0.0, 0
        for f in range(folds):
            fit_rows, held = rows[fold != f], rows[fold == f]
            w, b, log_s = _fit_calibration(base[fit_rows], photo[fit_rows], labels[fit_rows], l2, steps)
            logits = base[held] * log_s.exp() + photo[held] * w + b
            loss += float(F.cross_entropy(logits, labels[held], reduction="sum"))
            correct += int((logits.argmax(1) == labels[held]).sum())
        cv[l2] = (loss / max(len(rows), 1), correct)
    best = min(cv, key=lambda key: cv[key][0])
    weight, bias, log_scale = _fit_calibration(base[rows], photo[rows], labels[rows], best, steps)
    with torch.no_grad():
        model.photo_weight.copy_(weight)
        model.photo_bias.copy_(bias)
        model.photo_scale.copy_(log_scale.exp())
        base_correct = int((base.argmax(1) == labels).sum())
        no_photo_correct = int((base[~present].argmax(1) == labels[~present]).sum())
        after_logits = torch.where(present[:, None], base * log_scale.exp() + photo * weight + bias, base)
        after = float((after_logits.argmax(1) == labels).float().mean())
    n = max(len(labels), 1)
    return {
        "mode": "val",
        "fitted_on": int(len(rows)),
        "l2": best,
        "cv_folds": folds,
        "cv_loss_by_l2": {str(k): round(v[0], 4) for k, v in cv.items()},
        "mean_weight": round(float(weight.mean()), 4),
        "fused_scale": round(float(log_scale.exp()), 4),
        "val_accuracy_before": round(base_correct / n, 4),
        "val_cv_accuracy_after": round((cv[best][1] + no_photo_correct) / n, 4),  # honest: held-out folds
        "val_accuracy_after_in_sample": round(after, 4),
    }


def _multimodal_wide(
    params: Mapping[str, Any],
    use_wide: bool,
    wide_opt: Mapping[str, float] | None,
    text_loaded: Any,
    train_texts: Sequence[str],
    n_classes: int,
) -> tuple[models.WideFeaturizer | None, models.WideLinear | None, str]:
    """The multimodal model's wide branch: (featurizer, layer, where they come from).

    If the text tower has a wide branch, its fitted vectoriser is reused and the layer starts
    from the tower's weights (`wide_init: tower`, default; `zero` starts from 0): the fusion head
    then learns what the photo and the text embedding add to the lexical logits. Without one,
    a vectoriser is fitted on the train texts with `train.multimodal.wide_*` settings.
    """
    if not use_wide:
        return None, None, ""
    init = require_choice(params["wide_init"], "train.multimodal.wide_init", ("tower", "zero"))
    tower_wide = getattr(text_loaded.module, "wide", None)
    dropout = float(wide_opt["dropout"]) if wide_opt else 0.0
    if text_loaded.wide is not None and tower_wide is not None:
        featurizer = text_loaded.wide
        wide = models.WideLinear(featurizer.n_features, n_classes, dropout)
        if init == "tower":
            with torch.no_grad():
                wide.bag.weight.copy_(tower_wide.bag.weight)
        return featurizer, wide, f"the text tower's vectoriser ({'weights from the text tower' if init == 'tower' else 'weights from zero'})"
    featurizer = models.WideFeaturizer.fit(list(train_texts), wide_settings(params, "multimodal"))
    return featurizer, models.WideLinear(featurizer.n_features, n_classes, dropout), "fitted on the train split (the text tower has no wide branch)"
