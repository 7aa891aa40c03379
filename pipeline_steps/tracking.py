"""MLflow tracking: which store runs go to, and what each run records (params, figures, run ids).

The pipeline keeps one MLflow store (SQLite backend + a local artifact folder by default,
`registry:` in params.yaml; `MLFLOW_TRACKING_URI` overrides it). This module points MLflow
at it (`configure_tracking`), says within seconds when a tracking server is gone
(`require_tracking_server`, `tracking_guard`), and keeps the run bookkeeping the stages
share: a model directory remembers the MLflow run that trained it (`run_id.txt`), so the
evaluate and register stages add their results to that same run and the MLflow UI shows
one run per trained model with its curves, test metrics and registered version.

Nothing happens at import: the environment is only touched by `configure_tracking` and
`bound_http_retries`, when a stage asks for a store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline_steps.config import PROJECT_ROOT, resolve_path
from pipeline_steps.errors import ConfigError, PipelineError
from pipeline_steps.io_utils import write_text
from pipeline_steps.lineage import run_tags

logger = logging.getLogger(__name__)

RUN_ID_FILE = "run_id.txt"


# The URIs this module last set: mlflow.set_tracking_uri/set_registry_uri also export them
# as environment variables, which must not be mistaken for a user's override later.
_SET_BY_US: dict[str, str | None] = {"MLFLOW_TRACKING_URI": None, "MLFLOW_REGISTRY_URI": None}


class RegistryError(PipelineError):
    """The MLflow store cannot do what was asked (no active run, missing metrics, unknown alias...)."""


class TrackingUnavailable(RegistryError):
    """The MLflow tracking server does not answer (stopped, or stopped mid-stage)."""


# MLflow's own HTTP client retries a dead server for minutes (7 retries, backoff factor 2,
# 120 s timeout); a stage should say within seconds that the server is gone. Users can still
# set these variables themselves.
HTTP_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def tracking_uri_for(registry_params: Mapping[str, Any], root: str | Path = PROJECT_ROOT) -> str:
    """The tracking URI configure_tracking would use (MLFLOW_TRACKING_URI wins), with no side effect."""
    env_uri = _user_env("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    if not registry_params.get("tracking_uri"):
        raise ConfigError("params.yaml key 'registry.tracking_uri' is missing or empty")
    return resolve_tracking_uri(str(registry_params["tracking_uri"]), root)


def require_tracking_server(uri: str, attempts: int = 3, timeout_s: float = 5.0, sleep: Any = time.sleep) -> None:
    """For an http(s) tracking URI: GET /health, retried (it is idempotent), else TrackingUnavailable.

    Local stores (sqlite:, file:) need no server and pass at once. The message names the URI and
    what to do, instead of MLflow's retry loop followed by a connection traceback.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    health = uri.rstrip("/") + "/health"
    problem = ""
    for attempt in range(attempts):
        try:
            answer = requests.get(health, timeout=timeout_s)
            if answer.status_code == 200:
                return
            problem = f"GET {health} answered {answer.status_code}"
        except requests.RequestException as exc:
            problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        if attempt + 1 < attempts:
            sleep(min(2.0 ** attempt, 4.0))
    raise TrackingUnavailable(
        f"the MLflow tracking server at {uri} does not answer after {attempts} tries ({problem}); start it "
        "(e.g. `make mlflow-ui`) or point MLFLOW_TRACKING_URI / params.yaml registry.tracking_uri at a running "
        "one, then run the stage again (versions already registered are reused, with their metrics)"
    )


@contextlib.contextmanager
def tracking_guard(uri: str) -> Iterator[None]:
    """Around registry calls: when one fails because the server went away mid-stage, say so.

    The failure is re-checked with require_tracking_server: a server that no longer answers
    becomes TrackingUnavailable naming the URI; a server that answers means a real error,
    re-raised as it was (traceback kept).
    """
    try:
        yield
    except (MlflowException, OSError):
        require_tracking_server(uri, attempts=2)
        raise


def bound_http_retries() -> None:
    for key, value in HTTP_RETRY_ENV.items():
        os.environ.setdefault(key, value)


# ---------------------------------------------------------------------------------------
# Tracking store
# ---------------------------------------------------------------------------------------


def configure_tracking(registry_params: Mapping[str, Any], root: str | Path = PROJECT_ROOT) -> str:
    """Point MLflow (tracking and registry) at the project's store; return the experiment id.

    The URI is `MLFLOW_TRACKING_URI` when the user set it, else `registry.tracking_uri`
    with a relative SQLite path resolved against `root`. For an SQLite store the
    experiment `registry.experiment` is created with its artifacts under
    `registry.artifact_root` (resolved against `root`); a server decides that itself.
    Safe to call again and from several processes at once (a file lock beside the
    SQLite database serialises schema creation and experiment creation).
    """
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    root = Path(root)
    for key in ("tracking_uri", "experiment"):
        if not registry_params.get(key):
            raise ConfigError(f"params.yaml key 'registry.{key}' is missing or empty")

    env_uri = _user_env("MLFLOW_TRACKING_URI")
    if env_uri:
        tracking_uri = env_uri
        logger.info("MLflow tracking URI from MLFLOW_TRACKING_URI: %s", tracking_uri)
    else:
        tracking_uri = resolve_tracking_uri(str(registry_params["tracking_uri"]), root)
    registry_uri = _user_env("MLFLOW_REGISTRY_URI") or tracking_uri
    bound_http_retries()
    require_tracking_server(tracking_uri)

    db_path = sqlite_path(tracking_uri)
    artifact_location: str | None = None
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        if env_uri:
            # A store the user chose keeps its artifacts beside its database, not in this project.
            artifact_dir = (db_path.parent / "artifacts").resolve()
        else:
            artifact_dir = resolve_path(str(registry_params["artifact_root"]), root).resolve()
        artifact_dir.mkdir(parents=True, exist_ok=True)
        artifact_location = artifact_dir.as_uri()

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    # Remember only values that came from params.yaml: a user's own MLFLOW_TRACKING_URI must
    # keep winning on every later call, even though MLflow echoes it back into os.environ.
    _SET_BY_US["MLFLOW_TRACKING_URI"] = None if env_uri else tracking_uri
    _SET_BY_US["MLFLOW_REGISTRY_URI"] = None if _user_env("MLFLOW_REGISTRY_URI") or env_uri else registry_uri

    name = str(registry_params["experiment"])
    with store_lock(tracking_uri):
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        experiment_id = _ensure_experiment(client, name, artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def resolve_tracking_uri(uri: str, root: str | Path = PROJECT_ROOT) -> str:
    """`sqlite:///rel/path.db` -> `sqlite:////<root>/rel/path.db`; other URIs unchanged."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    rest = uri[len(prefix):]
    path_part, sep, query = rest.partition("?")
    if not path_part or path_part == ":memory:" or path_part.startswith("/"):
        return uri
    absolute = (Path(root) / path_part).resolve()
    return f"{prefix}{absolute}{sep}{query}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of an SQLite URI (relative ones against the cwd, as MLflow does)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path_part = uri[len(prefix):].partition("?")[0]
    if not path_part or path_part == ":memory:":
        return None
    return Path(path_part) if path_part.startswith("/") else Path.cwd() / path_part


def _user_env(key: str) -> str | None:
    value = os.environ.get(key) or None
    if value is not None and value == _SET_BY_US.get(key):
        return None  # exported by our own earlier configure_tracking call
    return value


@contextlib.contextmanager
def store_lock(tracking_uri: str | None = None) -> Iterator[None]:
    """Exclusive lock across processes for a local SQLite store (no-op for servers)."""
    db_path = sqlite_path(tracking_uri or mlflow.get_tracking_uri())
    if db_path is None:
        yield
        return
    db_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = db_path.with_name(db_path.name + ".lock")
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as error:  # created meanwhile by another process (server stores)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise error
    if experiment.lifecycle_stage == "deleted":
        logger.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(experiment.experiment_id)
    if artifact_location and experiment.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        logger.warning(
            "MLflow experiment %r keeps its artifacts at %s (params.yaml registry.artifact_root resolves to %s)",
            name,
            experiment.artifact_location,
            artifact_location,
        )
    return experiment.experiment_id



# ---------------------------------------------------------------------------------------
# What a run records
# ---------------------------------------------------------------------------------------


def log_params_section(params_section: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested params (`train.image.lr`) and log them to the active run; return what was logged."""
    flat = flatten_params(params_section, prefix)
    if mlflow.active_run() is None:
        raise RegistryError("log_params_section needs an active MLflow run (inside mlflow.start_run())")
    items = list(flat.items())
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        mlflow.log_params(dict(items[start : start + 100]))
    return flat


def flatten_params(params_section: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params_section.items():
        full_key = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, full_key))
        elif isinstance(value, (list, tuple)):
            flat[full_key] = json.dumps(list(value), default=str)
        elif value is None:
            flat[full_key] = "null"
        else:
            flat[full_key] = str(value)
    return flat


def log_figure_file(path: str | Path, artifact_dir: str = "plots") -> str:
    """Log an existing image/HTML file as an artifact of the active run; return its artifact path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"figure not found: {path}")
    if mlflow.active_run() is None:
        raise RegistryError("log_figure_file needs an active MLflow run (inside mlflow.start_run())")
    mlflow.log_artifact(str(path), artifact_path=artifact_dir or None)
    return f"{artifact_dir}/{path.name}" if artifact_dir else path.name




# ---------------------------------------------------------------------------------------
# One run per trained model
# ---------------------------------------------------------------------------------------


def run_id_of(model_dir: str | Path) -> str | None:
    """The MLflow run that trained `model_dir` (its run_id.txt), or None for a model trained elsewhere.

    Returns:
        The run id; the evaluate and register stages log into that run and check that the
        metrics they read score this very model.
    """
    marker = Path(model_dir) / RUN_ID_FILE
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else None


def remember_run(model_dir: str | Path, run_id: str) -> None:
    """Write run_id.txt into a model directory, so later stages find the run that trained it."""
    write_text(Path(model_dir) / RUN_ID_FILE, run_id + "\n")


@contextlib.contextmanager
def training_run(
    registry_params: Mapping[str, Any],
    root: str | Path,
    raw_dir: str | Path,
    kind: str,
    params_section: Mapping[str, Any],
    resume_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open (or re-open, when resuming) the MLflow run of one model's training.

    Args:
        registry_params: params.yaml `registry:` (which store, which experiment).
        root: the project root relative store paths resolve against.
        raw_dir: the raw export the model was trained from (its DVC version becomes a tag).
        kind: the run name and `model_kind` tag.
        params_section: the params this model was trained with, logged flat (`<kind>.<key>`)
            on a new run only: a resumed run already has them and MLflow refuses a changed value.
        resume_run_id: the run to continue (a resumed training), or None for a new run.

    Returns:
        The active run, as a context manager.
    """
    experiment_id = configure_tracking(registry_params, root)
    with mlflow.start_run(run_id=resume_run_id, experiment_id=experiment_id, run_name=f"{kind}") as run:
        # which code and data made this model: git commit/dirty state, DVC data version
        mlflow.set_tags({**run_tags(root, raw_dir), "model_kind": kind})
        if resume_run_id is None:
            log_params_section(params_section, prefix=kind)
        yield run


@contextlib.contextmanager
def reopen_run(registry_params: Mapping[str, Any], root: str | Path, model_dir: str | Path) -> Iterator[mlflow.ActiveRun]:
    """Re-open the run that trained `model_dir`, so evaluate and register log into it.

    Raises FileNotFoundError when the directory has no run_id.txt (a model not trained by the
    pipeline has no run to add to).
    """
    configure_tracking(registry_params, root)
    run_id = run_id_of(model_dir)
    if run_id is None:
        raise FileNotFoundError(f"{model_dir} has no {RUN_ID_FILE}: train it with the pipeline first")
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_epoch(epoch: int, metrics: Mapping[str, Any]) -> None:
    """Per-epoch callback for the training loop: live curves in the MLflow UI (non-numbers skipped)."""
    numeric = {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}
    mlflow.log_metrics(numeric, step=epoch)
