"""Architectures and preprocessing (pipeline_steps/models.py): shapes, config errors, freezing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline_steps import models
from pipeline_steps.errors import ConfigError
from tests.support.train_sections import image_section, multimodal_section, text_section


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("backbone", sorted(models.BACKBONES))
def test_every_backbone_gives_logits_and_penultimate_embedding(backbone: str) -> None:
    torch.manual_seed(0)
    model = models.build_image_classifier(image_section(backbone=backbone, weights=None, embedding_dim=24), n_classes=13).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embedding = model.embed(pixels)
        logits = model(pixels)
    assert embedding.shape == (2, 24) and logits.shape == (2, 13)
    assert (embedding >= 0).all()  # ReLU output: what the classification layer sees
    assert torch.allclose(model.classify_embedding(embedding), logits)
    assert all(p.requires_grad for p in model.parameters())  # random init: nothing frozen


def test_unknown_backbone_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"train\.image\.backbone.*vgg16.*resnet18"):
        models.build_image_classifier({**image_section(), "backbone": "vgg16"}, n_classes=3)


def test_missing_weights_file_names_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"train\.image\.weights.*not an existing file"):
        models.describe_weights("resnet18", str(tmp_path / "nope.pth"))


def test_unknown_torchvision_weights_name_lists_the_enum() -> None:
    with pytest.raises(ConfigError, match=r"train\.image\.weights.*IMAGENET1K_V1"):
        models.describe_weights("resnet18", "IMAGENET9K")
    assert models.describe_weights("resnet50", "IMAGENET1K_V2") == {"type": "torchvision", "value": "IMAGENET1K_V2"}
    assert models.describe_weights("resnet18", None)["type"] == "none"


def test_local_pth_weights_are_loaded_and_all_but_the_last_block_frozen(tmp_path) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    weights_file = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights_file)
    model = models.build_image_classifier(
        image_section(backbone="resnet18", weights=str(weights_file), freeze_backbone="auto", embedding_dim=16), n_classes=4
    )
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"backbone", "embedding", "classifier"}
    assert all(p.requires_grad == name.startswith("layer4") for name, p in model.backbone.named_parameters())
    model.train()
    assert not model.backbone.bn1.training and model.backbone.layer4[0].bn1.training  # frozen BN keeps its statistics


def test_pth_of_another_architecture_is_a_config_error(tmp_path) -> None:
    weights_file = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), weights_file)
    with pytest.raises(ConfigError, match=r"train\.image\.weights.*does not fit"):
        models.build_image_classifier(image_section(backbone="resnet18", weights=str(weights_file)), n_classes=4)


def test_augmentation_names_map_to_transforms_and_unknown_ones_fail() -> None:
    preprocessor = models.ImagePreprocessor(32)
    transform = models.TrainImageTransform(preprocessor, list(models.AUGMENTATIONS) + list(models.POST_AUGMENTATIONS))
    out = transform(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    with pytest.raises(ConfigError, match=r"train\.image\.augmentation.*mixup"):
        models.check_augmentation(["horizontal_flip", "mixup"])


def test_eval_preprocessing_letterboxes_any_photo_to_the_input_size() -> None:
    wide_rgba = Image.new("RGBA", (120, 40), (255, 255, 255, 255))
    square = models.resize_with_pad(wide_rgba, 60)
    assert square.size == (60, 60) and square.mode == "RGB"
    pixels = np.asarray(square)
    assert pixels[0, 30].tolist() == [0, 0, 0] and pixels[30, 30].tolist() == [255, 255, 255]  # padded top, photo centred
    preprocessor = models.ImagePreprocessor(32, source_size=64)
    tensor = preprocessor(Image.new("L", (10, 80), 128))
    assert tensor.shape == (3, 32, 32)
    assert preprocessor.to_config()["input_size"] == 32
    assert models.ImagePreprocessor.from_config(preprocessor.to_config()).source_size == 64


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(models.mean_pool(hidden, mask), torch.tensor([[2.0, 2.0]]))


def test_unknown_text_encoder_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.text\.encoder.*no-such-encoder-xyz"):
        models.load_pretrained_encoder("no-such-org/no-such-encoder-xyz")


def test_default_text_encoder_loads_offline_and_pools_to_384() -> None:
    tokenizer, transformer = models.load_pretrained_encoder(models.DEFAULT_TEXT_ENCODER)
    model = models.build_text_classifier(transformer, text_section(hidden_dim=16), n_classes=13).eval()
    tokens = tokenizer(["Oak table. Seats six", "bike"], padding=True, return_tensors="pt")
    with torch.no_grad():
        embedding = model.embed(tokens["input_ids"], tokens["attention_mask"])
        logits = model(tokens["input_ids"], tokens["attention_mask"])
    assert embedding.shape == (2, 384) and logits.shape == (2, 13)


def test_pool_per_owner_averages_photos_and_flags_products_without_any() -> None:
    vectors = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    pooled, present = models.pool_per_owner(vectors, torch.tensor([0, 0, 2]), n_owners=3)
    assert torch.allclose(pooled, torch.tensor([[2.0, 1.0], [0.0, 0.0], [5.0, 5.0]]))
    assert present.tolist() == [True, False, True]
    pooled_max, _ = models.pool_per_owner(vectors, torch.tensor([0, 0, 2]), n_owners=3, how="max")
    assert pooled_max[0].tolist() == [3.0, 2.0] and pooled_max[1].tolist() == [0.0, 0.0]


def test_fusion_head_uses_learned_missing_vectors_and_never_drops_both_modalities() -> None:
    torch.manual_seed(0)
    head = models.FusionHead(image_dim=8, text_dim=6, hidden_dim=5, n_classes=13, modality_dropout=1.0)
    image, text = torch.randn(64, 8), torch.randn(64, 6)
    present = torch.ones(64, dtype=torch.bool)
    image_kept, text_kept = head._drop_modalities(present, present)
    assert not (~image_kept & ~text_kept).any() and (~image_kept).any() and (~text_kept).any()
    head.eval()
    no_image = head(image, torch.zeros(64, dtype=torch.bool), text, present)
    other_image = head(torch.randn(64, 8), torch.zeros(64, dtype=torch.bool), text, present)
    assert no_image.shape == (64, 13) and torch.equal(no_image, other_image)  # absent image: only the missing vector counts
    assert head.embed(image, present, text, present).shape == (64, 5)


# --------------------------------------------------------------------------- wide branch

WIDE_TEXTS = [
    "Oak table. Seats six, collection only",
    "Mountain bike. 21 gears, new tyres",
    "Table lamp. Brass, works fine",
    "Kids bike. Stabilisers included",
]


def test_wide_featurizer_fits_word_char_and_title_features_and_round_trips(tmp_path) -> None:
    featurizer = models.WideFeaturizer.fit(WIDE_TEXTS, {"max_features": 1000})
    assert set(featurizer.vectorizers) == {"text", "title"}
    matrix = featurizer.transform(WIDE_TEXTS + ["", None])
    assert matrix.shape == (6, featurizer.n_features) and matrix.dtype == np.float32
    assert matrix[4].nnz == 0 and matrix[5].nnz == 0  # no text: an all-zero row
    title_vocabulary = featurizer.vectorizers["title"].vocabulary_
    assert "oak table" in title_vocabulary and "seats" not in title_vocabulary  # the first sentence only
    assert models.text_title("Oak table. Seats six") == "Oak table"
    featurizer.save(tmp_path / models.WIDE_FILE)
    again = models.WideFeaturizer.load(tmp_path / models.WIDE_FILE)
    assert (again.transform(WIDE_TEXTS) != featurizer.transform(WIDE_TEXTS)).nnz == 0
    assert featurizer.to_config()["n_features"] == featurizer.n_features
    no_title = models.WideFeaturizer.fit(WIDE_TEXTS, {"title": False, "max_features": 5})
    assert set(no_title.vectorizers) == {"text"} and no_title.n_features <= 10  # max_features per vectoriser


def test_wide_linear_is_a_sparse_matmul_that_starts_at_zero() -> None:
    from pipeline_steps import datasets as ds

    featurizer = models.WideFeaturizer.fit(WIDE_TEXTS)
    matrix = featurizer.transform([*WIDE_TEXTS, ""])
    wide = models.WideLinear(featurizer.n_features, 3, dropout=0.5).eval()
    bags = ds.csr_to_bags(matrix)
    assert torch.equal(wide(**bags), torch.zeros(5, 3))  # like a logistic regression, it learns from zero
    torch.manual_seed(0)
    with torch.no_grad():
        wide.bag.weight.normal_()
    dense = torch.from_numpy(matrix.toarray()) @ wide.bag.weight
    assert torch.allclose(wide(**bags), dense, atol=1e-5)
    assert torch.equal(wide(**bags)[4], torch.zeros(3))  # empty text: no wide logits
    rows = [(matrix[i].indices, matrix[i].data) for i in range(matrix.shape[0])]
    assert all(torch.equal(a, b) for a, b in zip(ds.sparse_rows_to_bags(rows).values(), bags.values(), strict=True))
    wide.train()
    assert not torch.allclose(wide(**bags), dense)  # feature dropout in training


def test_wide_branch_draws_no_random_numbers_and_adds_logits() -> None:
    torch.manual_seed(3)
    plain = models.MLPHead(8, 4, 3)
    torch.manual_seed(3)
    models.WideLinear(50, 3)
    with_wide = models.MLPHead(8, 4, 3)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), with_wide.state_dict().values(), strict=True))
    wide = models.WideLinear(5, 3)
    with torch.no_grad():
        wide.bag.weight.fill_(1.0)
    head = models.WideAndDeepHead(plain, wide).eval()
    embedding = torch.randn(2, 8)
    bags = {"wide_indices": torch.tensor([0, 1]), "wide_offsets": torch.tensor([0, 2]), "wide_weights": torch.tensor([0.5, 0.25])}
    with torch.no_grad():
        assert torch.allclose(head(embedding, **bags), plain(embedding) + torch.tensor([[0.75] * 3, [0.0] * 3]))
        assert torch.equal(head(embedding), plain(embedding))  # no wide inputs: the deep logits alone
    with pytest.raises(ValueError, match="wide_weights"):
        head(embedding, wide_indices=bags["wide_indices"], wide_offsets=bags["wide_offsets"])


def test_fusion_head_adds_wide_logits_only_where_the_text_was_seen() -> None:
    torch.manual_seed(0)
    head = models.FusionHead(image_dim=4, text_dim=6, hidden_dim=5, n_classes=3, modality_dropout=0.0).eval()
    wide = models.WideLinear(2, 3)
    with torch.no_grad():
        wide.bag.weight.fill_(2.0)
    image, text = torch.randn(3, 4), torch.randn(3, 6)
    image_present, text_present = torch.ones(3, dtype=torch.bool), torch.tensor([True, False, True])
    bags = {"wide_indices": torch.tensor([0, 1, 0]), "wide_offsets": torch.tensor([0, 1, 2]), "wide_weights": torch.ones(3)}
    with torch.no_grad():
        plain = head(image, image_present, text, text_present)
        fused = head(image, image_present, text, text_present, wide, **bags)
    assert torch.allclose(fused - plain, torch.tensor([[2.0] * 3, [0.0] * 3, [2.0] * 3]))
    head.train()
    head.modality_dropout, head.dropout = 1.0, torch.nn.Identity()  # every row drops its photo or its text
    both = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        torch.manual_seed(1)
        _, text_seen = head._present(both, both)
        torch.manual_seed(1)
        fused = head(image, both, text, both, wide, **bags)
        torch.manual_seed(1)
        plain = head(image, both, text, both)
    assert (~text_seen).any() and text_seen.any()
    assert torch.allclose(fused - plain, 2.0 * text_seen[:, None].float().expand(3, 3))  # a hidden text hides its TF-IDF too
