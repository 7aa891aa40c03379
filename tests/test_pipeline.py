"""The whole pipeline as one Prefect flow run, on a tiny export, with a real MLflow registry.

It trains every model for an epoch or two, registers them, checks the champion
aliases, loads a champion back through `models:/<name>@champion`, then retrains
the text model with a deliberately worse setting and checks that the new version
becomes the challenger while the champion stays. Finally the index and the
serving bundle are built from the champions.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.evaluate import evaluate_flow
from flows.index import index_flow
from flows.package import package_flow
from flows.pipeline import pipeline_flow
from flows.register import register_flow
from flows.train import train_flow
from pipeline_steps import registry, tracking
from pipeline_steps.errors import PipelineError
from pipeline_steps.index import SimilarityIndex
from pipeline_steps.packaging import read_bundle_info
from tests.support.flow_helpers import FAST_TRAINING, path_overrides, tiny_raw_export

pytestmark = pytest.mark.integration

NAMES = {
    "image": "marketplace-image-classifier",
    "text": "marketplace-text-classifier",
    "multimodal": "marketplace-multimodal-classifier",
    "price": "marketplace-price-estimator",
    "text-baseline": "marketplace-text-baseline",
    "pixel-baseline": "marketplace-pixel-baseline",
}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    work = tmp_path_factory.mktemp("pipeline")
    raw = tiny_raw_export(work / "raw")
    overrides = path_overrides(work, raw) + FAST_TRAINING
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "BENTOML_HOME")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    os.environ["BENTOML_HOME"] = str(work / "bentoml")
    try:
        pipeline_flow(overrides=overrides, stop="register")
        yield work, overrides
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_every_model_is_registered_with_metrics_and_a_champion(pipeline_run: tuple[Path, list[str]]) -> None:
    work, _ = pipeline_run
    client = MlflowClient()
    products = pd.read_parquet(work / "clean" / "products.parquet")
    images = pd.read_parquet(work / "clean" / "images.parquet")
    for kind, name in NAMES.items():
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.tags.get("run_id"), kind
        metric = "median_abs_error" if kind == "price" else "accuracy"
        value = float(champion.tags[f"metric.{metric}"])
        assert value >= 0
        assert (work / "metrics" / f"{kind}.json").is_file()
        # the registered number is the evaluate stage's, on the same test rows
        scored = json.loads((work / "metrics" / f"{kind}.json").read_text())
        assert value == pytest.approx(scored[metric]), kind
        assert champion.tags["test_split_hash"] == scored["test_split_hash"], kind
        if kind == "price":
            assert value > 0 and scored["n"] >= 1
            continue
        # classifiers are scored per product or per photo: every test row of that unit counts
        rows = products if scored["unit"] == "product" else images
        test_rows = rows[rows["split"] == "test"].reset_index(drop=True)
        assert scored["n"] == len(test_rows), kind
        assert value <= scored["top3_accuracy"] <= 1.0, kind
        if kind in ("text", "multimodal", "text-baseline"):
            # the text carries the category on the sample: better than always answering the most frequent class
            majority = float(test_rows["label"].value_counts(normalize=True).max())
            assert value > majority, f"{kind}: accuracy {value:.3f} is not above the majority class's {majority:.3f}"
        if kind != "multimodal":  # (multimodal pools a product's photos: not one pyfunc row per scored row)
            # and it is what the registered model itself scores: models:/<name>@champion on the test rows
            model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
            if scored["unit"] == "product":
                frame = pd.DataFrame({"text": test_rows["text"], "image": [None] * len(test_rows)})
            else:
                photos = [base64.b64encode((work / "clean" / path).read_bytes()).decode() for path in test_rows["path"]]
                frame = pd.DataFrame({"text": [None] * len(test_rows), "image": photos})
            labels = json.loads((work / "clean" / "labels.json").read_text())["classes"]
            predicted = model.predict(frame)["category"].map(labels.index).to_numpy()
            reproduced = float((predicted == test_rows["label"].to_numpy()).mean())
            assert reproduced == pytest.approx(value, abs=1e-9), f"{kind}: registered {value:.4f}, champion scores {reproduced:.4f}"
    summary = json.loads((work / "artifacts" / "registry.json").read_text())
    assert set(summary) == set(NAMES)


def test_models_beat_chance_on_the_sample(pipeline_run: tuple[Path, list[str]]) -> None:
    work, _ = pipeline_run
    for kind in ("text", "multimodal", "text-baseline"):
        accuracy = json.loads((work / "metrics" / f"{kind}.json").read_text())["accuracy"]
        assert accuracy > 2 / 13, f"{kind} accuracy {accuracy:.3f} is not above chance"
    price = json.loads((work / "metrics" / "price.json").read_text())
    assert price["n"] > 0 and price["median_abs_error"] > 0


def test_price_is_scored_and_registered_as_served(pipeline_run: tuple[Path, list[str]]) -> None:
    """The price model's headline error uses the category the served text classifier predicts."""
    work, _ = pipeline_run
    price = json.loads((work / "metrics" / "price.json").read_text())
    text_run = (work / "artifacts" / "models" / "text" / "run_id.txt").read_text().strip()
    assert price["category_model_run_id"] == text_run and price["category_model"] == "text"
    assert price["median_abs_error_true_category"] > 0 and 0.0 <= price["category_accuracy"] <= 1.0
    champion = MlflowClient().get_model_version_by_alias(NAMES["price"], "champion")
    assert champion.tags["category_model_run_id"] == text_run
    assert float(champion.tags["metric.median_abs_error"]) == pytest.approx(price["median_abs_error"])
    assert float(champion.tags["metric.median_abs_error_true_category"]) == pytest.approx(price["median_abs_error_true_category"])


def test_champion_loads_back_and_predicts(pipeline_run: tuple[Path, list[str]]) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAMES['text']}@champion")
    answer = model.predict(pd.DataFrame({"text": ["Samsung Galaxy phone, unlocked, 128GB"], "image": [None]}))
    assert answer.shape[0] == 1 and isinstance(answer["category"].iloc[0], str)
    price = mlflow.pyfunc.load_model(f"models:/{NAMES['price']}@champion")
    frame = pd.DataFrame({"text": ["Oak table"], "category": ["Home & Garden"], "town": ["Leeds"], "county": [""]})
    assert float(price.predict(frame)["price"].iloc[0]) >= 0


def test_worse_retrain_becomes_challenger_and_champion_stays(pipeline_run: tuple[Path, list[str]]) -> None:
    _, overrides = pipeline_run
    client = MlflowClient()
    champion_before = client.get_model_version_by_alias(NAMES["text"], "champion").version
    worse = overrides + ["train.text.epochs=1", "train.text.lr=0.00001"]
    train_flow(overrides=worse, model="text")
    evaluate_flow(overrides=worse, model="text")
    decision = register_flow(overrides=worse, model="text")["text"]
    assert decision["promoted"] is False
    # lost on the metric, on the same split (not "not comparable")
    assert "does not beat" in decision["reason"], decision["reason"]
    assert decision["champion_value"] is not None and decision["new_value"] <= decision["champion_value"]
    assert client.get_model_version_by_alias(NAMES["text"], "champion").version == champion_before
    challenger = client.get_model_version_by_alias(NAMES["text"], "challenger")
    assert int(challenger.version) > int(champion_before)


def test_a_retrained_model_is_not_registered_with_its_predecessors_metrics(pipeline_run: tuple[Path, list[str]]) -> None:
    _, overrides = pipeline_run
    client = MlflowClient()
    versions_before = len(client.search_model_versions(f"name='{NAMES['text-baseline']}'"))
    train_flow(overrides=overrides, model="baselines")  # a new run; metrics/text-baseline.json is now stale
    with pytest.raises(PipelineError, match="evaluate"):
        register_flow(overrides=overrides, model="text-baseline")
    assert len(client.search_model_versions(f"name='{NAMES['text-baseline']}'")) == versions_before
    evaluate_flow(overrides=overrides, model="text-baseline")
    first = register_flow(overrides=overrides, model="text-baseline")["text-baseline"]["version"]
    again = register_flow(overrides=overrides, model="text-baseline")["text-baseline"]["version"]
    assert first == again  # the same trained model is not registered twice
    assert len(client.search_model_versions(f"name='{NAMES['text-baseline']}'")) == versions_before + 1


def test_register_uses_the_configured_store_when_no_uri_is_exported(
    pipeline_run: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MLFLOW_TRACKING_URI unset, params.yaml's registry.tracking_uri is the store for every lookup
    (a lookup before the store is configured once went to MLflow's default ./mlflow.db)."""
    work, overrides = pipeline_run
    store = os.environ["MLFLOW_TRACKING_URI"]
    registered = register_flow(overrides=overrides, model="text-baseline")["text-baseline"]["version"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # configure_tracking remembers which URI it set itself; keep that memory to this test
    monkeypatch.setattr(tracking, "_SET_BY_US", {})
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    try:
        again = register_flow(overrides=[*overrides, f"registry.tracking_uri={store}"], model="text-baseline")
    finally:
        mlflow.set_tracking_uri(store)
    assert again["text-baseline"]["version"] == registered  # found in the configured store: not registered twice
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_a_champion_scored_on_another_split_is_rescored_before_the_comparison(pipeline_run: tuple[Path, list[str]]) -> None:
    """New data (another test split) must not freeze the champion: it is re-scored on the current split."""
    work, overrides = pipeline_run
    client = MlflowClient()
    name = NAMES["price"]
    champion = client.get_model_version_by_alias(name, "champion")
    current_split = champion.tags["test_split_hash"]
    client.set_model_version_tag(name, champion.version, "test_split_hash", "an-older-export")
    client.set_model_version_tag(name, champion.version, "metric.median_abs_error", "999999.0")

    train_flow(overrides=overrides, model="price")  # a new version to compare with the champion
    evaluate_flow(overrides=overrides, model="price")
    decision = register_flow(overrides=overrides, model="price")["price"]

    rescored = client.get_model_version(name, champion.version)
    assert rescored.tags["test_split_hash"] == current_split
    assert rescored.tags["registered_test_split_hash"] == "an-older-export"
    # re-scored as served: with the category of the text classifier the new version was scored with
    assert rescored.tags["category_model_run_id"] == json.loads((work / "metrics" / "price.json").read_text())["category_model_run_id"]
    assert float(rescored.tags["metric.median_abs_error"]) == pytest.approx(decision["champion_value"])
    assert decision["champion_value"] < 999999.0  # the champion's real error on this split, not the stale tag
    assert "not comparable" not in decision["reason"], decision["reason"]
    assert decision["version"] != str(champion.version) and decision["champion_version"] == str(champion.version)


def test_a_price_champion_scored_with_another_category_classifier_is_rescored(pipeline_run: tuple[Path, list[str]]) -> None:
    """Same rows, but the champion's price error was computed with another text classifier's categories:
    the numbers are not comparable until it is re-scored with the classifier served now."""
    work, overrides = pipeline_run
    client = MlflowClient()
    name = NAMES["price"]
    champion = client.get_model_version_by_alias(name, "champion")
    split = champion.tags["test_split_hash"]
    client.set_model_version_tag(name, champion.version, "category_model_run_id", "a-text-model-no-longer-served")
    client.set_model_version_tag(name, champion.version, "metric.median_abs_error", "999999.0")

    train_flow(overrides=overrides, model="price")
    evaluate_flow(overrides=overrides, model="price")
    decision = register_flow(overrides=overrides, model="price")["price"]

    text_run = (work / "artifacts" / "models" / "text" / "run_id.txt").read_text().strip()
    rescored = client.get_model_version(name, champion.version)
    assert rescored.tags["category_model_run_id"] == text_run
    assert rescored.tags["test_split_hash"] == split
    assert decision["champion_value"] == pytest.approx(float(rescored.tags["metric.median_abs_error"]))
    assert decision["champion_value"] < 999999.0  # its error with the served classifier, not the stale tag
    assert "not comparable" not in decision["reason"], decision["reason"]


def test_index_and_bundle_belong_to_the_champions(pipeline_run: tuple[Path, list[str]]) -> None:
    work, overrides = pipeline_run
    results = index_flow(overrides=overrides)
    client = MlflowClient()
    for kind in ("image", "text", "multimodal"):
        champion = client.get_model_version_by_alias(NAMES[kind], "champion")
        loaded = SimilarityIndex.load(work / "artifacts" / "index" / kind, expected_model=(NAMES[kind], champion.version))
        assert loaded.size > 0
        assert 0.0 <= results[kind]["precision_at_1"] <= 1.0
        assert client.get_model_version(NAMES[kind], champion.version).tags.get("index_run_id")
        # the ranking part (BM25 + weights fitted on val) lives next to the index it belongs to
        assert (work / "artifacts" / "index" / kind / "ranking" / "ranking.json").is_file()
    assert (work / "metrics" / "retrieval.json").is_file()
    ranking = results["ranking"]["report"]
    assert {"text", "image", "combined", "similar"} <= set(ranking)
    assert "dense (baseline)" in ranking["text"]["test"]
    packaged = package_flow(overrides=overrides, build=False)
    info = read_bundle_info(packaged["bundle_dir"])
    assert (Path(packaged["bundle_dir"]) / "index" / "text" / "ranking" / "lexical" / "doc_terms.npz").is_file()
    assert set(info["models"]) >= {"image", "text", "multimodal", "price"}


def test_a_model_evaluated_again_on_new_rows_gets_its_version_retagged(pipeline_run: tuple[Path, list[str]]) -> None:
    """Same trained run, new evaluation: no new version, but its tags follow the rows now scored."""
    _, overrides = pipeline_run
    client = MlflowClient()
    name = NAMES["pixel-baseline"]
    evaluate_flow(overrides=overrides, model="pixel-baseline")  # an earlier test retrained the baselines
    version = register_flow(overrides=overrides, model="pixel-baseline")["pixel-baseline"]["version"]
    current = client.get_model_version(name, version).tags["test_split_hash"]
    client.set_model_version_tag(name, version, "test_split_hash", "rows-of-an-older-evaluation")
    again = register_flow(overrides=overrides, model="pixel-baseline")["pixel-baseline"]["version"]
    assert again == version
    tags = client.get_model_version(name, version).tags
    assert tags["test_split_hash"] == current and tags["registered_test_split_hash"] == "rows-of-an-older-evaluation"
