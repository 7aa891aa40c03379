"""The one training loop of every neural model: settings, reproducibility, checkpoints/resume.

Why one loop: seeding, device and mixed precision, the LR schedule, early stopping,
checkpoints/resume, the progress bar and the per-epoch callback behave the same for the
image, text and multimodal models (pipeline_steps/recipe_*.py), and are tested once.

* Device: `train.device` auto -> CUDA (with torch.autocast mixed precision when
  `train.mixed_precision`) if present, else CPU; the same code runs on both.
* Reproducible: seeded (python, numpy, torch), deterministic algorithms where
  torch has them, and each epoch's shuffling comes from a generator seeded by
  (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
* Checkpoint each epoch at `train.checkpoints_dir/<kind>/last.pt` (model, optimizer,
  scheduler, scaler, epoch, RNG states, history, best weights); `resume=True`
  continues from it when its fingerprint (params + data) matches. Only the last one is
  kept: each is complete, older ones would only cost disk.
* Early stopping on validation loss; the model is left with the best-val-loss weights.
* Data-parallel when torch.distributed is initialised (the train stage under torchrun,
  `train.distributed.nproc` > 1, pipeline_steps/ddp_worker.py): the trained module is wrapped in
  DistributedDataParallel, each rank trains on its DistributedSampler slice of every epoch
  (seeded by (seed, epoch) on every rank), rank 0 evaluates the val split and broadcasts the
  loss so every rank takes the same early-stopping decision, and only rank 0 writes checkpoints
  and calls `on_epoch_end`. Without torch.distributed (nproc 1) none of this runs.

MLflow is not imported here: the flow passes `on_epoch_end` to log metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from pipeline_steps.config import require_choice, resolve_path
from pipeline_steps.errors import ConfigError, PipelineError
from pipeline_steps.io_utils import atomic_path
from pipeline_steps.train_params import checked_number, required_key

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
#: the layout of a checkpoint file (last.pt).
CHECKPOINT_FORMAT = 1
LR_SCHEDULES = ("onecycle", "cosine")
#: `train.distributed.lr_scaling`: the learning rate with N processes (effective batch x N).
LR_SCALINGS = ("linear", "sqrt", "none")
DEVICES = ("auto", "cpu", "cuda")
#: shared keys that do not change what is learned, so a checkpoint may be resumed across them.
RUNTIME_KEYS = ("device", "num_workers", "num_threads", "mixed_precision", "models_dir", "checkpoints_dir", "features_dir")


# --------------------------------------------------------------------------- settings


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
    lr_scale: float = 1.0  # every group's lr is multiplied by this (`lr_scale`: several processes)


def resolve_device(name: Any) -> torch.device:
    """The torch device of `train.device`.

    Args:
        name: auto (CUDA when torch sees one, else CPU), cpu or cuda.

    Returns:
        The device.

    Raises:
        ConfigError: an unknown name, or cuda without a CUDA device.
    """
    require_choice(name, "train.device", DEVICES)
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("params.yaml key 'train.device' is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def loop_settings(params: Mapping[str, Any], kind: str, progress: bool = True) -> LoopSettings:
    """Read and check the loop's knobs of one model, before any data is read.

    Args:
        params: the model's flat params (`train_params.model_params`).
        kind: image, text or multimodal (names the keys and the checkpoint folder).
        progress: show a progress bar per epoch.

    Returns:
        The settings, without a fingerprint yet (the recipe adds it once the data is known).

    Raises:
        ConfigError: a knob is missing or out of range, naming its params.yaml key.
    """
    return LoopSettings(
        kind=kind,
        epochs=checked_number(params, "epochs", kind, minimum=1, integer=True),
        batch_size=checked_number(params, "batch_size", kind, minimum=1, integer=True),
        seed=checked_number(params, "seed", kind, integer=True),
        device=resolve_device(required_key(params, "device", "train.device")),
        mixed_precision=bool(required_key(params, "mixed_precision", "train.mixed_precision")),
        patience=checked_number(params, "early_stopping_patience", kind, minimum=1, integer=True),
        lr_schedule=require_choice(required_key(params, "lr_schedule", "train.lr_schedule"), "train.lr_schedule", LR_SCHEDULES),
        num_workers=checked_number(params, "num_workers", kind, integer=True),
        num_threads=(
            checked_number(params, "num_threads", kind, minimum=1, integer=True)
            if required_key(params, "num_threads", "train.num_threads") is not None
            else None
        ),
        checkpoint_dir=resolve_path(required_key(params, "checkpoints_dir", "train.checkpoints_dir")) / kind,
        grad_clip=checked_number(params, "grad_clip", kind),
        label_smoothing=checked_number(params, "label_smoothing", kind),
        progress=progress,
    )


def fingerprint(payload: Any) -> str:
    """sha256 hex digest of `payload` as sorted JSON (what is not JSON is written as str())."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def run_fingerprint(kind: str, params: Mapping[str, Any], data_ids: Any, world_size: int = 1, lr_scale: float = 1.0) -> str:
    """What a checkpoint must match to be resumed: the model's params (runtime keys aside) and its data.

    Args:
        kind: image, text or multimodal.
        params: the model's flat params (`train_params.model_params`).
        data_ids: what identifies the training data (example ids, classes, tower hashes...).
        world_size: processes training together (`Ranks.world`): their number sets the steps per
            epoch and the LR schedule, so a checkpoint resumes only with as many; 1 adds nothing,
            so single-process fingerprints are those of before.
        lr_scale: what the learning rates are multiplied by (`lr_scale`), with several processes.

    Returns:
        A sha256 hex digest.
    """
    payload = {"kind": kind, "params": {k: v for k, v in params.items() if k not in RUNTIME_KEYS}, "data": data_ids}
    return fingerprint(payload if world_size == 1 else {**payload, "world_size": world_size, "lr_scale": lr_scale})


# --------------------------------------------------------------------------- processes (torch.distributed)


@dataclass(frozen=True)
class Ranks:
    """This process's rank among the `world` processes training together (0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that evaluates, writes checkpoints and the model directory."""
        return self.rank == 0


def ranks() -> Ranks:
    """The rank and world size of torch.distributed's default group, or `Ranks()` when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


@contextmanager
def main_rank_first() -> Iterator[None]:
    """Rank 0 runs the block, then the other ranks do: e.g. rank 0 fills a feature cache that the others
    then read instead of computing it again at the same time. A no-op in a single process."""
    here = ranks()
    if here.world > 1 and not here.main:
        dist.barrier()
    yield
    if here.world > 1 and here.main:
        dist.barrier()


def lr_scale(train_params: Mapping[str, Any], world: int) -> float:
    """The learning-rate factor of `world` processes: `train.distributed.lr_scaling` linear (x world, the
    linear scaling rule for an effective batch `world` times larger), sqrt (x sqrt(world)) or none.
    1 for one process, whatever the key says (it is then not read).

    Args:
        train_params: params.yaml's `train:` section (or the whole params).
        world: processes training together.

    Raises:
        ConfigError: (world > 1) `train.distributed.lr_scaling` missing or unknown.
    """
    if world == 1:
        return 1.0
    train = train_params["train"] if isinstance(train_params.get("train"), Mapping) else train_params
    section = required_key(train, "distributed", "train.distributed")
    scaling = require_choice(required_key(section, "lr_scaling", "train.distributed.lr_scaling"), "train.distributed.lr_scaling", LR_SCALINGS)
    return {"linear": float(world), "sqrt": math.sqrt(world), "none": 1.0}[scaling]


def _from_main_rank(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's `values` on every rank (so every rank takes rank 0's decisions)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def _summed_over_ranks(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# --------------------------------------------------------------------------- reproducibility


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators with `seed` (numpy's modulo 2**32)."""
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
    """Every global generator's state, as tensors and plain values (a checkpoint loads with weights_only)."""
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


# --------------------------------------------------------------------------- the loop


@dataclass
class FitOutcome:
    """How `fit` went: the per-epoch metrics, the best epoch and whether early stopping ended it."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    seconds: float


def to_device(inputs: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's input tensors on `device`."""
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


def _loader(dataset: Dataset, settings: LoopSettings, collate: Callable, shuffle: bool, epoch: int = 0, here: Ranks = Ranks()) -> DataLoader:
    """A loader over `dataset`; shuffled per epoch by (seed, epoch), and with several ranks (`here`), this
    rank's DistributedSampler slice (every rank gets as many examples, so as many steps)."""
    sampler = None
    if shuffle and here.world > 1:
        sampler = DistributedSampler(dataset, num_replicas=here.world, rank=here.rank, shuffle=True, seed=settings.seed * 100_003)
        sampler.set_epoch(epoch)
    n = len(sampler) if sampler is not None else len(dataset)
    drop_last = shuffle and n > settings.batch_size and n % settings.batch_size == 1
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch) if shuffle and sampler is None else None
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
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
            logits = model(**to_device(inputs, device))
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += len(labels)
    return total_loss / max(count, 1), correct / max(count, 1)


def _checkpoint_path(settings: LoopSettings) -> Path:
    return settings.checkpoint_dir / "last.pt"


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `model`'s state dict on the CPU (what a checkpoint and model.pt store)."""
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

    Args:
        model: what trains; its frozen parameters (requires_grad off) are left out of the optimizer.
        param_groups: AdamW groups with their own lr/weight_decay (e.g. encoder vs head).
        train_set: training examples, shuffled per epoch by a generator seeded with (seed, epoch).
        val_set: validation examples (early stopping and the best epoch follow their loss).
        collate: batches examples into `(inputs, labels)`.
        settings: `loop_settings` with the run's fingerprint.
        resume: continue from the checkpoint in `settings.checkpoint_dir` if there is one.
        on_epoch_end: called with (epoch, metrics) after each epoch's checkpoint is written (on rank 0 only).

    Under torch.distributed (torchrun) every rank calls `fit` with the same arguments and seed: the
    module trains wrapped in DistributedDataParallel on each rank's slice of the train set (so an
    epoch is 1/world of the steps, with gradients averaged over the ranks), rank 0 evaluates and
    broadcasts the val loss, and only rank 0 writes the checkpoint (module docstring).

    Returns:
        The history and best epoch; `model` holds the best weights, in eval mode.

    Raises:
        PipelineError: `resume` found a checkpoint written for other params or data.
    """
    here = ranks()
    device, amp = settings.device, settings.mixed_precision and settings.device.type == "cuda"
    if here.world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # the worker set LOCAL_RANK's GPU
    model.to(device)
    forward = model  # what the training steps call: the model, or its DistributedDataParallel wrapper
    if here.world > 1:
        # find_unused_parameters: a batch may skip a branch (modality dropout, a listing without photo)
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in param_groups]
    if settings.lr_scale != 1:  # several processes: train.distributed.lr_scaling (`lr_scale`)
        groups = [{**group, "lr": group["lr"] * settings.lr_scale} for group in groups]
    optimizer = torch.optim.AdamW([group for group in groups if group["params"]])
    steps_per_epoch = _steps_per_epoch(math.ceil(len(train_set) / here.world), settings.batch_size)
    scheduler = _make_scheduler(optimizer, settings.lr_schedule, steps_per_epoch * settings.epochs)
    amp_fp16 = amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=amp_fp16)

    history: list[dict[str, float]] = []
    best_state, best_epoch, best_val_loss, bad_epochs, stopped_early = cpu_state(model), 0, math.inf, 0, False
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
        forward.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            _loader(train_set, settings, collate, shuffle=True, epoch=epoch, here=here),
            desc=f"{settings.kind} {epoch + 1}/{settings.epochs}",
            total=steps_per_epoch,
            disable=not settings.progress or not here.main,
            leave=False,
        )
        for inputs, labels in bar:
            labels = labels.to(device, non_blocking=True)
            with _autocast(device, amp):
                logits = forward(**to_device(inputs, device))
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
        if here.world == 1:
            val_loss, val_accuracy = evaluate_loss(model, val_loader, device, amp)
        else:  # rank 0 evaluates (the whole val split): every rank then stops, or not, on the same loss
            val_loss, val_accuracy = _from_main_rank(list(evaluate_loss(model, val_loader, device, amp)) if here.main else [0.0, 0.0], device)
            loss_sum, correct, seen = _summed_over_ranks([loss_sum, correct, seen], device)  # the epoch over all ranks
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
            best_state, best_epoch, best_val_loss, bad_epochs = cpu_state(model), epoch, val_loss, 0
        elif epoch > warmup:  # epochs ending during the LR warm-up do not count towards patience
            bad_epochs += 1
            stopped_early = bad_epochs >= settings.patience and epoch < settings.epochs
        log.info(
            "%s epoch %d/%d: train_loss %.4f acc %.3f | val_loss %.4f acc %.3f (%.1fs)",
            settings.kind, epoch, settings.epochs, metrics["train_loss"], metrics["train_accuracy"], val_loss, val_accuracy, seconds,
        )
        if here.main:
            _save_checkpoint(
                checkpoint_file,
                {
                    "format": CHECKPOINT_FORMAT,
                    "kind": settings.kind,
                    "fingerprint": settings.fingerprint,
                    "epoch": epoch,
                    "seconds": spent,
                    "model": cpu_state(model),
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
        if on_epoch_end is not None and here.main:
            on_epoch_end(epoch, dict(metrics))
        if stopped_early:
            log.info("%s: early stop after epoch %d (best val_loss %.4f at epoch %d)", settings.kind, epoch, best_val_loss, best_epoch)

    model.load_state_dict(best_state)
    model.eval()
    return FitOutcome(history, best_epoch, best_val_loss, stopped_early, spent)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a crash mid-write leaves the previous one."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


