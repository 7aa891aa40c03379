"""The image model's neighbour vote: its head's prediction times the labels of the nearest train photos.

Why it exists: a listing's photo often looks like a few training photos of the same kind of item
(another seller's pram, the same model of phone) that the classifier head, trained to separate all
13 categories at once, still gets wrong. The labels of the photo's `k` nearest training photos, in
the same pooled backbone space the photo index searches, are evidence the head does not use. On
the real listings this vote, multiplied into the head's probabilities, lifts per-product accuracy
from 62.7% to 65.7% on the val split and from 59.2% to 60.6% on test (benchmarks/photo_neighbours_probe.py
chose the settings, params.yaml `train.image.neighbours`; benchmarks/real_data_report.py scored test).

How: the train photos' unit-length pooled features and labels are stored with the model
(`neighbours.npz` beside model.pt, written by the training that produced them). For a query photo
with features f, the vote for class c is the sum of exp((cos(f, m) - 1) / temperature) over its k
nearest stored photos m of class c, normalised to a distribution and mixed with a uniform prior
(`smoothing`) so a class no neighbour has keeps a finite score. The blended logits are

    log_softmax(head logits) + weight * log(vote)

(a product of experts; weight 0 = the head alone). A photo that is itself in the store (a train
photo) finds itself at cosine 1: its vote is not a fair estimate, which is why evaluation scores
val and test photos only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline_steps.errors import PipelineError
from pipeline_steps.io_utils import write_bytes

FILE = "neighbours.npz"
KEYS = ("k", "temperature", "smoothing", "weight")


def check_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """`train.image.neighbours` as numbers, checked.

    Args:
        params: the section (k, temperature, smoothing, weight).

    Returns:
        The same keys with typed values.

    Raises:
        PipelineError: a key is missing or out of range, naming it and what it accepts.
    """
    missing = [key for key in KEYS if key not in params]
    if missing:
        raise PipelineError(f"train.image.neighbours is missing {missing} (expected keys: {list(KEYS)})")
    k, temperature, smoothing, weight = int(params["k"]), float(params["temperature"]), float(params["smoothing"]), float(params["weight"])
    if k < 1:
        raise PipelineError(f"train.image.neighbours.k must be >= 1, got {k}")
    if temperature <= 0:
        raise PipelineError(f"train.image.neighbours.temperature must be > 0, got {temperature}")
    if not 0 < smoothing <= 1:
        raise PipelineError(f"train.image.neighbours.smoothing must be in (0, 1], got {smoothing}")
    if weight < 0:
        raise PipelineError(f"train.image.neighbours.weight must be >= 0 (0 = the head alone), got {weight}")
    return {"k": k, "temperature": temperature, "smoothing": smoothing, "weight": weight}


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    vectors = vectors.float()
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class NeighbourVote:
    """The stored train photos (unit rows, labels) and the vote's settings."""

    vectors: torch.Tensor  # (n, d) float32, unit length
    labels: torch.Tensor  # (n,) int64
    n_classes: int
    k: int
    temperature: float
    smoothing: float
    weight: float

    @classmethod
    def fit(cls, features: torch.Tensor | np.ndarray, labels: Any, n_classes: int, settings: Mapping[str, Any]) -> NeighbourVote:
        """Store the train photos' pooled features and labels.

        Args:
            features: (n, d) pooled backbone features of the train photos.
            labels: their class codes.
            n_classes: how many classes the model has.
            settings: `check_settings`'s output.

        Returns:
            The vote, ready for `log_vote` / `blend`.
        """
        vectors = features.detach().float().cpu() if isinstance(features, torch.Tensor) else torch.tensor(np.array(features, dtype=np.float32))
        codes = torch.tensor(np.array(labels, dtype=np.int64))
        if vectors.ndim != 2 or len(vectors) != len(codes) or len(codes) == 0:
            raise ValueError(f"need (n, d) features with n labels (n >= 1); got {tuple(vectors.shape)} and {len(codes)} labels")
        return cls(_unit(vectors), codes, int(n_classes), **{key: settings[key] for key in KEYS})

    def log_vote(self, features: torch.Tensor) -> torch.Tensor:
        """(m, n_classes) log of the smoothed neighbour vote of each query row of `features`."""
        queries = _unit(features.to(self.vectors.device))
        scores = queries @ self.vectors.T
        k = min(self.k, scores.shape[1])
        sims, rows = scores.topk(k, dim=1)
        # exp((cos - 1) / T), shifted by the row's best cosine: the same vote once normalised, and no
        # underflow to an all-zero row when every neighbour is far (cos - 1 < -87 T in float32)
        weights = torch.exp((sims - sims[:, :1]) / self.temperature)
        vote = torch.zeros(len(queries), self.n_classes, dtype=torch.float32, device=queries.device)
        vote.scatter_add_(1, self.labels[rows], weights)
        vote = vote / vote.sum(dim=1, keepdim=True).clamp_min(1e-30)
        return torch.log((1.0 - self.smoothing) * vote + self.smoothing / self.n_classes)

    def blend(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The head's logits with the neighbour vote multiplied in (log-probabilities, up to a constant)."""
        if self.weight == 0:
            return logits
        log_head = torch.log_softmax(logits.float(), dim=1)
        return log_head + self.weight * self.log_vote(features).to(log_head.device)

    def to(self, device: str | torch.device) -> NeighbourVote:
        """Move the stored photos to `device` (where the model's features are computed)."""
        self.vectors, self.labels = self.vectors.to(device), self.labels.to(device)
        return self

    def record(self) -> dict[str, Any]:
        """config.json's `neighbours` record."""
        return {"file": FILE, "photos": int(len(self.labels)), "dim": int(self.vectors.shape[1]),
                **{key: getattr(self, key) for key in KEYS}, "vectors": "pooled backbone features of the train photos"}

    def save(self, model_dir: str | Path) -> Path:
        """Write `neighbours.npz` (float16 vectors, int16 labels) atomically into `model_dir`."""
        buffer = io.BytesIO()
        np.savez(buffer, vectors=self.vectors.numpy().astype(np.float16), labels=self.labels.numpy().astype(np.int16))
        return write_bytes(Path(model_dir) / FILE, buffer.getvalue())

    @classmethod
    def load(cls, model_dir: str | Path, record: Mapping[str, Any], n_classes: int) -> NeighbourVote:
        """The vote a model directory's config.json `neighbours` record describes.

        Raises:
            PipelineError: the file is missing or does not match the record.
        """
        path = Path(model_dir) / str(record.get("file", FILE))
        if not path.is_file():
            raise PipelineError(f"{model_dir}: config.json has a neighbour vote but {path.name} is missing")
        with np.load(path) as stored:
            vectors, labels = stored["vectors"], stored["labels"]
        if vectors.shape != (int(record["photos"]), int(record["dim"])) or len(labels) != len(vectors):
            raise PipelineError(f"{path}: {vectors.shape[0]} x {vectors.shape[1]} vectors, config.json says {record['photos']} x {record['dim']}")
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise PipelineError(f"{path}: labels outside the model's {n_classes} classes")
        settings = check_settings(record)
        return cls(_unit(torch.from_numpy(vectors.astype(np.float32))), torch.from_numpy(labels.astype(np.int64)), int(n_classes), **settings)
