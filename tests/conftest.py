"""Test-session defaults: offline, quiet, and no test ever writes into the project's stores."""

from __future__ import annotations

import atexit
import os
import shutil
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
    from service.devtools import cached_tiny_bundle

    return cached_tiny_bundle(request.config.cache.mkdir("marketplace_tiny_bundle"))
