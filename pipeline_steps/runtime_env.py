"""The process environment the pipeline, the service and the tests run in: one definition.

Prefect, MLflow, BentoML, great-expectations and the Hugging Face libraries read
their settings from environment variables *when they are imported*: a variable set
after ``import prefect`` is ignored (Prefect's settings object is built at import).
So these values must be in ``os.environ`` before any of those libraries is imported.

This module only *defines* them and offers :func:`apply`; nothing changes at import.
Each entry point calls :func:`apply` before it imports anything heavy:

* ``flows/__init__.py`` — every ``python -m flows.<stage>`` (the dvc.yaml stages, the
  Prefect deployments) imports the package first, so its settings precede the flow
  module's ``import prefect``;
* ``service/__init__.py`` — ``bentoml serve service.service:...``;
* ``tests/conftest.py`` — pytest imports it before any test module.

Every value is a default: a variable the user exported wins (``os.environ.setdefault``).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Telemetry off and hubs offline: these machines reach no network but package registries.
OFFLINE_ENV: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

#: Prefect when no API server is running: a flow run then starts a temporary local API,
#: which on a busy 2-core machine can take far longer than Prefect's default 20 s.
PREFECT_ENV: dict[str, str] = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
}


#: BentoML's store, inside the project: the package stage builds the Bento there and `make serve`
#: serves it from there, whether the stage ran under `make demo` or in a `dvc repro` typed by hand
#: (BentoML's own default, ~/bentoml, left the two looking in different stores).
BENTOML_ENV: dict[str, str] = {
    "BENTOML_HOME": str(PROJECT_ROOT / "bentoml_home"),
}


def runtime_env() -> dict[str, str]:
    """Every default of the project's processes (offline switches, Prefect, BentoML's store), as a new dict."""
    return {**OFFLINE_ENV, **PREFECT_ENV, **BENTOML_ENV}


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set each default in `environ` (``os.environ`` by default) unless already set.

    Args:
        environ: the mapping to update; a subprocess's ``env`` dict works too.

    Returns:
        The variables this call set (those the caller had not set already).
    """
    target = os.environ if environ is None else environ
    applied: dict[str, str] = {}
    for key, value in runtime_env().items():
        if key not in target:
            target[key] = value
            applied[key] = value
    return applied


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline_steps.runtime_env -- CMD ...``: run CMD with the project's environment.

    For entry points that are not the project's own Python modules (``prefect server
    start``, ``mlflow ui``, ``bentoml serve``): they import their library before any
    project code could set a variable, so the variables must be set by their parent.
    """
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m pipeline_steps.runtime_env -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    apply()
    os.execvp(args[0], args)
    return 0  # not reached: exec replaces this process


if __name__ == "__main__":
    raise SystemExit(main())
