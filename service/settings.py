"""The service's settings: params.yaml's `serve:` section (and the location limit), read once at import.

`MARKETPLACE_PARAMS` names another params file (benchmarks serve with `batch_max_size: 1`);
`MARKETPLACE_BUNDLE_DIR` serves a bundle directory instead of the BentoML model. A missing or
mistyped key fails `bentoml serve` at start-up with the key's path (pipeline_steps.config.get).
"""

from __future__ import annotations

import os
from typing import Any

from pipeline_steps.config import get, load_params
from pipeline_steps.errors import ConfigError
from service.request_validation import Limits

BUNDLE_DIR_ENV = "MARKETPLACE_BUNDLE_DIR"
PARAMS_ENV = "MARKETPLACE_PARAMS"
UI_PATH = "/ui"

PARAMS: dict[str, Any] = load_params(os.environ.get(PARAMS_ENV) or None)
SERVE: dict[str, Any] = get(PARAMS, "serve")
if not isinstance(SERVE, dict):
    raise ConfigError("params.yaml key 'serve' must be a mapping")


def _positive_int(key: str) -> int:
    value = get(PARAMS, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"params.yaml key '{key}' must be a positive integer, got {value!r}")
    return value


def _torch_threads() -> int | None:
    value = get(PARAMS, "serve.torch_threads")
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"params.yaml key 'serve.torch_threads' must be 'auto' or a positive integer, got {value!r}")
    return value


LIMITS = Limits.from_params(SERVE)
BUNDLE_MODEL = str(get(PARAMS, "serve.bundle_model"))
SERVICE_NAME = str(get(PARAMS, "serve.bento_name"))
BATCH_MAX_SIZE = _positive_int("serve.batch_max_size")
BATCH_MAX_LATENCY_MS = float(get(PARAMS, "serve.batch_max_latency_ms"))
TORCH_THREADS = _torch_threads()  # None: torch's default (all cores)
# A location longer than the clean stage keeps could never match a listing's town or county.
MAX_LOCATION_CHARS = _positive_int("validation.text.max_chars.location")
