"""The service's settings: params.yaml's `serve:` section (and the location limit), read once at import.

The file is checked against its typed schema (pipeline_steps/settings.py) when it is loaded, so a
missing, mistyped or out-of-range key fails `bentoml serve` at start-up naming the key.
`MARKETPLACE_PARAMS` names another params file (benchmarks serve with `batch_max_size: 1`);
`MARKETPLACE_BUNDLE_DIR` serves a bundle directory instead of the BentoML model.
"""

from __future__ import annotations

import os

from pipeline_steps import settings as schema
from pipeline_steps.config import load_params
from service.request_validation import Limits

BUNDLE_DIR_ENV = "MARKETPLACE_BUNDLE_DIR"
PARAMS_ENV = "MARKETPLACE_PARAMS"
UI_PATH = "/ui"

_PARAMS_FILE = os.environ.get(PARAMS_ENV) or None
SETTINGS = schema.validate(load_params(_PARAMS_FILE), source=_PARAMS_FILE or "params.yaml")
SERVE = SETTINGS.serve

LIMITS = Limits.from_params(SERVE.model_dump())
BUNDLE_MODEL = SERVE.bundle_model
SERVICE_NAME = SERVE.bento_name
BATCH_MAX_SIZE = SERVE.batch_max_size
BATCH_MAX_LATENCY_MS = float(SERVE.batch_max_latency_ms)
TORCH_THREADS = None if SERVE.torch_threads == "auto" else SERVE.torch_threads  # None: torch's default (all cores)
# A location longer than the clean stage keeps could never match a listing's town or county.
MAX_LOCATION_CHARS = SETTINGS.validation.text.max_chars.location
