"""pipeline_steps.registry (and tracking, lineage, promotion) against a real MLflow store (SQLite + local artifacts in tmp_path).

One small scikit-learn model is logged once per module (logging is the slow part) and
registered many times under different names, each version with its own test metrics.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from pipeline_steps import promotion, registry, tracking
from pipeline_steps.errors import ConfigError
from pipeline_steps.lineage import run_tags
from pipeline_steps.promotion import PromotionDecision, PromotionPolicy, Standing, decide, promotion_settings, split_hash
from pipeline_steps.registry import (
    RegistryError,
    champion_uri,
    champion_version,
    download_champion,
    model_name,
    promote,
    register_model_version,
)
from pipeline_steps.tracking import configure_tracking, flatten_params, log_figure_file, log_params_section

pytestmark = pytest.mark.filterwarnings("ignore:Hint. Inferred schema contains integer:UserWarning")

REGISTRY_PARAMS = {
    "tracking_uri": "sqlite:///mlruns/mlflow.db",
    "artifact_root": "mlruns/artifacts",
    "experiment": "marketplace-test",
    "model_prefix": "marketplace",
    "champion_alias": "champion",
    "challenger_alias": "challenger",
    "promotion": {"classifier_metric": "accuracy", "price_metric": "median_abs_error",
                  "classifier_min_improvement": 0.0, "price_min_improvement": 0.0},
}


def _promotion(**overrides: object) -> dict:
    """A complete `registry.promotion` section: REGISTRY_PARAMS' values with `overrides`."""
    return {**REGISTRY_PARAMS["promotion"], **overrides}
SPLIT = split_hash(range(30))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store in tmp (env MLFLOW_TRACKING_URI points at it) with one logged sklearn model."""
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("store")
    db = root / "mlruns" / "mlflow.db"
    previous_tracking, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        experiment_id = configure_tracking(REGISTRY_PARAMS, root)

        features = pd.DataFrame({"x1": [0.0, 0.2, 0.4, 2.0, 2.2, 2.4], "x2": [1.0, 0.8, 1.1, 3.0, 3.1, 2.9]})
        labels = np.array([0, 0, 0, 1, 1, 1])
        model = LogisticRegression().fit(features, labels)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_metric("test_accuracy", 0.5)
            info = mlflow.sklearn.log_model(
                model,
                name="model",
                input_example=features.head(2),
                pip_requirements=["scikit-learn", "pandas", "numpy"],
            )
        yield {
            "root": root,
            "db": db,
            "experiment_id": experiment_id,
            "model_uri": info.model_uri,
            "run_id": run.info.run_id,
            "features": features,
            "labels": labels,
        }
    # Leave no store behind for other test modules.
    mlflow.set_tracking_uri(previous_tracking)
    mlflow.set_registry_uri(previous_registry)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        tracking._SET_BY_US[key] = None
        os.environ.pop(key, None)


def _register(store, name, value, metric="accuracy", split=SPLIT, **extra_metrics):
    return register_model_version(
        store["model_uri"],
        name,
        store["run_id"],
        {metric: value, **extra_metrics},
        description=f"{metric}={value}",
        promotion_metric=metric,
        test_split_hash=split,
    )


def _alias_version(name, alias):
    found = champion_version(name, alias)
    return found[0] if found else None


# --- configure_tracking -----------------------------------------------------------------


def test_configure_tracking_uses_env_store_and_local_artifacts(store):
    assert mlflow.get_tracking_uri() == f"sqlite:///{store['db']}"
    assert mlflow.get_registry_uri() == mlflow.get_tracking_uri()
    assert store["db"].is_file()
    experiment = MlflowClient().get_experiment(store["experiment_id"])
    assert experiment.name == "marketplace-test"
    assert experiment.artifact_location == (store["root"] / "mlruns" / "artifacts").resolve().as_uri()
    # The logged model's files really are under the artifact root.
    assert any((store["root"] / "mlruns" / "artifacts").rglob("MLmodel"))
    # Idempotent: same experiment again.
    assert configure_tracking(REGISTRY_PARAMS, store["root"]) == store["experiment_id"]
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def _seed_store(store, root):
    """Copy the module's (already migrated) database: creating a fresh MLflow schema takes ~10 s."""
    target = root / "mlruns" / "mlflow.db"
    target.parent.mkdir(parents=True)
    with sqlite3.connect(store["db"]) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
    return target


def test_configure_tracking_default_relative_sqlite_under_root(store, tmp_path, monkeypatch):
    project = tmp_path / "project"
    db = _seed_store(store, project).resolve()
    params = {**REGISTRY_PARAMS, "experiment": "relative-default"}
    monkeypatch.chdir(tmp_path)  # a relative path must resolve against root, not the cwd
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    try:
        first = configure_tracking(params, project)
        assert mlflow.get_tracking_uri() == f"sqlite:///{db}" == mlflow.get_registry_uri()
        assert (project / "mlruns" / "artifacts").is_dir()
        assert not (tmp_path / "mlruns").exists()
        experiment = MlflowClient().get_experiment(first)
        assert experiment.artifact_location == (project / "mlruns" / "artifacts").resolve().as_uri()
        # mlflow.set_tracking_uri exported the URI: a second call must not take it for a user override.
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{db}"
        assert configure_tracking(params, project) == first
        # A deleted experiment is restored, not duplicated.
        MlflowClient().delete_experiment(first)
        assert configure_tracking(params, project) == first
        assert MlflowClient().get_experiment(first).lifecycle_stage == "active"
    finally:
        monkeypatch.undo()
        configure_tracking(REGISTRY_PARAMS, store["root"])
    assert mlflow.get_tracking_uri() == f"sqlite:///{store['db']}"


@pytest.mark.integration
def test_configure_tracking_from_several_processes(tmp_path):
    """Fresh store, concurrent first calls: one creates the schema and experiment, all agree on the id."""
    root = tmp_path / "proj"
    script = textwrap.dedent(
        f"""
        import sys, yaml
        from pipeline_steps.tracking import configure_tracking
        params = yaml.safe_load({yaml.safe_dump(REGISTRY_PARAMS)!r})
        print(configure_tracking(params, {str(root)!r}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=180) for proc in procs]
    for proc, (_out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    ids = {out.strip().splitlines()[-1] for out, _err in results}
    assert len(ids) == 1


def test_resolve_tracking_uri():
    root = Path("/srv/project")
    assert tracking.resolve_tracking_uri("sqlite:///mlruns/mlflow.db", root) == "sqlite:////srv/project/mlruns/mlflow.db"
    assert tracking.resolve_tracking_uri("sqlite:////abs/db.sqlite", root) == "sqlite:////abs/db.sqlite"
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000", root) == "http://127.0.0.1:5000"


# --- names, tags, params ---------------------------------------------------------------


def test_model_name():
    assert model_name("marketplace", "image") == "marketplace-image-classifier"
    assert model_name("marketplace", "text") == "marketplace-text-classifier"
    assert model_name("marketplace", "multimodal") == "marketplace-multimodal-classifier"
    assert model_name("marketplace", "price") == "marketplace-price-estimator"
    assert model_name("marketplace", "text_baseline") == "marketplace-text-baseline"
    assert model_name("marketplace", "baseline-price") == "marketplace-price-baseline"
    with pytest.raises(ConfigError, match="accepted"):
        model_name("marketplace", "audio")
    with pytest.raises(ConfigError):
        model_name("marketplace", "baseline")


def test_promotion_settings():
    price = promotion_settings(REGISTRY_PARAMS, "price")
    assert price["metric"] == "median_abs_error" and price["higher_is_better"] is False
    text = promotion_settings(REGISTRY_PARAMS, "text")
    assert text["metric"] == "accuracy" and text["higher_is_better"] is True
    assert text["champion_alias"] == "champion" and text["challenger_alias"] == "challenger"


def test_promotion_margins_are_per_metric():
    """One accuracy point and one pound are different margins; the old shared key is named, not read."""
    params = {**REGISTRY_PARAMS, "promotion": _promotion(classifier_min_improvement=0.01, price_min_improvement=2.5)}
    assert promotion_settings(params, "text")["min_improvement"] == 0.01
    assert promotion_settings(params, "price")["min_improvement"] == 2.5
    # issue 10: the schema has no shared `min_improvement` (it would be a silent fallback): an unknown key
    legacy = {**REGISTRY_PARAMS, "promotion": _promotion(min_improvement=0.02)}
    with pytest.raises(ConfigError, match="registry.promotion.min_improvement"):
        promotion_settings(legacy, "image")
    with pytest.raises(ConfigError, match="registry.promotion.min_improvement"):
        promotion_settings(legacy, "price")


def test_run_tags_outside_git_uses_content_hash(tmp_path):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "Products.csv").write_text("id,product_name\n1,a\n")
    (raw / "Images.csv").write_text("id,product_id\nx,1\n")
    (raw / "images" / "x.jpg").write_bytes(b"jpeg")
    tags = run_tags(tmp_path, "raw")
    assert tags["git_commit"] == "unknown" and tags["git_dirty"] == "unknown"
    assert tags["raw_dir"] == "raw"
    assert tags["dvc_data_version"].startswith("content-sha256:")
    assert all(isinstance(value, str) for value in tags.values())
    assert run_tags(tmp_path, raw)["dvc_data_version"] == tags["dvc_data_version"]  # stable
    (raw / "images" / "y.jpg").write_bytes(b"more")
    assert run_tags(tmp_path, raw)["dvc_data_version"] != tags["dvc_data_version"]


@pytest.mark.integration
def test_run_tags_git_and_dvc_records(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "Products.csv").write_text("id\n1\n")
    # dvc.lock records the raw directory as a stage dependency.
    (tmp_path / "dvc.lock").write_text(
        yaml.safe_dump(
            {"schema": "2.0", "stages": {"validate": {"cmd": "x", "deps": [{"path": "data/raw", "hash": "md5", "md5": "lock123.dir"}]}}}
        )
    )
    tags = run_tags(tmp_path, "data/raw")
    assert len(tags["git_commit"]) == 40
    assert tags["git_dirty"] == "true"  # untracked files
    assert tags["dvc_data_version"] == "lock123.dir" and tags["dvc_data_version_source"] == "dvc.lock"
    # A data/raw.dvc file (dvc add) takes precedence.
    (tmp_path / "data" / "raw.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "file456.dir", "path": "raw"}]}))
    assert run_tags(tmp_path, "data/raw")["dvc_data_version"] == "file456.dir"


def test_log_params_section_and_figure(store, tmp_path):
    section = {"image": {"lr": 0.003, "augmentation": ["flip"], "weights": None}, "seed": 7}
    assert flatten_params(section, "train") == {
        "train.image.lr": "0.003",
        "train.image.augmentation": '["flip"]',
        "train.image.weights": "null",
        "train.seed": "7",
    }
    figure = tmp_path / "confusion.png"
    figure.write_bytes(b"\x89PNG fake")
    with pytest.raises(RegistryError):
        log_params_section(section, "train")  # no active run
    with mlflow.start_run(experiment_id=store["experiment_id"]) as run:
        log_params_section(section, "train")
        assert log_figure_file(figure, "plots") == "plots/confusion.png"
    client = MlflowClient()
    assert client.get_run(run.info.run_id).data.params["train.image.lr"] == "0.003"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/confusion.png"]


# --- registration and promotion --------------------------------------------------------


def test_register_refuses_without_metrics(store):
    client = MlflowClient()
    name = "refusal-model"
    with pytest.raises(RegistryError, match="no test metrics"):
        register_model_version(store["model_uri"], name, store["run_id"], {}, promotion_metric="accuracy")
    with pytest.raises(RegistryError, match="promotion metric 'accuracy'"):
        register_model_version(store["model_uri"], name, store["run_id"], {"macro_f1": 0.5}, promotion_metric="accuracy")
    with pytest.raises(RegistryError, match="finite"):
        register_model_version(store["model_uri"], name, store["run_id"], {"accuracy": float("nan")}, promotion_metric="accuracy")
    assert client.search_model_versions(f"name='{name}'") == []


def test_register_sets_metric_tags_and_run_id(store):
    version = _register(store, "tagged-model", 0.8125, macro_f1=np.float64(0.7))
    assert version.status == "READY"
    assert version.tags["metric.accuracy"] == "0.8125"
    assert version.tags["metric.macro_f1"] == "0.7"
    assert version.tags["run_id"] == store["run_id"]
    assert version.tags["test_split_hash"] == SPLIT
    assert version.description == "accuracy=0.8125"
    # A metrics file shaped {"test": {...}, "val": {...}} registers its test metrics.
    nested = register_model_version(
        store["model_uri"], "tagged-model", store["run_id"],
        {"test": {"accuracy": 0.9}, "val": {"accuracy": 0.1}}, promotion_metric="accuracy",
    )
    assert nested.tags["metric.accuracy"] == "0.9" and "metric.val.accuracy" not in nested.tags


def test_first_version_becomes_champion_and_loads(store, tmp_path, caplog):
    name = model_name("marketplace", "text")
    version = _register(store, name, 0.70)
    with caplog.at_level(logging.INFO, logger="pipeline_steps.registry"):
        decision = promote(name, version.version, "accuracy", higher_is_better=True)
    assert isinstance(decision, PromotionDecision)
    assert decision.promoted and decision.champion_version is None and decision.new_value == pytest.approx(0.70)
    assert "no champion" in decision.reason
    assert any("PROMOTED" in record.getMessage() for record in caplog.records)
    assert champion_version(name, "champion") == (str(version.version), store["run_id"])
    assert champion_version(name, "nobody") is None
    assert champion_version("no-such-model", "champion") is None

    model = mlflow.pyfunc.load_model(champion_uri(name))
    predictions = model.predict(store["features"])
    assert list(predictions) == list(store["labels"])

    local = download_champion(name, "champion", tmp_path / "download")
    assert (local / "MLmodel").is_file()
    assert local.is_relative_to(tmp_path / "download")


def test_better_version_moves_champion_worse_gets_challenger(store):
    name = model_name("marketplace", "image")
    v1 = _register(store, name, 0.60)
    assert promote(name, v1.version, "accuracy").promoted

    v2 = _register(store, name, 0.75)
    decision = promote(name, v2.version, "accuracy", higher_is_better=True, min_improvement=0.01)
    assert decision.promoted
    assert decision.champion_version == str(v1.version) and decision.champion_value == pytest.approx(0.60)
    assert _alias_version(name, "champion") == str(v2.version)

    v3 = _register(store, name, 0.70)
    decision = promote(name, v3.version, "accuracy", higher_is_better=True)
    assert not decision.promoted
    assert decision.alias == "challenger"
    assert "0.7" in decision.reason and "0.75" in decision.reason
    assert _alias_version(name, "champion") == str(v2.version)
    assert _alias_version(name, "challenger") == str(v3.version)

    # Better, but not by more than min_improvement: stays challenger.
    v4 = _register(store, name, 0.755)
    decision = promote(name, v4.version, "accuracy", min_improvement=0.01)
    assert not decision.promoted and "min_improvement=0.01" in decision.reason
    assert _alias_version(name, "champion") == str(v2.version)
    assert _alias_version(name, "challenger") == str(v4.version)

    # Promoting the champion again changes nothing.
    assert not promote(name, v2.version, "accuracy").promoted
    assert _alias_version(name, "champion") == str(v2.version)


def test_lower_is_better_price_metric(store):
    name = model_name("marketplace", "price")
    settings = promotion_settings(REGISTRY_PARAMS, "price")
    v1 = _register(store, name, 30.0, metric="median_abs_error")
    assert promote(name, v1.version, **settings).promoted

    worse = _register(store, name, 35.0, metric="median_abs_error")
    decision = promote(name, worse.version, **settings)
    assert not decision.promoted and "35" in decision.reason and "30" in decision.reason
    assert _alias_version(name, "champion") == str(v1.version)

    better = _register(store, name, 25.0, metric="median_abs_error")
    decision = promote(name, better.version, **settings)
    assert decision.promoted and decision.champion_value == pytest.approx(30.0)
    assert _alias_version(name, "champion") == str(better.version)
    # The challenger alias stays on the last version that lost.
    assert _alias_version(name, "challenger") == str(worse.version)


def test_different_test_split_is_not_comparable(store):
    name = model_name("marketplace", "multimodal")
    v1 = _register(store, name, 0.50)
    assert promote(name, v1.version, "accuracy").promoted
    other_split = _register(store, name, 0.99, split=split_hash(range(31)))
    decision = promote(name, other_split.version, "accuracy")
    assert not decision.promoted and "not comparable" in decision.reason
    assert _alias_version(name, "champion") == str(v1.version)
    assert _alias_version(name, "challenger") == str(other_split.version)


def test_champion_value_falls_back_to_run_metrics(store):
    """A champion registered without metric tags (by hand) is judged by its run's test_<metric>."""
    name = "legacy-model"
    client = MlflowClient()
    legacy = mlflow.register_model(store["model_uri"], name, tags={"test_split_hash": SPLIT})
    client.set_registered_model_alias(name, "champion", legacy.version)
    newer = _register(store, name, 0.55)
    decision = promote(name, newer.version, "accuracy")
    assert decision.champion_value == pytest.approx(0.5)  # the run's test_accuracy
    assert decision.promoted


# --- the promotion policy: direction from the metric, decide() without a store ------------------


def test_classifier_log_loss_is_lower_is_better():
    """`classifier_metric: log_loss` must promote the LOWER log-loss (before: every classifier metric went up)."""
    params = {**REGISTRY_PARAMS, "promotion": _promotion(classifier_metric="log_loss", price_metric="median_abs_error")}
    settings = promotion_settings(params, "text")
    assert settings["metric"] == "log_loss" and settings["higher_is_better"] is False
    # and a price model judged by a score goes up
    score = {**REGISTRY_PARAMS, "promotion": _promotion(price_metric="r2_log")}
    assert promotion_settings(score, "price")["higher_is_better"] is True


def test_log_loss_promotion_keeps_the_better_champion(store):
    name = "log-loss-judged-classifier"
    settings = promotion_settings({**REGISTRY_PARAMS, "promotion": _promotion(classifier_metric="log_loss")}, "text")
    first = _register(store, name, 0.50, metric="log_loss")
    assert promote(name, first.version, **settings).promoted
    worse = _register(store, name, 0.90, metric="log_loss")
    decision = promote(name, worse.version, **settings)
    assert not decision.promoted and "lower is better" in decision.reason
    assert _alias_version(name, "champion") == str(first.version)
    better = _register(store, name, 0.30, metric="log_loss")
    assert promote(name, better.version, **settings).promoted
    # without an explicit direction, promote() takes it from the metric too
    best = _register(store, name, 0.20, metric="log_loss")
    assert promote(name, best.version, "log_loss").promoted
    assert _alias_version(name, "champion") == str(best.version)


def test_metric_directions():
    assert promotion.higher_is_better("accuracy") and promotion.higher_is_better("macro_f1")
    assert promotion.higher_is_better("top3_accuracy") and promotion.higher_is_better("r2_log")
    assert not promotion.higher_is_better("log_loss") and not promotion.higher_is_better("median_abs_error")
    assert not promotion.higher_is_better("median_abs_error_true_category")
    assert not promotion.higher_is_better("baseline_median_abs_error")
    with pytest.raises(ConfigError, match="accepted"):
        promotion.higher_is_better("vibes")
    with pytest.raises(ConfigError, match="vibes"):
        promotion_settings({**REGISTRY_PARAMS, "promotion": _promotion(classifier_metric="vibes")}, "image")


def test_decide_is_pure_and_explains_itself():
    loss = PromotionPolicy("log_loss", higher_is_better=False, min_improvement=0.05)
    assert decide(Standing("1", 0.7, "s"), None, loss).promoted
    lower = decide(Standing("2", 0.6, "s"), Standing("1", 0.7, "s"), loss)
    assert lower.promoted and lower.champion_version == "1" and lower.champion_value == 0.7
    small = decide(Standing("2", 0.68, "s"), Standing("1", 0.7, "s"), loss)
    assert not small.promoted and "min_improvement=0.05" in small.reason
    other_rows = decide(Standing("2", 0.1, "s2"), Standing("1", 0.7, "s"), loss)
    assert not other_rows.promoted and "not comparable" in other_rows.reason
    no_value = decide(Standing("2", 0.1, "s"), Standing("1", None, "s"), loss)
    assert not no_value.promoted and "not comparable" in no_value.reason
    assert not decide(Standing("1", 0.7, "s"), Standing("1", 0.7, "s"), loss).promoted
    accuracy = PromotionPolicy.from_params(REGISTRY_PARAMS, "image")
    assert decide(Standing("2", 0.8, "s"), Standing("1", 0.7, "s"), accuracy).promoted
    assert not decide(Standing("2", 0.6, "s"), Standing("1", 0.7, "s"), accuracy).promoted


def test_importing_the_registry_modules_changes_no_environment_variable():
    """Importing must not set MLFLOW_DISABLE_TELEMETRY or anything else (it did: os.environ at import)."""
    script = textwrap.dedent(
        """
        import json, os, sys
        before = dict(os.environ)
        import pipeline_steps.registry, pipeline_steps.tracking, pipeline_steps.lineage, pipeline_steps.promotion
        after = dict(os.environ)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        print(json.dumps(changed))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
