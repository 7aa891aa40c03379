"""The multimodal model's recipe: image + text of a product (one example per product) from the trained towers.

Why a module of its own: what only the multimodal model does lives here, the sequence every
model shares in training_recipe.run_recipe. A product's photos are averaged into one image
embedding (`image_pooling: mean`): one example per product gives the same weighting as the
text model, and a listing with ten photos does not count ten times. With
`fine_tune_towers: false` the towers stay as trained and only the fusion head learns, on
tower embeddings computed once (the image tower's features come from the image model's
feature cache, the text vectors from text_embedding_cache); the photo term may then be
calibrated on val (photo_calibration).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline_steps import datasets as ds
from pipeline_steps import image_features, models
from pipeline_steps.clean_schema import LABELS_FILE, PRODUCTS_FILE
from pipeline_steps.config import require_choice
from pipeline_steps.errors import PipelineError
from pipeline_steps.io_utils import file_sha256
from pipeline_steps.photo_calibration import PHOTO_CALIBRATIONS, fit_photo_calibration
from pipeline_steps.recipe_image import image_features_dir
from pipeline_steps.text_embedding_cache import cached_text_embeddings, embedding_cache_dir
from pipeline_steps.train_params import checked_number, model_params
from pipeline_steps.training_loop import LoopSettings, fingerprint, loop_settings
from pipeline_steps.training_recipe import ParamGroup, Recipe, param_group
from pipeline_steps.wide_branch import wide_architecture, wide_enabled, wide_optimizer_settings, wide_param_groups, wide_settings

log = logging.getLogger(__name__)


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

    Args:
        image_tower: the trained image model.
        preprocessor: its eval preprocessing.
        paths_per_product: each product's photo paths (possibly none).
        device: where to run the tower.
        pooling: how a product's photo vectors are pooled (models.IMAGE_POOLING).
        batch_size: photos per forward pass.
        progress: show a progress bar.
        feature_cache_dir: the image model's feature cache (`train.image.features_dir`), read only.
        image_input: head (the tower's penultimate layer) or backbone (its pooled features).

    Returns:
        (vectors (n_products, d), has-a-photo mask (n_products,)).
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


def multimodal_wide(
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

    Args:
        params: the multimodal model's flat params (`wide_init`, `wide_*`).
        use_wide: `train.multimodal.wide`.
        wide_opt: `wide_branch.wide_optimizer_settings` (its dropout is the layer's).
        text_loaded: the loaded text tower (inference.load_model_module).
        train_texts: the train split's texts (to fit a vectoriser of its own).
        n_classes: the number of classes.

    Returns:
        (featurizer, wide layer, source) or (None, None, "") without a wide branch.

    Raises:
        ConfigError: `train.multimodal.wide_init` is not tower or zero.
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


class MultimodalRecipe(Recipe):
    """The image+text classifier: models.MultimodalClassifier over the trained towers, one example per product."""

    kind, examples, table = "multimodal", "products", PRODUCTS_FILE

    def __init__(self, train_params: Mapping[str, Any], image_model_dir: str | Path, text_model_dir: str | Path, progress: bool = True) -> None:
        """Check every `train.multimodal` knob and the loop's, before any data is read.

        Args:
            train_params, progress: as for `Recipe`.
            image_model_dir: the trained image model (the image tower).
            text_model_dir: the trained text model (the text tower).
        """
        super().__init__(train_params, progress)
        params, self.train_params = self.params, train_params
        self.image_model_dir, self.text_model_dir = image_model_dir, text_model_dir
        self.pooling = require_choice(params["image_pooling"], "train.multimodal.image_pooling", models.IMAGE_POOLING)
        self.image_input = require_choice(params["image_input"], "train.multimodal.image_input", models.IMAGE_INPUTS)
        self.fine_tune = bool(params["fine_tune_towers"])
        self.photo_calibration = require_choice(params["photo_calibration"], "train.multimodal.photo_calibration", PHOTO_CALIBRATIONS)
        self.lr, self.weight_decay = checked_number(params, "lr", "multimodal"), checked_number(params, "weight_decay", "multimodal")
        self.tower_lr = checked_number(params, "tower_lr", "multimodal") if self.fine_tune else 0.0
        self.use_wide = wide_enabled(params, "multimodal")
        self.wide_opt = wide_optimizer_settings(params, "multimodal") if self.use_wide else None
        self.settings = loop_settings(params, "multimodal", progress)
        self.calibration: dict[str, Any] = {"mode": "none"}

    def labels(self, data: ds.CleanData, split: str) -> list[int]:
        return data.products_of(split)["label"].tolist()

    def load(self, data: ds.CleanData) -> None:
        """Load both trained towers (trained on these classes) and hash their weights (the lineage)."""
        from pipeline_steps.inference import load_model_module  # rebuilds a trained tower; no training code there

        image_loaded = load_model_module(self.image_model_dir, expected_kind="image")
        text_loaded = load_model_module(self.text_model_dir, expected_kind="text")
        for loaded, directory in ((image_loaded, self.image_model_dir), (text_loaded, self.text_model_dir)):
            if loaded.config["classes"] != data.classes:
                raise PipelineError(f"{directory} was trained on other classes than {data.clean_dir / LABELS_FILE}; retrain it first")
        self.image_loaded, self.text_loaded = image_loaded, text_loaded
        self.image_tower, self.text_tower = image_loaded.module, text_loaded.module
        self.preprocessor, self.tokenizer = image_loaded.preprocessor, text_loaded.tokenizer
        self.max_length = int(text_loaded.config["preprocessing"]["text"]["max_length"])
        self.augmentation = image_loaded.config["preprocessing"].get("augmentation", [])
        if self.photo_calibration == "val" and self.fine_tune:
            log.warning("train.multimodal.photo_calibration: val applies to frozen towers only (fine_tune_towers: false); not fitted")
        self.lineage = {
            "image_model": file_sha256(Path(self.image_model_dir) / "model.pt"),
            "text_model": file_sha256(Path(self.text_model_dir) / "model.pt"),
        }

    def build(self, data: ds.CleanData) -> nn.Module:
        image_tower, text_tower, n_classes = self.image_tower, self.text_tower, len(data.classes)
        self.fusion = models.build_fusion_head(
            self.params, models.image_input_dim(image_tower, self.image_input), text_tower.embedding_dim, n_classes,
            text_head=copy.deepcopy(text_tower.head),  # used by `fusion: residual` only
        )
        self.splits = {s: data.products_of(s) for s in ("train", "val")}
        train_texts = self.splits["train"]["text"].tolist()
        self.featurizer, self.wide, self.wide_source = multimodal_wide(
            self.params, self.use_wide, self.wide_opt, self.text_loaded, train_texts, n_classes
        )
        text_tower.wide = None  # the multimodal model adds its own wide logits (`model.wide`), not the tower's
        self.model = models.MultimodalClassifier(image_tower, text_tower, self.fusion, self.pooling, wide=self.wide, image_input=self.image_input)
        return self.model

    def data_identity(self, data: ds.CleanData) -> list[Any]:
        ids = {s: frame["product_id"].astype(str).tolist() for s, frame in self.splits.items()}
        return [fingerprint(ids), data.classes, self.lineage]

    def trainable(self) -> tuple[nn.Module, list[ParamGroup]]:
        fusion, wide_groups = self.fusion, wide_param_groups(self.wide, self.wide_opt)
        if self.fine_tune:
            towers = [*self.image_tower.parameters(), *self.text_tower.parameters()]
            groups = [param_group(towers, self.tower_lr, self.weight_decay), param_group(fusion.parameters(), self.lr, self.weight_decay), *wide_groups]
            return self.model, groups
        self.image_tower.requires_grad_(False)
        self.text_tower.requires_grad_(False)
        trained = models.FusionWithWide(fusion, self.wide) if self.wide is not None else fusion
        return trained, [param_group(fusion.parameters(), self.lr, self.weight_decay), *wide_groups]

    def datasets(self, data: ds.CleanData, settings: LoopSettings) -> tuple[Dataset, Dataset, Callable]:
        if self.fine_tune:
            train_set = ds.multimodal_dataset(data, "train", models.TrainImageTransform(self.preprocessor, self.augmentation))
            val_set = ds.multimodal_dataset(data, "val", self.preprocessor)
            return train_set, val_set, ds.MultimodalCollate(self.tokenizer, self.max_length, self.preprocessor.input_size, self.featurizer)
        text_config = self.text_loaded.config["architecture"]
        identity = (
            {"encoder": text_config["encoder"], "weights": "pretrained"}
            if not text_config.get("fine_tuned")
            else {"encoder": text_config["encoder"], "weights": self.lineage["text_model"]}
        )
        by_product = data.image_paths_by_product()
        features = {}
        for split, frame in self.splits.items():
            image_emb, image_present = product_image_embeddings(
                self.image_tower, self.preprocessor, [by_product.get(p, []) for p in frame["product_id"]], settings.device, self.pooling,
                progress=self.progress, feature_cache_dir=image_features_dir(model_params(self.train_params, "image")), image_input=self.image_input,
            )
            text_emb = cached_text_embeddings(
                embedding_cache_dir(self.params), identity, self.text_tower.encoder, self.tokenizer, frame["text"].tolist(),
                self.max_length, settings.device, self.progress,
            )
            features[split] = {
                "image_emb": image_emb,
                "image_present": image_present,
                "text_emb": text_emb,
                "text_present": torch.tensor([bool(t) for t in frame["text"]], dtype=torch.bool),
            }
        splits, featurizer = self.splits, self.featurizer
        sparse = {s: featurizer.transform(frame["text"].tolist()) if featurizer else None for s, frame in splits.items()}
        train_set, val_set = (ds.TensorDictDataset(features[s], splits[s]["label"].tolist(), sparse=sparse[s]) for s in ("train", "val"))
        return train_set, val_set, ds.collate_tensor_dicts

    def after_fit(self, data: ds.CleanData, settings: LoopSettings, trained: nn.Module, val_set: Dataset) -> None:
        """Fit the photo calibration on val (`photo_calibration: val`, frozen towers only)."""
        if self.photo_calibration == "val" and not self.fine_tune:
            self.calibration = fit_photo_calibration(self.model, trained, val_set)
            log.info("photo calibration on val: %s", self.calibration)

    def saved_config(self, data: ds.CleanData) -> dict[str, Any]:
        fusion, image_loaded, text_loaded = self.fusion, self.image_loaded, self.text_loaded
        return {
            "embedding_dim": fusion.embedding_dim,
            "architecture": {
                "type": "MultimodalClassifier",
                "image_pooling": self.pooling,
                "image_input": self.image_input,
                "fusion": "residual" if fusion.residual else "concat",
                "hidden_dim": fusion.embedding_dim,
                "dropout": float(self.params["dropout"]),
                "modality_dropout": fusion.modality_dropout,
                "towers_fine_tuned": self.fine_tune,
                "photo_calibration": self.calibration,
                "n_classes": len(data.classes),
                "image_dim": models.image_input_dim(self.image_tower, self.image_input),
                "text_dim": self.text_tower.embedding_dim,
                "embedding": "ReLU(Linear([LayerNorm(image), LayerNorm(text)])): the fused hidden layer",
                "image_tower": image_loaded.config["architecture"],
                "text_tower": {**{k: v for k, v in text_loaded.config["architecture"].items() if k != "wide"}, "encoder_dir": "encoder"},
                "wide": wide_architecture(self.featurizer, self.wide_opt, self.wide_source),
            },
            "preprocessing": {
                "image": image_loaded.config["preprocessing"]["image"],
                "augmentation": self.augmentation,
                "text": text_loaded.config["preprocessing"]["text"],
            },
            "towers": {"image_model": str(self.image_model_dir), "text_model": str(self.text_model_dir), "sha256": self.lineage},
        }

    def saved_files(self) -> dict[str, Any]:
        return {"encoder_files": (self.tokenizer, self.text_tower.encoder.transformer), "wide": self.featurizer}
