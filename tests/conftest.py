"""Test-session defaults: offline, quiet, and no test ever writes into the project's stores."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="marketplace-tests-"))
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)

for key, value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's temporary API logs "Stopping temporary server" after pytest has closed its streams.
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

# Stores live in the session's temporary folder, whatever the shell (or the Makefile) points at:
# a test must never register versions in a user's MLflow server or fill their BentoML store.
# Prefect's run history is not a store a test can spoil; keeping its database between sessions
# spares every session the schema migration of a fresh one.
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlruns' / 'mlflow.db'}"
os.environ["BENTOML_HOME"] = str(_SESSION_DIR / "bentoml")
