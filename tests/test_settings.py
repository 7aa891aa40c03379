"""params.yaml's schema (pipeline_steps/settings.py): checked once at load, every bad key named."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_steps import settings
from pipeline_steps.config import PROJECT_ROOT, load_params, load_settings
from pipeline_steps.errors import ConfigError

RAW = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))


def _broken(edit) -> dict:  # noqa: ANN001
    params = copy.deepcopy(RAW)
    edit(params)
    return params


def test_the_project_params_are_valid_and_typed() -> None:
    typed = load_settings()
    assert typed.train.image.backbone == RAW["train"]["image"]["backbone"]
    assert typed.index.ranking.n_candidates == RAW["index"]["ranking"]["n_candidates"]
    assert typed.train.grad_clip == RAW["train"]["grad_clip"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p["train"]["image"].update(backbon="resnet18"), "unknown key 'train.image.backbon'"),
        (lambda p: p["train"].update(lr_schedule="linear"), "key 'train.lr_schedule' is 'linear': Input should be 'onecycle' or 'cosine'"),
        (lambda p: p["sample"]["quirks"].update(bad_price=1.5), "key 'sample.quirks.bad_price' is 1.5"),
        (lambda p: p["serve"].pop("max_k"), "key 'serve.max_k' is missing"),
        (lambda p: p["cleaning"].update(num_workers="many"), "key 'cleaning.num_workers' is 'many'"),
        (lambda p: p["index"]["ranking"].update(lexical_weight=2.0), "Input should be 'auto'; or Input should be less than or equal to 1"),
        (lambda p: p["validation"].update(location_requires_county="yes"), "key 'validation.location_requires_county' is 'yes'"),
        (lambda p: p["cleaning"]["split"].update(val_fraction=0.9), "val_fraction + test_fraction must leave rows"),
        (lambda p: p["index"].update(kinds=["image", "audio"]), "key 'index.kinds.1' is 'audio'"),
        (lambda p: p["index"]["ranking"].update(fit_metric="recall@10"), "key 'index.ranking.fit_metric' is 'recall@10'"),
        # issue 10: once code defaults, now required
        (lambda p: p["train"]["multimodal"].pop("photo_calibration"), "key 'train.multimodal.photo_calibration' is missing"),
        (lambda p: p["train"].pop("grad_clip"), "key 'train.grad_clip' is missing"),
        (lambda p: p["train"]["multimodal"].pop("wide_max_features"), "key 'train.multimodal.wide_max_features' is missing"),
        (lambda p: p["registry"].update(artifact_root=""), "key 'registry.artifact_root' is ''"),
    ],
)
def test_a_bad_value_is_refused_with_its_key_and_what_is_accepted(edit, expected: str) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError) as error:
        settings.validate(_broken(edit))
    assert expected in str(error.value)


def test_every_bad_key_is_named_at_once() -> None:
    def edit(p: dict) -> None:
        p["train"]["device"] = "tpu"
        p["serve"]["max_k"] = 0

    with pytest.raises(ConfigError) as error:
        settings.validate(_broken(edit))
    assert "train.device" in str(error.value) and "serve.max_k" in str(error.value)


def test_a_params_file_that_breaks_the_schema_fails_at_load(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_broken(lambda p: p["train"]["text"].update(epochs="ten"))))
    with pytest.raises(ConfigError, match=r"train\.text\.epochs"):
        load_params(path)


def test_accepted_values_agree_with_the_code_that_uses_them() -> None:
    """The schema repeats the code's choice lists (importing them would pull torch into every stage)."""
    from pipeline_steps import models, ranking, recipe_image, text_hygiene, training_loop

    fields = settings.Settings.model_fields
    assert set(settings.BACKBONES) == set(models.BACKBONES)
    assert set(settings.AUGMENTATIONS) == set(models.AUGMENTATIONS) | set(models.POST_AUGMENTATIONS)
    assert set(settings.RANKING_FUSIONS) == set(ranking.FUSIONS)
    train = fields["train"].annotation.model_fields
    image = settings.ImageTrainSettings.model_fields
    multimodal = settings.MultimodalTrainSettings.model_fields
    hygiene = settings.TextHygieneSettings.model_fields

    def choices(field) -> set:  # noqa: ANN001
        return set(field.annotation.__args__)

    assert choices(train["lr_schedule"]) == set(training_loop.LR_SCHEDULES)
    assert choices(train["device"]) == set(training_loop.DEVICES)
    assert choices(image["mode"]) == set(recipe_image.IMAGE_MODES)
    assert choices(image["search_embedding"]) == set(recipe_image.SEARCH_EMBEDDINGS)
    assert choices(multimodal["image_pooling"]) == set(models.IMAGE_POOLING)
    assert choices(multimodal["image_input"]) == set(models.IMAGE_INPUTS)
    assert choices(multimodal["fusion"]) == set(models.FUSIONS)
    assert choices(hygiene["control_chars"]) == set(text_hygiene.ACTIONS)
    from pipeline_steps import image_eval

    assert choices(image["product_pooling"]) == set(image_eval.PRODUCT_POOLING)


@pytest.mark.integration
def test_a_mistyped_set_override_stops_the_stage_with_the_config_exit_code(tmp_path: Path) -> None:
    """`--set sample.n_prodcts=5` used to add a key nobody reads and run with the default."""
    result = subprocess.run(
        [sys.executable, "-m", "flows.generate_sample", "--set", "sample.n_prodcts=5", "--out", str(tmp_path / "raw")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    assert result.returncode == 78, result.stderr[-2000:]
    assert "unknown key 'sample.n_prodcts'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "raw").exists()
