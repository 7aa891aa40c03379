"""Backbone features of photos, computed once in batches and cached on disk.

With a frozen backbone (`train.image.mode: frozen`; `tail` below is the CPU default) the backbone's pooled
features of a photo never change while its weights, the preprocessing and the photo itself stay
the same. Extracting them is the slow part (EfficientNet-Lite0 at 224 px: ~11 photos/s on two
busy cores), so they are computed once, stored, and reused by the image model's head training,
the multimodal model (its image tower is the same frozen backbone) and the index stage.

Cache layout (`train.image.features_dir`, a persistent output of the train_image stage): one file
per *backbone identity* `<backbone>-<identity[:24]>.pt`, where the identity is a sha256 of the
backbone's own weight tensors + the preprocessing config (input size, normalisation, letterbox).
Inside: `keys` (sha256 of each photo file's bytes) and `features` (n, d) float32. A photo is
looked up by the hash of its bytes, so

* the same photo under another id or split is reused; a changed photo (same id, other bytes) is
  recomputed; other weights or another preprocessing use another file (never mixed);
* new photos are computed and appended (when `write=True`), known ones are read back.

`train.image.mode: tail` caches less of the backbone: the model's backbone is split
(`models.LiteBackbone.split`) into a frozen prefix and a trainable tail, and the cache holds the
prefix's output maps (float16; the file's identity is the prefix's weights, so the trained tail
does not invalidate it). The tail's training reads the maps; every other reader (the index stage,
the multimodal model) gets pooled features, computed from the maps by the trained tail.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline_steps import datasets as ds
from pipeline_steps.errors import ConfigError
from pipeline_steps.io_utils import atomic_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def module_sha256(module: nn.Module) -> str:
    """sha256 of a module's state tensors (names, dtypes, shapes, values): equal iff same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        if value.numel():
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_identity(backbone_name: str, backbone: nn.Module, preprocessing: Mapping[str, Any]) -> str:
    payload = {"format": FORMAT_VERSION, "backbone": backbone_name, "weights": module_sha256(backbone), "preprocessing": dict(preprocessing)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def photo_keys(paths: Sequence[str | Path]) -> list[str]:
    """sha256 of each photo file's bytes (the data half of the cache key)."""
    keys = []
    for path in paths:
        with open(path, "rb") as handle:
            keys.append(hashlib.file_digest(handle, "sha256").hexdigest())
    return keys


@dataclass
class FeatureStats:
    """How a `backbone_features` call was served (tests and logs check reuse)."""

    total: int = 0
    reused: int = 0
    computed: int = 0
    cache_file: str | None = None


def _cache_file(cache_dir: Path, backbone_name: str, identity: str) -> Path:
    return Path(cache_dir) / f"{backbone_name}-{identity[:24]}.pt"


def _read_cache(path: Path, identity: str) -> tuple[list[str], torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt cache is recomputed, not an error
        log.warning("cannot read feature cache %s (%s): recomputing", path, exc)
        return None
    if stored.get("identity") != identity or len(stored.get("keys", [])) != stored["features"].shape[0]:
        log.info("feature cache %s belongs to another backbone/preprocessing: recomputing", path)
        return None
    return list(stored["keys"]), stored["features"]


@torch.inference_mode()
def extract(
    backbone: nn.Module,
    preprocessor: Any,
    paths: Sequence[str | Path],
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
    mixed_precision: bool = True,
) -> torch.Tensor:
    """Pooled backbone features (or a prefix's maps) float32 on CPU, in input order (eval mode, batched).

    The convolutions run in the channels-last layout (`channels_last`): on two CPU cores the
    EfficientNet-Lite2 prefix extracted 1.47x the photos per second that way (BENCHMARKS.md). The
    values are those of the default layout up to float rounding; the module is back in its own
    layout afterwards.
    """
    device = torch.device(device)
    backbone.eval().to(device)
    chunks: list[torch.Tensor] = []
    amp = device.type == "cuda" and mixed_precision
    with channels_last(backbone), tqdm(total=len(paths), desc="backbone features", unit="photo", disable=not progress, mininterval=2.0) as bar:
        for start in range(0, len(paths), batch_size):
            batch = [preprocessor(ds.load_rgb(path)) for path in paths[start : start + batch_size]]
            pixels = torch.stack(batch).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
                out = backbone(pixels)
            chunks.append(out.float().cpu().contiguous())
            bar.update(len(batch))
    if not chunks:
        return torch.zeros((0, 0), dtype=torch.float32)
    return torch.cat(chunks)


@contextmanager
def channels_last(module: nn.Module) -> Iterator[nn.Module]:
    """`module` with its 4-d weights in the channels-last layout while the block runs, back in the
    default layout after it (the trained model's weights are saved and hashed in that one).

    The copies are made outside inference mode: weights re-made inside it would be inference
    tensors, which a later training step could not use."""
    with torch.inference_mode(False):
        module.to(memory_format=torch.channels_last)
    try:
        yield module
    finally:
        with torch.inference_mode(False):
            module.to(memory_format=torch.contiguous_format)


def _cached_part(backbone: nn.Module) -> tuple[nn.Module, bool]:
    """What the cache stores: the pooled features of the whole backbone, or, for a backbone split
    into a frozen prefix and a trainable tail (`train.image.mode: tail`), the prefix's output maps."""
    if getattr(backbone, "split_at", None) is not None:
        return backbone.prefix_module(), True
    return backbone, False


@torch.inference_mode()
def pooled_from_maps(backbone: nn.Module, maps: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """A split backbone's pooled features (n, d) from its prefix's stored maps: the tail, batched, eval mode.

    Args:
        backbone: a split `models.LiteBackbone`.
        maps: the prefix's output maps (n, C, H, W), any float dtype.
        device: where the tail runs.
        batch_size: maps per forward pass.

    Returns:
        float32 features on the CPU, in input order.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval().to(device)
    try:
        chunks = [backbone.tail(maps[start : start + batch_size].to(device).float()).float().cpu() for start in range(0, len(maps), batch_size)]
    finally:
        backbone.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros((0, backbone.net._conv_head.out_channels))


def backbone_features(
    backbone_name: str,
    backbone: nn.Module,
    preprocessor: Any,
    paths: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
    write: bool = True,
    stats: FeatureStats | None = None,
    maps: bool = False,
) -> torch.Tensor:
    """Backbone features of `paths` (n, d), read from / added to the cache under `cache_dir`.

    `cache_dir=None`: no cache. `write=False`: read what is there, compute the rest without
    storing it (a stage that does not own the cache, e.g. the index stage). A split backbone
    (`models.LiteBackbone.split`) caches its frozen prefix's output maps (float16) and runs its tail
    on them for the pooled features; `maps=True` returns the maps themselves (the tail's training data).
    """
    stats = stats if stats is not None else FeatureStats()
    stats.total = len(paths)
    module, split = _cached_part(backbone)
    if maps and not split:
        raise ValueError("maps=True needs a split backbone (models.LiteBackbone.split)")
    if cache_dir is None:
        stats.computed = len(paths)
        stored = extract(module, preprocessor, paths, device, batch_size, progress)
        stored = stored.half() if split else stored
    else:
        stored = _cached_features(backbone_name, module, preprocessor, paths, Path(cache_dir), device, batch_size, progress, write, stats, split)
    if split and not maps:
        # the tail runs in the same batches as the backbone would (callers align shards to them:
        # CPU kernels can round a row differently in another batch)
        return pooled_from_maps(backbone, stored, device, batch_size)
    return stored


def _cached_features(
    backbone_name: str, module: nn.Module, preprocessor: Any, paths: Sequence[str | Path], cache_dir: Path,
    device: torch.device | str, batch_size: int, progress: bool, write: bool, stats: FeatureStats, half: bool,
) -> torch.Tensor:
    identity = backbone_identity(backbone_name, module, preprocessor.to_config())
    path = _cache_file(cache_dir, backbone_name, identity)
    stats.cache_file = str(path)
    keys = photo_keys(paths)
    cached = _read_cache(path, identity)
    known: dict[str, int] = {}
    stored_keys: list[str] = []
    stored = torch.zeros((0, 0))
    if cached is not None:
        stored_keys, stored = cached
        known = {key: i for i, key in enumerate(stored_keys)}
    todo = sorted({key: i for i, key in enumerate(keys) if key not in known}.values())
    stats.computed, stats.reused = len(todo), len(paths) - len(todo)
    log.info("backbone features: %d reused from %s, %d to compute", stats.reused, path, stats.computed)
    new = extract(module, preprocessor, [paths[i] for i in todo], device, batch_size, progress) if todo else None
    if new is not None:
        new = new.half() if half else new  # a prefix's maps are large: float16 halves the cache
        for offset, i in enumerate(todo):
            known.setdefault(keys[i], len(stored_keys) + offset)
        stored = torch.cat([stored, new]) if stored.numel() else new
        stored_keys = stored_keys + [keys[i] for i in todo]
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(
                    {"format": FORMAT_VERSION, "identity": identity, "backbone": backbone_name, "keys": stored_keys, "features": stored}, tmp
                )
    if not paths:
        return stored[:0] if stored.numel() else torch.zeros((0, 0))
    # duplicates inside `todo` (same bytes twice) map to the first computed row
    index = torch.tensor([known[key] for key in keys], dtype=torch.long)
    return stored[index].clone()


# --------------------------------------------------------------------------- per-product pooling
# The image model predicts one photo at a time; a listing often has several photos. Its per-product
# prediction pools them: ``mean_log`` (default, `train.image.product_pooling`) = the mean of the photos'
# log-probabilities (the normalised geometric mean: a product of experts over views of one item);
# ``mean`` = the mean of the probabilities. metrics/image.json's `per_product` and the real-data report use it.

PRODUCT_POOLING = ("mean_log", "mean")
DEFAULT_PRODUCT_POOLING = "mean_log"
_EPS = 1e-12


def check_pooling(value: str | None) -> str:
    pooling = DEFAULT_PRODUCT_POOLING if value is None else value
    if pooling not in PRODUCT_POOLING:
        raise ConfigError(f"params.yaml key 'train.image.product_pooling' must be one of {', '.join(PRODUCT_POOLING)}, got {value!r}")
    return pooling


def pool_by_product(
    proba: np.ndarray, product_ids: Sequence[str], labels: Sequence[int], pooling: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(product ids, labels, pooled probabilities) with one row per product, in first-seen order.

    `proba` is (n photos, n classes); rows of a product share its label (the first is kept).
    Pooled rows are probabilities (they sum to 1) for both poolings.
    """
    pooling = check_pooling(pooling)
    proba = np.asarray(proba, dtype=np.float64)
    ids = pd.Series([str(p) for p in product_ids])
    codes, uniques = pd.factorize(ids, sort=False)
    n_products, n_classes = len(uniques), proba.shape[1] if proba.ndim == 2 else 0
    values = np.log(np.clip(proba, _EPS, 1.0)) if pooling == "mean_log" else proba
    sums = np.zeros((n_products, n_classes), dtype=np.float64)
    np.add.at(sums, codes, values)
    counts = np.bincount(codes, minlength=n_products).reshape(-1, 1).astype(np.float64)
    pooled = sums / np.maximum(counts, 1.0)
    if pooling == "mean_log":
        pooled = np.exp(pooled - pooled.max(axis=1, keepdims=True))
        pooled /= pooled.sum(axis=1, keepdims=True)
    first = np.zeros(n_products, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]
    product_labels = np.asarray(labels)[first] if len(codes) else np.asarray(labels)[:0]
    return np.asarray(uniques, dtype=object), product_labels, pooled.astype(np.float32)

