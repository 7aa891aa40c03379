"""The multimodal model's photo calibration (train.multimodal.photo_calibration: val, issue 9)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_steps import inference, photo_calibration, training
from pipeline_steps.errors import ConfigError

try:  # the tiny-bundle helpers moved from service/ to tests/support/
    from tests.support import tiny_bundle as devtools
except ImportError:  # pragma: no cover - older checkout
    from service import devtools  # type: ignore[no-redef]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_photo_calibration_is_fitted_on_val_saved_and_leaves_the_no_photo_path_alone(tmp_path: Path) -> None:
    clean = devtools.make_tiny_clean_dir(tmp_path / "clean", per_class=6, image_size=40)
    params = devtools.tiny_train_params(tmp_path)
    params["train"]["image"].update(
        backbone="efficientnet_lite0", weights="packaged", input_size=32, epochs=2, mode="frozen", features_dir=str(tmp_path / "features")
    )
    params["train"]["multimodal"].update(image_input="head", fusion="residual", epochs=1, photo_calibration="val")
    models_dir = tmp_path / "models"
    training.train_image_classifier(clean, params["train"], models_dir / "image", progress=False)
    training.train_text_classifier(clean, params["train"], models_dir / "text", progress=False)
    result = training.train_multimodal_classifier(clean, params["train"], models_dir / "image", models_dir / "text", models_dir / "multimodal", progress=False)
    calibration = result.config["architecture"]["photo_calibration"]
    assert calibration["mode"] == "val" and calibration["fitted_on"] > 0
    assert 0.0 <= calibration["val_cv_accuracy_after"] <= 1.0 and calibration["l2"] in photo_calibration.PHOTO_CALIBRATION_L2

    classifier = inference.load_classifier(models_dir / "multimodal", device="cpu")
    module = classifier.module
    assert torch.equal(module.photo_weight, result.model.photo_weight)  # saved and loaded with the model
    photo = Image.new("RGB", (30, 20), (0, 90, 200))
    calibrated = classifier.predict_proba([photo, None], ["a red bike", "a red bike"])
    assert np.allclose(calibrated.sum(axis=1), 1, atol=1e-5)

    # a model saved before photo calibration existed (no photo_* keys) loads with the term off
    state = {k: v for k, v in torch.load(models_dir / "multimodal" / "model.pt", weights_only=True).items() if not k.startswith("photo_")}  # weight, bias, scale
    module.load_state_dict(state)
    assert not module.photo_calibrated
    plain = classifier.predict_proba([photo, None], ["a red bike", "a red bike"])
    np.testing.assert_allclose(plain[1], calibrated[1], atol=1e-6)  # no photo: the term never applies

    bad = copy.deepcopy(params["train"])
    bad["multimodal"]["photo_calibration"] = "test"
    with pytest.raises(ConfigError, match=r"photo_calibration"):
        training.train_multimodal_classifier(clean, bad, models_dir / "image", models_dir / "text", tmp_path / "other", progress=False)
