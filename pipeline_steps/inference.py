"""Load a trained model directory and predict or embed: no training code, no hub access.

A model directory (docs/ARCHITECTURE.md, "Trained models") holds config.json,
model.pt and, for text-based models, encoder/ (tokenizer + encoder config) and, when
the model has a wide TF-IDF branch (config.json `architecture.wide`), tfidf.joblib; an
image model with a neighbour vote (config.json `neighbours`) also holds neighbours.npz. The
network is rebuilt from config.json with random weights and then loaded from
model.pt, so nothing is downloaded and the same code serves CPU and CUDA.

    classifier = load_classifier("artifacts/models/multimodal")
    classifier.predict_proba(images=[photo, None], texts=[None, "Oak table. Seats six"])

Images get the eval preprocessing of training (RGB, letterbox to the input size,
ImageNet normalisation); texts are tokenised with the saved tokenizer and
truncated to the training max_length.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from pipeline_steps import datasets as ds
from pipeline_steps import models
from pipeline_steps.errors import PipelineError
from pipeline_steps.model_kinds import CLASSIFIER_KINDS
from pipeline_steps.photo_neighbours import NeighbourVote

KINDS = CLASSIFIER_KINDS
ImageInput = Image.Image | Sequence[Image.Image] | None


@dataclass
class LoadedModel:
    """A rebuilt network with its weights, plus what turns raw inputs into its tensors."""

    module: nn.Module
    config: dict[str, Any]
    tokenizer: Any = None
    preprocessor: models.ImagePreprocessor | None = None
    wide: models.WideFeaturizer | None = None  # the fitted TF-IDF vectoriser of a wide branch
    neighbours: NeighbourVote | None = None  # the image model's stored train photos (photo_neighbours)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    for name in ("config.json", "model.pt"):
        if not (model_dir / name).is_file():
            raise PipelineError(f"{model_dir} is not a trained model directory: {name} is missing")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("kind") not in KINDS:
        raise PipelineError(f"{model_dir / 'config.json'}: kind {config.get('kind')!r} is not one of {KINDS}")
    return config


# config.json's `architecture` is what a model was trained with, not params.yaml: the `.get` defaults
# below keep model directories written before a key was recorded loadable (dropout does nothing in
# eval mode; the defaults are the values those older models were built with).


def _image_module(architecture: dict[str, Any], n_classes: int) -> models.ImageClassifier:
    saved = {
        "backbone": architecture["backbone"],
        "embedding_dim": architecture.get("embedding_dim", 256),
        "dropout": architecture.get("dropout", 0.2),
        "feature_dropout": architecture.get("feature_dropout", 0.0) or 0.0,
    }
    module = models.build_image_classifier(saved, n_classes, pretrained=False)
    if architecture.get("split_at") is not None:  # tail mode: the feature cache holds the prefix's maps
        module.backbone.split(module.backbone.n_blocks - int(architecture["split_at"]))
    return module


def _text_module(architecture: dict[str, Any], n_classes: int, encoder_dir: Path, wide_features: int | None = None) -> tuple[models.TextClassifier, Any]:
    tokenizer, transformer = models.encoder_from_folder(encoder_dir)
    saved = {
        "hidden_dim": architecture.get("hidden_dim", 256),
        "dropout": architecture.get("dropout", 0.1),
        "wide_dropout": 0.0,  # feature dropout of the wide branch: training only
    }
    return models.build_text_classifier(transformer, saved, n_classes, wide_features), tokenizer


def _wide_featurizer(architecture: dict[str, Any], model_dir: Path) -> models.WideFeaturizer | None:
    """The fitted vectoriser of the model's wide branch; None for a model without one (older dirs too)."""
    wide = architecture.get("wide")
    if not wide:
        return None
    path = model_dir / wide.get("file", models.WIDE_FILE)
    if not path.is_file():
        raise PipelineError(f"{model_dir}: config.json has a wide branch but {path.name} is missing")
    featurizer = models.WideFeaturizer.load(path)
    if featurizer.n_features != int(wide["n_features"]):
        raise PipelineError(f"{path}: {featurizer.n_features} features, config.json says {wide['n_features']}")
    return featurizer


def build_module(config: dict[str, Any], model_dir: str | Path) -> LoadedModel:
    """The untrained network described by config.json (weights are loaded by the caller)."""
    model_dir = Path(model_dir)
    kind, architecture, n_classes = config["kind"], config["architecture"], len(config["classes"])
    preprocessing = config.get("preprocessing", {})
    preprocessor = models.ImagePreprocessor.from_config(preprocessing["image"]) if "image" in preprocessing else None
    if kind == "image":
        record = config.get("neighbours")
        neighbours = NeighbourVote.load(model_dir, record, n_classes) if record else None
        return LoadedModel(_image_module(architecture, n_classes), config, None, preprocessor, neighbours=neighbours)
    wide = _wide_featurizer(architecture, model_dir)
    wide_features = wide.n_features if wide is not None else None
    if kind == "text":
        module, tokenizer = _text_module(architecture, n_classes, model_dir / architecture.get("encoder_dir", "encoder"), wide_features)
        return LoadedModel(module, config, tokenizer, None, wide)
    image_tower = _image_module(architecture["image_tower"], n_classes)
    tower_architecture = {key: value for key, value in architecture["text_tower"].items() if key != "wide"}
    text_tower, tokenizer = _text_module(tower_architecture, n_classes, model_dir / tower_architecture.get("encoder_dir", "encoder"))
    image_input = architecture.get("image_input", "head")
    text_head = copy.deepcopy(text_tower.head) if architecture.get("fusion", "concat") == "residual" else None
    saved = {
        "image_pooling": architecture.get("image_pooling", "mean"),
        "fusion": architecture.get("fusion", "concat"),
        "hidden_dim": architecture.get("hidden_dim", 256),
        "dropout": architecture.get("dropout", 0.2),
        "modality_dropout": architecture.get("modality_dropout", 0.2),
    }
    fusion = models.build_fusion_head(
        saved, models.image_input_dim(image_tower, image_input), text_tower.embedding_dim, n_classes, text_head=text_head
    )
    wide_layer = models.WideLinear(wide_features, n_classes) if wide_features else None
    module = models.MultimodalClassifier(
        image_tower, text_tower, fusion, architecture.get("image_pooling", "mean"), wide=wide_layer, image_input=image_input
    )
    return LoadedModel(module, config, tokenizer, preprocessor, wide)


def load_model_module(model_dir: str | Path, expected_kind: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network of a model directory and load its model.pt (eval mode)."""
    config = read_config(model_dir)
    if expected_kind is not None and config["kind"] != expected_kind:
        raise PipelineError(f"{model_dir} holds a {config['kind']!r} model, expected {expected_kind!r}")
    loaded = build_module(config, model_dir)
    state = torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True)
    loaded.module.load_state_dict(state)
    loaded.module.to(device).eval()
    return loaded


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Classifier:
    """A trained image, text or multimodal classifier: `predict_proba` and `embed` on raw inputs.

    images: list of PIL images or None (the multimodal model also takes a list of photos per
    row and averages their embeddings); texts: list of str or None. The image model needs a
    photo in every row and ignores texts; the text model needs a text and ignores images; the
    multimodal model needs at least one of the two per row.
    """

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "auto", batch_size: int = 64) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.kind: str = loaded.config["kind"]
        self.classes: list[str] = list(loaded.config["classes"])
        self.embedding_dim: int = int(loaded.config["embedding_dim"])
        self.device = _device(device)
        self.batch_size = int(batch_size)
        self.module = loaded.module.to(self.device).eval()
        if loaded.neighbours is not None:
            loaded.neighbours.to(self.device)
        self.max_length = int(loaded.config.get("preprocessing", {}).get("text", {}).get("max_length", 128))

    def __repr__(self) -> str:
        return f"Classifier(kind={self.kind!r}, classes={len(self.classes)}, embedding_dim={self.embedding_dim}, device={self.device})"

    # ---------------------------------------------------------------- public API

    def predict_proba(self, images: Sequence[ImageInput] | None = None, texts: Sequence[str | None] | None = None) -> np.ndarray:
        return self.predict_and_embed(images, texts)[0]

    def embed(self, images: Sequence[ImageInput] | None = None, texts: Sequence[str | None] | None = None) -> np.ndarray:
        return self.predict_and_embed(images, texts)[1]

    def predict(self, images: Sequence[ImageInput] | None = None, texts: Sequence[str | None] | None = None) -> list[str]:
        """Most probable class name per row."""
        return [self.classes[i] for i in self.predict_proba(images, texts).argmax(axis=1)]

    def predict_and_embed(
        self, images: Sequence[ImageInput] | None = None, texts: Sequence[str | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, n_classes) float32, embeddings (n, embedding_dim) float32), in batches."""
        n = self._row_count(images, texts)
        probas, embeddings = [np.zeros((0, len(self.classes)), np.float32)], [np.zeros((0, self.embedding_dim), np.float32)]
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            logits, embedding = self._forward(
                None if images is None else list(images[start:stop]), None if texts is None else list(texts[start:stop]), start
            )
            probas.append(torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float32))
            embeddings.append(embedding.float().cpu().numpy().astype(np.float32))
        return np.concatenate(probas), np.concatenate(embeddings)

    # ---------------------------------------------------------------- internals

    def _row_count(self, images: Sequence[Any] | None, texts: Sequence[Any] | None) -> int:
        if images is not None and texts is not None and len(images) != len(texts):
            raise ValueError(f"images ({len(images)}) and texts ({len(texts)}) must have one entry per row")
        if images is None and texts is None:
            raise ValueError("give images, texts or both")
        return len(images) if images is not None else len(texts)  # type: ignore[arg-type]

    @property
    def search_vector(self) -> str:
        """The image model's search embedding: "backbone" (pooled features) or "head" (penultimate layer),
        chosen at training time on the val split (config.json `search_embedding`)."""
        return str(self.config.get("search_embedding", {}).get("vector", "head"))

    def image_outputs(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, search embedding) of the image model from backbone features: the one function
        the index stage, evaluation and the service use, so all embed and classify photos the same way.
        With a neighbour vote (config.json `neighbours`), the logits are the head's log-probabilities
        with the vote of the nearest train photos multiplied in (photo_neighbours)."""
        features = features.float()
        head = self.module.embed_features(features)
        logits = self.module.classify_embedding(head)
        if self.loaded.neighbours is not None:
            logits = self.loaded.neighbours.blend(logits, features)
        return logits, (features if self.search_vector == "backbone" else head)

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        assert self.loaded.preprocessor is not None
        return torch.stack([self.loaded.preprocessor(image) for image in images]).to(self.device)

    def _tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = ds.tokenize(self.loaded.tokenizer, texts, self.max_length)
        return {name: tensor.to(self.device) for name, tensor in tokens.items()}

    def _wide_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The wide branch's TF-IDF inputs of `texts` ({} for a model without a wide branch)."""
        if self.loaded.wide is None:
            return {}
        return {name: tensor.to(self.device) for name, tensor in ds.csr_to_bags(self.loaded.wide.transform(texts)).items()}

    @torch.inference_mode()
    def _forward(self, images: list[Any] | None, texts: list[Any] | None, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "image":
            missing = [offset + i for i, image in enumerate(images or []) if image is None]
            if images is None or missing:
                raise ValueError(f"the image model needs a photo in every row (none in row(s) {missing[:5] or 'all'})")
            return self.image_outputs(self.module.backbone(self._pixels(images)))
        if self.kind == "text":
            missing = [offset + i for i, text in enumerate(texts or []) if text is None]
            if texts is None or missing:
                raise ValueError(f"the text model needs a text in every row (none in row(s) {missing[:5] or 'all'})")
            texts = [str(text) for text in texts]
            embedding = self.module.embed(**self._tokens(texts))
            return self.module.classify_embedding(embedding, **self._wide_inputs(texts)), embedding
        return self._forward_multimodal(images, texts, offset)

    def _forward_multimodal(self, images: list[Any] | None, texts: list[Any] | None, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(images) if images is not None else len(texts)  # type: ignore[arg-type]
        photos = [_as_photo_list(image) for image in (images or [None] * n)]
        texts = [None if text is None or (isinstance(text, float) and np.isnan(text)) else str(text) for text in (texts or [None] * n)]
        empty = [offset + i for i in range(n) if not photos[i] and not texts[i]]
        if empty:
            raise ValueError(f"row(s) {empty[:5]} have neither a photo nor a text")
        size = self.loaded.preprocessor.input_size  # type: ignore[union-attr]
        pixels, owner = ds.stack_product_images([[self.loaded.preprocessor(p) for p in row] for row in photos], (3, size, size))  # type: ignore[misc]
        features = self.module.image_tower.backbone(pixels.to(self.device)) if pixels.shape[0] else None
        return self.multimodal_outputs(features, owner, texts)

    def multimodal_outputs(
        self, features: torch.Tensor | None, owner: torch.Tensor, texts: Sequence[str | None], text_vectors: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, fused embedding) from the photos' backbone features (row `owner[i]` owns photo i) and,
        when given, the text tower's pooled vectors of `texts` (else the texts are encoded here)."""
        filled = [text or "" for text in texts]
        tokens = self._tokens(filled) if text_vectors is None else {"input_ids": None, "attention_mask": None}
        present = torch.tensor([bool(text) for text in texts], dtype=torch.bool, device=self.device)
        empty = torch.zeros((0, 3, 1, 1), device=self.device)
        return self.module.logits_and_embedding(
            empty, owner.to(self.device), tokens["input_ids"], tokens["attention_mask"], present,
            image_features=None if features is None else features.to(self.device),
            text_embeddings=None if text_vectors is None else text_vectors.to(self.device),
            **self._wide_inputs(filled),
        )

    def text_outputs(self, texts: Sequence[str], text_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embedding) of the text model from its encoder's pooled vectors of `texts`."""
        vectors = text_vectors.to(self.device).float()
        return self.module.classify_embedding(vectors, **self._wide_inputs([str(text) for text in texts])), vectors

    @property
    def text_encoder(self) -> torch.nn.Module | None:
        """The text model's encoder, or the multimodal model's text tower's (None for the image model)."""
        if self.kind == "text":
            return self.module.encoder
        return self.module.text_tower.encoder if self.kind == "multimodal" else None


def _as_photo_list(image: ImageInput) -> list[Image.Image]:
    if image is None:
        return []
    if isinstance(image, Image.Image):
        return [image]
    return [photo for photo in image if photo is not None]


def load_classifier(model_dir: str | Path, device: str | torch.device = "auto", batch_size: int = 64) -> Classifier:
    """Load a trained image | text | multimodal model directory for prediction and embedding."""
    return Classifier(load_model_module(model_dir, device="cpu"), device=device, batch_size=batch_size)


# --------------------------------------------------------------------------- whole splits


class SplitPrediction(NamedTuple):
    """Row i of `proba`/`embeddings` belongs to row i of `ids` (product_id, image_id, split, label)."""

    ids: pd.DataFrame
    labels: np.ndarray
    proba: np.ndarray
    embeddings: np.ndarray


def predict_split(
    classifier: Classifier,
    clean_dir: str | Path,
    split: str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    feature_cache_dir: str | Path | None = None,
    rows: tuple[int, int] | None = None,
    text_cache_dir: str | Path | None = None,
) -> SplitPrediction:
    """Predict and embed a whole clean split (None = every split) in batches.

    The image model gets one row per photo (images.parquet); the text and multimodal models
    one row per product (products.parquet), the multimodal one with all of the product's
    photos (averaged) and `image_id` null.

    `rows=(start, stop)`: only those rows of the split's row order (one shard of a sharded run,
    pipeline_steps/sharding.py); the shards' outputs concatenated in order are the whole split's.

    `feature_cache_dir`: the photos' backbone features (or prefix maps) are read from the image
    model's feature cache (`image_features`); `text_cache_dir`: the texts' encoder vectors are read
    from the training's text-vector cache (`text_embedding_cache`) when it holds all of them for
    this model's exact encoder weights. Both give the outputs of the model run on the raw inputs,
    up to float rounding, without running the backbone or the encoder again.
    """
    data = ds.load_clean(clean_dir)
    if classifier.kind == "image":
        frame = data.images_of(split)[["product_id", "image_id", "split", "label"]]
        sources: list[Any] = [data.clean_dir / rel for rel in data.images_of(split)["path"]]
        texts: list[Any] | None = None
    else:
        products = data.products_of(split)
        frame = products[["product_id", "split", "label"]].assign(image_id=None)[["product_id", "image_id", "split", "label"]]
        texts = products["text"].tolist()
        by_product = data.image_paths_by_product()
        sources = [by_product.get(p, []) for p in products["product_id"]] if classifier.kind == "multimodal" else []
    photo_window: tuple[list[Any], int, int] | None = None
    if rows is not None:
        start, stop = int(rows[0]), int(rows[1])
        if classifier.kind in ("image", "multimodal"):  # the shard's photos within all of them (for _photo_features)
            counts = [1] * len(sources) if classifier.kind == "image" else [len(paths) for paths in sources]
            flat_all = sources if classifier.kind == "image" else [path for paths in sources for path in paths]
            photo_window = (flat_all, sum(counts[:start]), sum(counts[:stop]))
        frame = frame.iloc[start:stop]
        sources = sources[start:stop]
        texts = None if texts is None else texts[start:stop]
    n, step = len(frame), batch_size or classifier.batch_size
    text_vectors = None
    if text_cache_dir is not None and texts is not None and (classifier.kind == "text" or feature_cache_dir is not None):
        from pipeline_steps.text_embedding_cache import stored_text_embeddings

        text_vectors = stored_text_embeddings(text_cache_dir, classifier.text_encoder, [_text_or_empty(t) for t in texts], classifier.max_length)
    if (feature_cache_dir is not None and classifier.kind in ("image", "multimodal")) or text_vectors is not None:
        return _predict_from_features(classifier, frame, sources, texts, feature_cache_dir, step, progress, photo_window, text_vectors)
    probas, embeddings = [np.zeros((0, len(classifier.classes)), np.float32)], [np.zeros((0, classifier.embedding_dim), np.float32)]
    for start in tqdm(range(0, n, step), desc=f"{classifier.kind} {split or 'all'}", disable=not progress, leave=False):
        stop = min(n, start + step)
        images = None
        if classifier.kind == "image":
            images = [ds.load_rgb(path) for path in sources[start:stop]]
        elif classifier.kind == "multimodal":
            images = [[ds.load_rgb(path) for path in paths] for paths in sources[start:stop]]
        proba, embedding = classifier.predict_and_embed(images, None if texts is None else texts[start:stop])
        probas.append(proba)
        embeddings.append(embedding)
    return SplitPrediction(frame.reset_index(drop=True), frame["label"].to_numpy(), np.concatenate(probas), np.concatenate(embeddings))


FEATURE_BATCH = 32  # photos per backbone batch of the feature cache's misses (image_features.backbone_features)


def _photo_features(
    classifier: Classifier, flat: list[Any], cache_dir: str | Path, progress: bool, window: tuple[list[Any], int, int] | None
) -> torch.Tensor:
    """Backbone features of `flat`, the photos [lo, hi) of `window`'s list of all photos when given (one
    shard). A shard's photos go through the backbone in the batches of the whole run: the range is
    widened to FEATURE_BATCH boundaries of all photos and cut back, since CPU kernels can round a
    photo's features differently in another batch. (With a cache holding only some of the photos, or
    photos of identical bytes in two shards, the misses' batches depend on what else is cached or
    computed: then the last bits may differ from the whole run.)"""
    from pipeline_steps import image_features

    tower = classifier.module if classifier.kind == "image" else classifier.module.image_tower
    lo = hi = 0
    if window is not None:
        all_photos, lo, hi = window
        wide_lo, wide_hi = lo - lo % FEATURE_BATCH, min(len(all_photos), -(-hi // FEATURE_BATCH) * FEATURE_BATCH)
        flat, lo, hi = list(all_photos[wide_lo:wide_hi]), lo - wide_lo, hi - wide_lo
    features = image_features.backbone_features(
        tower.backbone_name, tower.backbone, classifier.loaded.preprocessor, flat, cache_dir=cache_dir,
        device=classifier.device, batch_size=FEATURE_BATCH, progress=progress, write=False,
    )
    return features if window is None else features[lo:hi]


def _text_or_empty(text: Any) -> str:
    """A row's text as the multimodal model reads it ("" for a missing one)."""
    return "" if text is None or (isinstance(text, float) and np.isnan(text)) else str(text)


@torch.inference_mode()
def _predict_from_features(
    classifier: Classifier, frame: pd.DataFrame, sources: list[Any], texts: list[Any] | None, cache_dir: str | Path | None, step: int, progress: bool,
    photo_window: tuple[list[Any], int, int] | None = None, text_vectors: torch.Tensor | None = None,
) -> SplitPrediction:
    """predict_split with the photos' backbone features read from the frozen-feature cache
    (`image_features`, keyed by backbone weights + preprocessing + photo bytes; missing ones are
    computed, not stored) and/or the texts' encoder vectors (`text_vectors`, row i = text i).
    The same outputs as running the photos and texts through the model."""
    features = None
    if classifier.kind != "text":
        flat = sources if classifier.kind == "image" else [path for paths in sources for path in paths]
        features = _photo_features(classifier, flat, cache_dir, progress, photo_window)
    probas, embeddings = [np.zeros((0, len(classifier.classes)), np.float32)], [np.zeros((0, classifier.embedding_dim), np.float32)]
    starts = np.concatenate([[0], np.cumsum([len(paths) for paths in sources])]) if classifier.kind == "multimodal" else None
    for start in range(0, len(frame), step):
        stop = min(len(frame), start + step)
        if classifier.kind == "image":
            logits, embedding = classifier.image_outputs(features[start:stop].to(classifier.device))
        elif classifier.kind == "text":
            logits, embedding = classifier.text_outputs(texts[start:stop], text_vectors[start:stop])
        else:
            lo, hi = int(starts[start]), int(starts[stop])
            owner = torch.tensor([row - start for row in range(start, stop) for _ in sources[row]], dtype=torch.long)
            batch_vectors = None if text_vectors is None else text_vectors[start:stop]
            logits, embedding = classifier.multimodal_outputs(features[lo:hi] if hi > lo else None, owner, texts[start:stop], batch_vectors)
        probas.append(torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float32))
        embeddings.append(embedding.float().cpu().numpy().astype(np.float32))
    return SplitPrediction(frame.reset_index(drop=True), frame["label"].to_numpy(), np.concatenate(probas), np.concatenate(embeddings))
