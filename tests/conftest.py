"""Test-session defaults: offline, quiet, and no test ever writes into the project's stores."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="marketplace-tests-"))
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)

# Prefect's temporary API logs "Stopping temporary server" after pytest has closed its streams.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The project's process environment, before any test module imports Prefect, MLflow or BentoML
# (they read their settings at import: tests/test_runtime_env.py checks that this holds).
from pipeline_steps import runtime_env  # noqa: E402

runtime_env.apply()

# Stores live in the session's temporary folder, whatever the shell (or the Makefile) points at:
# a test must never register versions in a user's MLflow server or fill their BentoML store.
# (Prefect's run history stays in the project's .prefect/, set by flows.common: it is not a
# store a test can spoil, and keeping it spares each session a fresh database's migration.)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlruns' / 'mlflow.db'}"
os.environ["BENTOML_HOME"] = str(_SESSION_DIR / "bentoml")


@pytest.fixture(scope="module")
def bundle_dir(request: pytest.FixtureRequest) -> Path:
    """The serving bundle the service tests run against: MARKETPLACE_TEST_BUNDLE, else a tiny one
    built once and kept in pytest's cache (shared by test_service, test_service_ranking, test_search_page)."""
    override = os.environ.get("MARKETPLACE_TEST_BUNDLE")
    if override:
        return Path(override)
    from tests.support.tiny_bundle import cached_tiny_bundle

    return cached_tiny_bundle(request.config.cache.mkdir("marketplace_tiny_bundle"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: extra threads only add overhead (and spin badly on a busy shared CPU).

    Model building and inference run outside the training loop's thread setting, so the model
    tests keep torch at one thread for their whole module:
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _mlflow_uris_restored():
    """A test that points MLflow at its own store leaves the next test where it found it.

    `mlflow.set_tracking_uri`/`set_registry_uri` set process-wide globals and also export
    MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI, which every later test and every subprocess a
    test starts would inherit (a registry URI left behind by one test sent another test's
    `models:/name@champion` to the wrong store).
    """
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {key: os.environ.get(key) for key in keys}
    saved_globals = _mlflow_globals()
    yield
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        tracking_utils._tracking_uri, registry_utils._registry_uri = saved_globals


def _mlflow_globals() -> tuple[str | None, str | None]:
    """MLflow's explicitly set tracking and registry URIs (None: not set, or MLflow not imported)."""
    if "mlflow" not in sys.modules:
        return None, None
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return tracking_utils._tracking_uri, registry_utils._registry_uri
