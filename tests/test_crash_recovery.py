"""Crash at any point, recover: SIGKILL a stage mid-way, run it again, get the uninterrupted outputs.

A stage is killed with SIGKILL (no cleanup runs, as with the OOM killer) at named points through
the test hook MARKETPLACE_CRASH_AT (pipeline_steps/faults.py): during photo conversion, while
the clean and validated tables are written, while an index is written, and after a model
version is created but before it is promoted. Each test checks that

- the previous outputs are still whole (nothing half-written is ever where a reader looks);
- running the step again gives outputs equal to an uninterrupted run's;
- the temporaries the killed process left are swept by the next run;
- the registry holds no version without its metrics and no alias on a half-registered version.

Tiny data and the step functions in a subprocess (no Prefect flow), so each kill costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline_steps.cleaning import clean_dataset
from pipeline_steps.config import load_params
from pipeline_steps.index import SimilarityIndex
from pipeline_steps.io_utils import sweep_stale
from pipeline_steps.validation import validate_raw
from tests.support.flow_helpers import tiny_raw_export

ROOT = Path(__file__).resolve().parents[1]
CLEANING = {**load_params()["cleaning"], "image_size": 32, "min_products_per_class": 3}
VALIDATION = load_params()["validation"]


def run_killed(code: str, crash_at: str, **args: Any) -> None:
    """Run `code` (with `args` as JSON in ARGS) in a fresh interpreter that must die by SIGKILL."""
    script = "import json, os, sys\nfrom pathlib import Path\nARGS = json.loads(os.environ['ARGS'])\n" + textwrap.dedent(code)
    env = {**os.environ, "MARKETPLACE_CRASH_AT": crash_at, "ARGS": json.dumps(args, default=str)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, f"not killed at {crash_at} (rc {done.returncode}):\n{done.stderr[-3000:]}"


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (the stage stamp aside)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "_stage_stamp.json"
    }


def leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.rglob(".*") if ".tmp" in path.name or ".old-" in path.name)


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny raw export, its validated layer, and reference clean layers from uninterrupted runs."""
    work = tmp_path_factory.mktemp("crash")
    raw = tiny_raw_export(work / "raw")
    validate_raw(raw, work / "validated", VALIDATION, work / "docs")
    clean_dataset(work / "validated", raw / "images", work / "reference", CLEANING, progress=False)
    clean_dataset(work / "validated", raw / "images", work / "previous", {**CLEANING, "image_size": 24}, progress=False)
    return {"work": work, "raw": raw}


CLEAN_CODE = """
from pipeline_steps.cleaning import clean_dataset
clean_dataset(Path(ARGS["validated"]), Path(ARGS["images"]), Path(ARGS["out"]), ARGS["params"], progress=False)
"""


@pytest.mark.integration
@pytest.mark.parametrize(
    "crash_at",
    [
        "convert_image:40",          # during photo conversion
        "replace:listings.parquet",  # tables half written
        "swap:clean",                # everything written, not yet swapped in
    ],
)
def test_clean_killed_anywhere_keeps_the_old_layer_and_reruns_to_the_same_output(layers, tmp_path, crash_at) -> None:
    import shutil

    work = layers["work"]
    out = tmp_path / "data" / "clean"
    shutil.copytree(work / "previous", out)
    previous = tree(out)

    run_killed(CLEAN_CODE, crash_at, validated=work / "validated", images=layers["raw"] / "images", out=out,
               params=CLEANING)
    assert tree(out) == previous, "the previous clean layer was changed by a killed run"
    assert leftovers(out) == [], "a temporary was left inside the clean layer, where readers look"
    assert leftovers(out.parent), "the killed run should have left its temporary beside the layer"

    clean_dataset(work / "validated", layers["raw"] / "images", out, CLEANING, progress=False)
    assert tree(out) == tree(work / "reference"), "the rerun differs from an uninterrupted run"
    assert leftovers(out.parent) == [], "the rerun did not sweep the killed run's temporaries"


VALIDATE_CODE = """
from pipeline_steps.validation import validate_raw
validate_raw(Path(ARGS["raw"]), Path(ARGS["out"]), ARGS["params"], Path(ARGS["docs"]))
"""


@pytest.mark.integration
def test_validate_killed_while_writing_keeps_a_whole_layer(layers, tmp_path) -> None:
    work = layers["work"]
    out = tmp_path / "validated"
    run_killed(VALIDATE_CODE, "replace:products.parquet", raw=layers["raw"], out=out, params=VALIDATION,
               docs=tmp_path / "docs")
    assert not out.exists(), "a killed first run must not leave a partial validated layer"
    validate_raw(layers["raw"], out, VALIDATION, tmp_path / "docs")
    assert tree(out) == tree(work / "validated")
    assert leftovers(tmp_path) == []


INDEX_CODE = """
import numpy as np, pandas as pd
from pipeline_steps.index import SimilarityIndex
vectors = np.random.default_rng(ARGS["seed"]).normal(size=(200, 16)).astype("float32")
ids = pd.DataFrame({"product_id": [f"p{i}" for i in range(200)]})
SimilarityIndex.build(vectors, ids, kind="text", use_gpu=False, model_name="m", model_version=ARGS["seed"]).save(Path(ARGS["out"]))
"""


def _index(seed: int, out: Path) -> None:
    vectors = np.random.default_rng(seed).normal(size=(200, 16)).astype("float32")
    ids = pd.DataFrame({"product_id": [f"p{i}" for i in range(200)]})
    SimilarityIndex.build(vectors, ids, kind="text", use_gpu=False, model_name="m", model_version=seed).save(out)


def _index_files(directory: Path) -> dict[str, Any]:
    meta = json.loads((directory / "index.json").read_text())
    meta.pop("built_at")
    files = tree(directory)
    files.pop("index.json")
    return {**files, "meta": meta}


@pytest.mark.integration
@pytest.mark.parametrize("crash_at", ["replace:index.json", "swap:text"])
def test_index_killed_while_written_keeps_the_old_index(tmp_path, crash_at) -> None:
    out = tmp_path / "index" / "text"
    _index(1, out)
    before = _index_files(out)
    run_killed(INDEX_CODE, crash_at, seed=2, out=out)
    assert _index_files(out) == before
    loaded = SimilarityIndex.load(out, expected_model=("m", "1"), use_gpu=False)
    assert loaded.size == 200

    _index(2, out)
    _index(2, tmp_path / "reference")
    assert _index_files(out) == _index_files(tmp_path / "reference")
    assert leftovers(tmp_path) == []


REGISTER_CODE = """
import mlflow
from pipeline_steps import registry
mlflow.set_tracking_uri(ARGS["uri"]); mlflow.set_registry_uri(ARGS["uri"])
registry.register_model_version(ARGS["model_uri"], ARGS["name"], ARGS["run_id"], ARGS["metrics"],
                                description="d", promotion_metric="accuracy", test_split_hash="h")
"""


@pytest.mark.integration
def test_register_killed_after_the_version_is_created(tmp_path, monkeypatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    from pipeline_steps import registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("crash", artifact_location=(tmp_path / "artifacts").as_uri())

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):  # noqa: ANN001
            return [0] * len(model_input)

    with mlflow.start_run(experiment_id=experiment) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=[])
    name, metrics = "crash-classifier", {"accuracy": 0.5, "macro_f1": 0.4}

    run_killed(REGISTER_CODE, "registered_version", uri=uri, model_uri=info.model_uri, name=name,
               run_id=run.info.run_id, metrics=metrics)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1
    for version in versions:  # created with its metric tags in one request
        assert version.tags.get("metric.accuracy") == "0.5" and version.tags.get("test_split_hash") == "h"
    assert client.get_registered_model(name).aliases == {}, "an alias points at a half-registered version"

    # What the register stage does on its rerun: reuse the version of this run, then promote it.
    existing = registry.version_of_run(name, run.info.run_id)
    assert existing is not None and str(existing.version) == str(versions[0].version)
    decision = registry.promote(name, existing.version, metric="accuracy", higher_is_better=True)
    assert decision.promoted
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.status == "READY" and champion.tags.get("metric.accuracy") == "0.5"
    assert len(client.search_model_versions(f"name='{name}'")) == 1


def test_sweep_keeps_a_live_writers_temporaries(tmp_path) -> None:
    target = tmp_path / "out.parquet"
    live = tmp_path / f".out.parquet.{os.getpid()}.abc.tmp"
    dead = tmp_path / ".out.parquet.999999999.abc.tmp"
    old = tmp_path / ".out.parquet.old-999999999"
    for path in (live, dead):
        path.write_text("x")
    old.mkdir()
    assert sorted(p.name for p in sweep_stale(target)) == sorted([dead.name, old.name])
    assert live.exists() and not dead.exists() and not old.exists()


TRAIN_CODE = """
from pipeline_steps.training import train_text_classifier
train_text_classifier(Path(ARGS["clean"]), ARGS["params"], Path(ARGS["out"]), resume=True, progress=False)
"""


def _text_params(work: Path, name: str) -> dict[str, Any]:
    import copy

    params = copy.deepcopy(load_params()["train"])
    params.update(num_threads=1, checkpoints_dir=str(work / name / "checkpoints"), models_dir=str(work / name / "models"))
    params["text"].update(epochs=4, max_length=32, batch_size=32, wide_max_features=2000)
    params["early_stopping_patience"] = 10
    return params


@pytest.mark.integration
def test_training_killed_after_a_checkpoint_resumes_to_the_uninterrupted_model(layers, tmp_path) -> None:
    import torch

    from pipeline_steps.training import train_text_classifier

    clean = layers["work"] / "reference"
    reference = train_text_classifier(clean, _text_params(tmp_path, "ref"), tmp_path / "ref" / "model",
                                      progress=False)
    assert reference is not None
    params = _text_params(tmp_path, "crash")
    out = tmp_path / "crash" / "model"
    run_killed(TRAIN_CODE, "replaced:last.pt:2", clean=clean, params=params, out=out)
    assert not out.exists(), "a killed training run must not leave a model directory"
    assert (tmp_path / "crash" / "checkpoints" / "text" / "last.pt").is_file()

    train_text_classifier(clean, params, out, resume=True, progress=False)
    ours, theirs = torch.load(out / "model.pt"), torch.load(tmp_path / "ref" / "model" / "model.pt")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), f"resumed weights differ at {key}"
    history = json.loads((out / "history.json").read_text())
    reference_history = json.loads((tmp_path / "ref" / "model" / "history.json").read_text())
    losses = lambda h: [round(epoch["val_loss"], 6) for epoch in (h if isinstance(h, list) else h["epochs"])]  # noqa: E731
    assert losses(history) == losses(reference_history)
