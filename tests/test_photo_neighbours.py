"""The image model's neighbour vote (pipeline_steps/photo_neighbours.py): what it adds, how it is stored."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline_steps import datasets as ds
from pipeline_steps import inference, training
from pipeline_steps.errors import PipelineError
from pipeline_steps.photo_neighbours import FILE, NeighbourVote, check_settings
from tests.support import tiny_bundle as devtools

SETTINGS = {"k": 3, "temperature": 0.1, "smoothing": 0.05, "weight": 1.0}


def clusters(n_per_class: int = 5, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Three classes, each a tight cluster around its own axis."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for label in range(3):
        centre = np.zeros(dim)
        centre[label] = 1.0
        rows.append(centre + 0.05 * rng.standard_normal((n_per_class, dim)))
        labels += [label] * n_per_class
    return torch.tensor(np.concatenate(rows), dtype=torch.float32), np.array(labels)


def test_the_vote_corrects_an_unsure_head_and_weight_zero_is_the_head_alone() -> None:
    features, labels = clusters()
    vote = NeighbourVote.fit(features, labels, 3, SETTINGS)
    query = torch.tensor([[0.02, 0.0, 1.0, 0, 0, 0, 0, 0]])  # next to class 2's photos
    head = torch.tensor([[0.3, 0.0, 0.1]])  # the head leans (a little) to class 0
    assert int(vote.blend(head, query).argmax()) == 2
    log_vote = vote.log_vote(query)
    assert torch.allclose(log_vote.exp().sum(dim=1), torch.ones(1))
    assert float(log_vote.exp().min()) >= SETTINGS["smoothing"] / 3 - 1e-7  # a class no neighbour has keeps its prior share
    off = NeighbourVote.fit(features, labels, 3, {**SETTINGS, "weight": 0.0})
    assert torch.equal(off.blend(head, query), head)


def test_a_confident_head_is_not_overruled_by_a_weak_vote() -> None:
    features, labels = clusters()
    vote = NeighbourVote.fit(features, labels, 3, {**SETTINGS, "weight": 0.25})
    query = torch.tensor([[0.6, 0.0, 0.6, 0, 0, 0, 0, 0]])  # between classes 0 and 2
    head = torch.tensor([[9.0, 0.0, 0.0]])
    assert int(vote.blend(head, query).argmax()) == 0


def test_k_larger_than_the_store_uses_every_photo() -> None:
    features, labels = clusters(n_per_class=1)
    vote = NeighbourVote.fit(features, labels, 3, {**SETTINGS, "k": 50})
    assert vote.log_vote(features).shape == (3, 3)


def test_saved_and_loaded_it_votes_the_same(tmp_path: Path) -> None:
    features, labels = clusters()
    vote = NeighbourVote.fit(features, labels, 3, SETTINGS)
    vote.save(tmp_path)
    again = NeighbourVote.load(tmp_path, vote.record(), 3)
    query = features[:4] + 0.01
    torch.testing.assert_close(again.log_vote(query), vote.log_vote(query), atol=2e-3, rtol=0)  # float16 storage


def test_a_missing_or_mismatched_file_is_an_error_naming_it(tmp_path: Path) -> None:
    features, labels = clusters()
    vote = NeighbourVote.fit(features, labels, 3, SETTINGS)
    with pytest.raises(PipelineError, match=f"{FILE} is missing"):
        NeighbourVote.load(tmp_path, vote.record(), 3)
    vote.save(tmp_path)
    with pytest.raises(PipelineError, match="config.json says 99"):
        NeighbourVote.load(tmp_path, {**vote.record(), "photos": 99}, 3)
    with pytest.raises(PipelineError, match="outside the model's 2 classes"):
        NeighbourVote.load(tmp_path, vote.record(), 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"k": 0}, "k must be >= 1"), ({"temperature": 0}, "temperature must be > 0"), ({"smoothing": 0}, r"smoothing must be in \(0, 1\]"),
     ({"weight": -1}, "weight must be >= 0"), ({"k": None}, "is missing")],
)
def test_bad_settings_name_the_key(change: dict[str, Any], message: str) -> None:
    params = {**SETTINGS, **change}
    params = {key: value for key, value in params.items() if value is not None}
    with pytest.raises(PipelineError, match=message):
        check_settings(params)


def test_training_stores_the_train_photos_and_inference_applies_the_vote(tmp_path: Path) -> None:
    clean = devtools.make_tiny_clean_dir(tmp_path / "clean", per_class=6, image_size=40)
    params = devtools.tiny_train_params(tmp_path)
    image = params["train"]["image"]
    image.update(backbone="efficientnet_lite0", weights="packaged", input_size=32, epochs=1, mode="frozen")
    image["neighbours"] = {"k": 3, "temperature": 0.05, "smoothing": 0.05, "weight": 1.0}
    result = training.train_image_classifier(clean, params["train"], tmp_path / "image", progress=False)
    record = result.config["neighbours"]
    assert (tmp_path / "image" / FILE).is_file() and record["k"] == 3 and record["weight"] == 1.0
    assert record["photos"] == len(ds.load_clean(clean).images_of("train"))  # the train photos, and only them
    with_vote = inference.load_classifier(tmp_path / "image", device="cpu")
    assert with_vote.loaded.neighbours is not None
    cached = tmp_path / "features"
    voted = inference.predict_split(with_vote, clean, "test", progress=False, feature_cache_dir=cached)
    direct = inference.predict_split(with_vote, clean, "test", progress=False)
    np.testing.assert_allclose(direct.proba, voted.proba, atol=1e-4)  # the index/evaluate path and the raw-photo path agree
    head_alone = copy.copy(with_vote)
    head_alone.loaded = copy.copy(with_vote.loaded)
    head_alone.loaded.neighbours = None
    plain = inference.predict_split(head_alone, clean, "test", progress=False, feature_cache_dir=cached)
    assert not np.allclose(plain.proba, voted.proba, atol=1e-3)  # the vote changes the probabilities
    np.testing.assert_allclose(plain.embeddings, voted.embeddings)  # and never the search vector
    # weight 0: no file, no record, the head alone
    image["neighbours"] = {**image["neighbours"], "weight": 0.0}
    off = training.train_image_classifier(clean, params["train"], tmp_path / "image_off", progress=False)
    assert off.config["neighbours"] is None and not (tmp_path / "image_off" / FILE).exists()


def test_far_neighbours_still_vote_instead_of_underflowing_to_the_prior() -> None:
    features, labels = clusters()
    vote = NeighbourVote.fit(features, labels, 3, {**SETTINGS, "temperature": 0.001, "k": 2})
    query = -features[:1]  # cosine about -1 to every stored photo: exp((cos - 1) / T) underflows in float32
    log_vote = vote.log_vote(query)
    assert torch.isfinite(log_vote).all()
    assert float(log_vote.exp().max()) > 0.5  # the nearest (least far) neighbours' class still wins the vote
