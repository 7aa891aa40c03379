"""Pooled text-encoder vectors of many texts, computed once and cached on disk.

Why: with a frozen encoder (text `fine_tune: false`, multimodal `fine_tune_towers: false`)
only the head trains, on vectors the encoder gives for each product's text. Encoding is the
slow part (minutes on CPU) and its result only changes when the encoder, max_length or the
texts do, so re-runs and the multimodal model (which reuses the text tower) read it back.
The cache lives under `train.checkpoints_dir/embedding_cache`.

Each file also records the sha256 of the encoder's weights, max_length and the sha256 of each
text, so a stage that predicts with a trained model (evaluate, index) can read the vectors of its
own texts back (`stored_text_embeddings`) whatever split or order they were cached in: a model
whose encoder weights differ from the cached ones (fine-tuned) finds nothing and encodes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline_steps import datasets as ds
from pipeline_steps import models
from pipeline_steps.config import resolve_path
from pipeline_steps.image_features import module_sha256
from pipeline_steps.io_utils import atomic_path
from pipeline_steps.training_loop import fingerprint, to_device


def embedding_cache_dir(params: Mapping[str, Any]) -> Path:
    """`<train.checkpoints_dir>/embedding_cache`: where `cached_text_embeddings` stores its files."""
    return resolve_path(params["checkpoints_dir"]) / "embedding_cache"


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

    Args:
        encoder: the (frozen) text encoder.
        tokenizer: its tokenizer.
        texts: the texts, one per example.
        max_length: tokens kept per text.
        device: where to run the encoder.
        batch_size: texts per forward pass.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        (len(texts), encoder.output_dim) float32 on the CPU.
    """
    encoder.eval().to(device)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros((len(texts), encoder.output_dim), dtype=torch.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        index = order[start : start + batch_size]
        tokens = to_device(ds.tokenize(tokenizer, [texts[i] for i in index], max_length), device)
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

    Args:
        cache_dir: the cache folder (`embedding_cache_dir`).
        identity: which encoder weights these are (name, and "pretrained" or the model's sha256).
        encoder, tokenizer, texts, max_length, device, progress: as for `encode_texts`.

    Returns:
        The vectors, read back when the cache holds them, else computed and stored.
    """
    texts_sha = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
    key = fingerprint({"encoder": identity, "max_length": int(max_length), "texts": texts_sha})
    path = Path(cache_dir) / f"text-{key[:32]}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key and stored["embeddings"].shape[0] == len(texts):
            if "text_keys" not in stored:  # written before the per-text lookup: add what it needs
                _write(path, key, identity, stored["embeddings"], encoder, texts, max_length)
            return stored["embeddings"]
    embeddings = encode_texts(encoder, tokenizer, texts, max_length, device, progress=progress)
    _write(path, key, identity, embeddings, encoder, texts, max_length)
    return embeddings


def _write(path: Path, key: str, identity: Mapping[str, Any], embeddings: torch.Tensor, encoder: torch.nn.Module, texts: Sequence[str], max_length: int) -> None:
    record = {
        "key": key, "identity": dict(identity), "embeddings": embeddings,
        "encoder_sha256": module_sha256(encoder), "max_length": int(max_length), "text_keys": text_keys(texts),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(record, tmp)


def text_keys(texts: Sequence[str]) -> list[str]:
    """sha256 of each text's UTF-8 bytes: how `stored_text_embeddings` finds a text's vector."""
    return [hashlib.sha256(str(text).encode()).hexdigest() for text in texts]


def stored_text_embeddings(cache_dir: str | Path, encoder: torch.nn.Module, texts: Sequence[str], max_length: int) -> torch.Tensor | None:
    """The cached vectors of `texts` (in their order), from any file written for these exact encoder
    weights and max_length; None when the cache lacks any of them (the caller then encodes them all).

    All or nothing on purpose: a caller that encodes computes every row in its own batches, so its
    outputs do not depend on what happened to be cached.

    Args:
        cache_dir: the cache folder (`embedding_cache_dir`); missing = nothing cached.
        encoder: the encoder the vectors must come from (compared by the sha256 of its weights).
        texts: the texts, one per row.
        max_length: tokens kept per text.

    Returns:
        (len(texts), d) float32, or None.
    """
    folder = Path(cache_dir)
    if not texts or not folder.is_dir():
        return None
    wanted = text_keys(texts)
    needed, found = set(wanted), {}
    weights = None
    for path in sorted(folder.glob("text-*.pt")):
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if "text_keys" not in stored or stored.get("max_length") != int(max_length):
            continue
        weights = weights or module_sha256(encoder)
        if stored.get("encoder_sha256") != weights:
            continue
        for row, key in enumerate(stored["text_keys"]):
            if key in needed and key not in found:
                found[key] = stored["embeddings"][row]
        if len(found) == len(needed):
            return torch.stack([found[key] for key in wanted]).float()
    return None
