"""The image model's recipe: a photo classifier (one example per photo), and how its search vector is chosen.

Why a module of its own: what only the image model does lives here, the sequence every model
shares in training_recipe.run_recipe. `train.image.mode` frozen: the backbone's pooled
features are computed once per photo (cached in `train.image.features_dir`; the index stage
reuses them) and only the head trains; tail: an EfficientNet-Lite is split into a frozen prefix,
whose output maps are cached per photo the same way, and a tail (its last `tail_blocks` blocks +
head conv) that trains with the head on those maps (randomly flipped) - a partial fine-tune at
the frozen mode's cost per photo; fine_tune: the last `trainable_blocks` blocks (or all) train on
the photos with augmentation, mixed precision on CUDA. After training, the photo index's vector
(backbone features or the head's penultimate layer) is chosen on the val split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline_steps import datasets as ds
from pipeline_steps import image_features, models, photo_neighbours
from pipeline_steps.clean_schema import IMAGES_FILE
from pipeline_steps.config import require_choice, resolve_path
from pipeline_steps.errors import ConfigError
from pipeline_steps.train_params import checked_number
from pipeline_steps.training_loop import LoopSettings, fingerprint, loop_settings
from pipeline_steps.training_recipe import ParamGroup, Recipe, param_group

log = logging.getLogger(__name__)

IMAGE_MODES = ("auto", "frozen", "tail", "fine_tune")
SEARCH_EMBEDDINGS = ("auto", "backbone", "head")


def _clean_image_size(data: ds.CleanData, paths: Sequence[Path]) -> int | None:
    """Side of the (square) clean photos, so inference can letterbox raw photos the same way."""
    if not len(paths):
        return None
    width, height = ds.load_rgb(paths[0]).size
    return width if width == height else None


def image_features_dir(params: Mapping[str, Any]) -> Path:
    """`train.image.features_dir`: the frozen backbone's feature cache (train_image stage output).

    Args:
        params: the image model's flat params.

    Returns:
        The folder, resolved against the repository root.
    """
    return resolve_path(params["features_dir"])


def resolve_image_mode(value: Any, device: torch.device, pretrained: bool = True, backbone: str | None = None) -> str:
    """auto on CPU with pretrained weights: tail for an EfficientNet-Lite (its cached prefix makes a
    partial fine-tune cost minutes), frozen for a torchvision backbone; fine-tuning on CUDA. A randomly
    initialised backbone (weights: null) is always trained (freezing random features learns nothing).

    Args:
        value: `train.image.mode` (auto, frozen, tail or fine_tune).
        device: where training runs.
        pretrained: whether the backbone starts from pretrained weights.
        backbone: `train.image.backbone` (tail needs an EfficientNet-Lite).

    Returns:
        frozen, tail or fine_tune.

    Raises:
        ConfigError: an unknown mode, or tail with a backbone that cannot be split.
    """
    mode = require_choice(value if value is not None else "auto", "train.image.mode", IMAGE_MODES)
    splittable = backbone is None or backbone in models.PACKAGED_WEIGHTS
    if mode == "tail" and not splittable:
        raise ConfigError(
            f"params.yaml key 'train.image.mode': tail needs an EfficientNet-Lite backbone ({', '.join(models.PACKAGED_WEIGHTS)}), "
            f"got '{backbone}'; use frozen or fine_tune"
        )
    if mode != "auto":
        return mode
    if device.type == "cuda" or not pretrained:
        return "fine_tune"
    return "tail" if splittable else "frozen"


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
    of them in the query's category. The same rule as the index stage's metric.

    Args:
        vectors: one row per photo.
        labels: each row's class.
        products: each row's product id.
        queries: the row numbers that query.
        k: neighbours per query.

    Returns:
        The mean share of same-category neighbours (0 without any).
    """
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
    photos. Both are scored and recorded even when `choice` forces one.

    Args:
        model: the trained image model (put in eval mode on the CPU).
        features: the backbone features of `frame`'s photos.
        frame: images.parquet rows (label, product_id, split) of those photos.
        choice: `train.image.search_embedding` (auto, backbone or head).
        k: neighbours per query.

    Returns:
        config.json's `search_embedding` record (the vector, its dim, both scores).
    """
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


class TailHead(nn.Module):
    """The trainable part of a tail-mode image model: the backbone's tail + embedding + classifier on
    the frozen prefix's stored maps. Training flips half of a batch's maps left-right when
    `horizontal_flip` is among the augmentations (the conv stack is nearly flip-equivariant, so this
    stands in for flipping the photo). BatchNorm keeps its pretrained statistics."""

    def __init__(self, model: models.ImageClassifier, flip: bool) -> None:
        super().__init__()
        self.model, self.flip = model, flip

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        maps = maps.float()
        if self.training and self.flip:
            flipped = torch.rand(len(maps), device=maps.device) < 0.5
            maps = torch.where(flipped.view(-1, 1, 1, 1), maps.flip(3), maps)
        return self.model.head_logits(self.model.backbone.tail(maps))

    def train(self, mode: bool = True) -> TailHead:
        self.model.train(mode)  # ImageClassifier.train keeps the frozen norms (all of the backbone's) in eval mode
        self.training = mode
        return self


class ImageRecipe(Recipe):
    """The photo classifier: models.ImageClassifier, one example per photo (docstring of the module)."""

    kind, examples, table = "image", "photos", IMAGES_FILE

    def __init__(self, train_params: Mapping[str, Any], progress: bool = True) -> None:
        """Check every `train.image` knob and the loop's, before any data is read (Args: `Recipe`)."""
        super().__init__(train_params, progress)
        params = self.params
        self.backbone = models.check_backbone(params["backbone"])
        self.weights_spec = models.describe_weights(self.backbone, params["weights"])
        self.augmentation = models.check_augmentation(params["augmentation"])
        require_choice(params["freeze_backbone"], "train.image.freeze_backbone", models.FREEZE_CHOICES)
        self.search_choice = require_choice(params["search_embedding"], "train.image.search_embedding", SEARCH_EMBEDDINGS)
        self.trainable_blocks = _trainable_blocks(params)
        self.lr, self.weight_decay = checked_number(params, "lr", "image"), checked_number(params, "weight_decay", "image")
        self.settings = loop_settings(params, "image", progress)
        self.mode = resolve_image_mode(params["mode"], self.settings.device, self.weights_spec["type"] != "none", self.backbone)
        self.tail_blocks = checked_number(params, "tail_blocks", "image", minimum=0, integer=True)
        self.backbone_lr = checked_number(params, "backbone_lr", "image")
        models.build_image_preprocessor(params, self.weights_spec)  # checks input_size before any data is read
        self.feature_stats = image_features.FeatureStats()
        self.neighbour_settings = photo_neighbours.check_settings(params["neighbours"])
        self.neighbours: photo_neighbours.NeighbourVote | None = None

    def labels(self, data: ds.CleanData, split: str) -> list[int]:
        return data.images_of(split)["label"].tolist()

    def build(self, data: ds.CleanData) -> nn.Module:
        self.model = models.build_image_classifier({**self.params, "freeze_backbone": False}, len(data.classes))
        train_frame = data.images_of("train")
        source_size = _clean_image_size(data, [data.clean_dir / p for p in train_frame["path"][:1]])
        self.preprocessor = models.build_image_preprocessor(self.params, self.weights_spec, source_size)
        return self.model

    def data_identity(self, data: ds.CleanData) -> list[Any]:
        ids = {s: data.images_of(s)["image_id"].astype(str).tolist() for s in ("train", "val")}
        return [fingerprint(ids), data.classes, self.weights_spec, self.mode]

    def trainable(self) -> tuple[nn.Module, list[ParamGroup]]:
        model = self.model
        if self.mode == "tail":
            tail = model.split_backbone(int(self.tail_blocks))
            head = [*model.embedding.parameters(), *model.classifier.parameters()]
            groups = [param_group(head, self.lr, self.weight_decay), param_group(tail, self.backbone_lr, self.weight_decay)]
            return TailHead(model, "horizontal_flip" in self.augmentation), groups
        if self.mode == "frozen":
            model.freeze_backbone()
            head = [*model.embedding.parameters(), *model.classifier.parameters()]
            return FeatureHead(model), [param_group(head, self.lr, self.weight_decay)]
        freeze = self.params["freeze_backbone"]
        if self.trainable_blocks != "all" and (freeze is True or (freeze == "auto" and self.weights_spec["type"] != "none")):
            model.freeze_all_but_last_block(int(self.trainable_blocks))
        return model, [param_group(model.parameters(), self.lr, self.weight_decay)]

    def datasets(self, data: ds.CleanData, settings: LoopSettings) -> tuple[Dataset, Dataset, Callable]:
        if self.mode in ("frozen", "tail"):
            self.frame = frame = data.images_of(None)  # every split: the index stage reuses the test photos' features
            stored = image_features.backbone_features(
                self.backbone, self.model.backbone, self.preprocessor, [data.clean_dir / rel for rel in frame["path"]],
                cache_dir=image_features_dir(self.params), device=settings.device, progress=self.progress, stats=self.feature_stats,
                maps=self.mode == "tail",
            )
            self.features, self.maps = (None, stored) if self.mode == "tail" else (stored, None)
            name = "maps" if self.mode == "tail" else "features"
            split = frame["split"].to_numpy()
            train_set, val_set = (
                ds.TensorDictDataset({name: stored[torch.from_numpy(split == s)]}, frame.loc[split == s, "label"].tolist())
                for s in ("train", "val")
            )
            return train_set, val_set, ds.collate_tensor_dicts
        # trained end to end: nothing to cache, but the folder is the train_image stage's declared output
        # (dvc.yaml), so it exists, empty, as `dvc repro` expects (the CUDA default and random-init backbones)
        image_features_dir(self.params).mkdir(parents=True, exist_ok=True)
        train_set = ds.image_dataset(data, "train", models.TrainImageTransform(self.preprocessor, self.augmentation))
        val_set = ds.image_dataset(data, "val", self.preprocessor)
        return train_set, val_set, ds.collate_images

    def after_fit(self, data: ds.CleanData, settings: LoopSettings, trained: nn.Module, val_set: Dataset) -> None:
        """Choose the photo index's vector on val (fine-tuned: the trained backbone's features first)."""
        if self.mode == "tail":
            self.features = image_features.pooled_from_maps(self.model.backbone, self.maps, settings.device)
            self.maps = None
        elif self.mode != "frozen":
            frame = data.images_of(None)
            self.frame = frame[frame["split"].isin(["train", "val"])].reset_index(drop=True)
            self.features = image_features.extract(
                self.model.backbone, self.preprocessor, [data.clean_dir / rel for rel in self.frame["path"]], settings.device, progress=self.progress
            )
        self.search = choose_search_embedding(self.model, self.features, self.frame, self.search_choice)
        log.info("image search embedding: %s (val precision@10 %s)", self.search["vector"], self.search["val_precision_at_10"])
        if self.neighbour_settings["weight"] > 0:
            train = np.array(self.frame["split"] == "train")
            self.neighbours = photo_neighbours.NeighbourVote.fit(
                self.features[torch.from_numpy(train)], self.frame.loc[train, "label"].to_numpy(), len(data.classes), self.neighbour_settings
            )

    def _augmentation_used(self) -> list[str]:
        if self.mode == "fine_tune":
            return list(self.augmentation)
        if self.mode == "tail" and "horizontal_flip" in self.augmentation:
            return ["horizontal_flip (of the prefix's stored maps)"]
        return []

    def saved_files(self) -> dict[str, Any]:
        return {"neighbours": self.neighbours}

    def saved_config(self, data: ds.CleanData) -> dict[str, Any]:
        model, params, stats = self.model, self.params, self.feature_stats
        frozen = not any(p.requires_grad for p in model.backbone.parameters())
        return {
            "embedding_dim": self.search["dim"],
            "search_embedding": self.search,
            "neighbours": None if self.neighbours is None else self.neighbours.record(),
            "architecture": {
                "type": "ImageClassifier",
                "backbone": self.backbone,
                "feature_dim": model.feature_dim,
                "embedding_dim": model.embedding_dim,
                "dropout": float(params["dropout"]),
                "feature_dropout": float(params["feature_dropout"]),
                "n_classes": len(data.classes),
                "initial_weights": self.weights_spec,
                "mode": self.mode,
                "tail_blocks": int(self.tail_blocks) if self.mode == "tail" else None,
                "split_at": model.backbone.split_at if self.mode == "tail" else None,
                "frozen_backbone": frozen,
                "trainable_backbone_modules": [] if frozen else [n for n, m in model.backbone.named_modules() if n and any(p.requires_grad for p in m.parameters(recurse=False))][:50],
                "embedding": "ReLU(Linear(backbone features)): the penultimate layer",
            },
            "preprocessing": {"image": self.preprocessor.to_config(), "augmentation": self._augmentation_used()},
            "features": {"cache_file": stats.cache_file, "photos": stats.total, "reused": stats.reused, "computed": stats.computed},
        }
