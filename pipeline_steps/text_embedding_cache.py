"""Pooled text-encoder vectors of many texts, computed once and cached on disk.

Why: with a frozen encoder (text `fine_tune: false`, multimodal `fine_tune_towers: false`)
only the head trains, on vectors the encoder gives for each product's text. Encoding is the
slow part (minutes on CPU) and its result only changes when the encoder, max_length or the
texts do, so re-runs and the multimodal model (which reuses the text tower) read it back.
The cache lives under `train.checkpoints_dir/embedding_cache`.
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
            return stored["embeddings"]
    embeddings = encode_texts(encoder, tokenizer, texts, max_length, device, progress=progress)
    with atomic_path(path) as tmp:
        torch.save({"key": key, "identity": dict(identity), "embeddings": embeddings}, tmp)
    return embeddings
