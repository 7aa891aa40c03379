"""MLflow tracking and model registry: where runs go, what gets registered, who is champion.

The pipeline keeps one MLflow store (SQLite backend + a local artifact folder by
default, `registry:` in params.yaml; `MLFLOW_TRACKING_URI` overrides it). Models are
promoted with aliases, never stages: `champion` is what the index and the service use,
`challenger` marks the latest version that did not beat it.

Rules the registry keeps:
- a model version is registered together with its test metrics (as `metric.<name>`
  version tags, written in the same call that creates the version) and its run id;
  registering without the promotion metric is refused;
- the champion alias moves only to a version that beats the current champion by more
  than `min_improvement` on the *same* test split (`test_split_hash` tag); a version
  evaluated on another split is "not comparable" and becomes challenger;
- every decision is logged with both values.
"""

from __future__ import annotations

import os

# Offline machines: no telemetry (read by MLflow at event time, so setting it here is enough).
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline_steps.config import PROJECT_ROOT, resolve_path
from pipeline_steps.errors import ConfigError, PipelineError
from pipeline_steps.faults import crash_point
from pipeline_steps.registry_lock import promotion_lock, verify_alias

logger = logging.getLogger(__name__)

CLASSIFIER_KINDS = ("image", "text", "multimodal")
PRICE_KIND = "price"
BASELINE_BASES = ("image", "text", "multimodal", "price", "pixel")
METRIC_TAG_PREFIX = "metric."
RUN_ID_TAG = "run_id"
SPLIT_HASH_TAG = "test_split_hash"
REGISTERED_SPLIT_TAG = "registered_test_split_hash"
PROMOTION_METRIC_TAG = "promotion_metric"

# The URIs this module last set: mlflow.set_tracking_uri/set_registry_uri also export them
# as environment variables, which must not be mistaken for a user's override later.
_SET_BY_US: dict[str, str | None] = {"MLFLOW_TRACKING_URI": None, "MLFLOW_REGISTRY_URI": None}


class RegistryError(PipelineError):
    """A model cannot be registered or promoted as asked (missing metrics, unknown alias...)."""


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
            artifact_dir = resolve_path(str(registry_params.get("artifact_root") or "mlruns/artifacts"), root).resolve()
        artifact_dir.mkdir(parents=True, exist_ok=True)
        artifact_location = artifact_dir.as_uri()

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    # Remember only values that came from params.yaml: a user's own MLFLOW_TRACKING_URI must
    # keep winning on every later call, even though MLflow echoes it back into os.environ.
    _SET_BY_US["MLFLOW_TRACKING_URI"] = None if env_uri else tracking_uri
    _SET_BY_US["MLFLOW_REGISTRY_URI"] = None if _user_env("MLFLOW_REGISTRY_URI") or env_uri else registry_uri

    name = str(registry_params["experiment"])
    with _store_lock(tracking_uri):
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
def _store_lock(tracking_uri: str | None = None) -> Iterator[None]:
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
# Run metadata
# ---------------------------------------------------------------------------------------


def run_tags(root: str | Path, raw_dir: str | Path) -> dict[str, str]:
    """Tags that tie a run to its code and data: git commit/dirty state and the raw data version."""
    root = Path(root)
    raw_path = resolve_path(raw_dir, root)
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain") if commit is not None else None
    version, source = data_version(root, raw_path)
    return {
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status.strip())).lower(),
        "dvc_data_version": version,
        "dvc_data_version_source": source,
        "raw_dir": _display_path(raw_path, root),
    }


def data_version(root: str | Path, raw_path: str | Path) -> tuple[str, str]:
    """(version, source): the md5 DVC recorded for the raw directory, else a cheap content hash."""
    root = Path(root)
    raw_path = resolve_path(raw_path, root)
    md5 = _md5_from_dvc_file(raw_path)
    if md5:
        return md5, "dvc-file"
    md5 = _md5_from_dvc_lock(root, raw_path)
    if md5:
        return md5, "dvc.lock"
    if not raw_path.is_dir():
        return "unknown", "missing"
    return "content-sha256:" + raw_content_hash(raw_path), "content-hash"


def raw_content_hash(raw_path: str | Path) -> str:
    """sha256 of the top-level CSV files' bytes plus the image files' names and sizes."""
    raw_path = Path(raw_path)
    digest = hashlib.sha256()
    for csv_path in sorted(raw_path.glob("*.csv")):
        digest.update(f"csv:{csv_path.name}\n".encode())
        with csv_path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    images_dir = raw_path / "images"
    if images_dir.is_dir():
        listing = []
        for dirpath, _dirnames, filenames in os.walk(images_dir):
            for filename in filenames:
                full = Path(dirpath) / filename
                listing.append(f"{full.relative_to(images_dir).as_posix()}\t{full.stat().st_size}")
        for line in sorted(listing):
            digest.update(f"img:{line}\n".encode())
    return digest.hexdigest()


def _md5_from_dvc_file(raw_path: Path) -> str | None:
    dvc_file = raw_path.with_name(raw_path.name + ".dvc")
    if not dvc_file.is_file():
        return None
    data = _read_yaml(dvc_file)
    for out in (data or {}).get("outs") or []:
        if isinstance(out, Mapping) and _same_path(dvc_file.parent / str(out.get("path", "")), raw_path):
            return _md5_of(out)
    return None


def _md5_from_dvc_lock(root: Path, raw_path: Path) -> str | None:
    lock_file = root / "dvc.lock"
    if not lock_file.is_file():
        return None
    data = _read_yaml(lock_file) or {}
    stages = data.get("stages") if isinstance(data, Mapping) else None
    for stage in (stages or {}).values():
        if not isinstance(stage, Mapping):
            continue
        for entry in list(stage.get("outs") or []) + list(stage.get("deps") or []):
            if isinstance(entry, Mapping) and _same_path(root / str(entry.get("path", "")), raw_path):
                md5 = _md5_of(entry)
                if md5:
                    return md5
    return None


def _md5_of(entry: Mapping[str, Any]) -> str | None:
    value = entry.get("md5") or entry.get("etag") or entry.get("checksum")
    return str(value) if value else None


def _read_yaml(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as error:
        logger.warning("could not read %s: %s", path, error)
        return None


def _same_path(a: Path, b: Path) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def _display_path(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def split_hash(ids: Iterable[Any]) -> str:
    """A stable hash of the test split's ids (order does not matter): the `test_split_hash` tag."""
    joined = "\n".join(sorted(str(item) for item in ids))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


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
# Registry
# ---------------------------------------------------------------------------------------


def model_name(prefix: str, kind: str) -> str:
    """Registered model name for a model kind.

    image|text|multimodal -> `<prefix>-<kind>-classifier`, price -> `<prefix>-price-estimator`,
    baselines (`text_baseline`, `text-baseline`, `baseline_text`...) -> `<prefix>-text-baseline`.
    """
    normalised = kind.strip().lower().replace("_", "-").replace("/", "-")
    if normalised in CLASSIFIER_KINDS:
        return f"{prefix}-{normalised}-classifier"
    if normalised == PRICE_KIND:
        return f"{prefix}-{PRICE_KIND}-estimator"
    parts = [part for part in normalised.split("-") if part not in ("baseline", "baselines")]
    if normalised != "-".join(parts) and len(parts) == 1 and parts[0] in BASELINE_BASES:
        return f"{prefix}-{parts[0]}-baseline"
    accepted = list(CLASSIFIER_KINDS) + [PRICE_KIND] + [f"{base}_baseline" for base in BASELINE_BASES]
    raise ConfigError(f"unknown model kind {kind!r}; accepted: {', '.join(accepted)}")


def is_price_kind(kind: str) -> bool:
    return "price" in kind.lower()


def promotion_settings(registry_params: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The promote() keyword arguments for a model kind, from params.yaml `registry:`."""
    promotion = registry_params.get("promotion") or {}
    family = "price" if is_price_kind(kind) else "classifier"
    metric = promotion.get(f"{family}_metric", "median_abs_error" if family == "price" else "accuracy")
    # one margin per metric: accuracy is a fraction, the price error is in pounds
    margin = promotion.get(f"{family}_min_improvement", promotion.get("min_improvement", 0.0))
    return {
        "metric": str(metric),
        "higher_is_better": family != "price",
        "min_improvement": float(margin or 0.0),
        "champion_alias": str(registry_params.get("champion_alias", "champion")),
        "challenger_alias": str(registry_params.get("challenger_alias", "challenger")),
    }


def register_model_version(
    model_uri: str,
    name: str,
    run_id: str,
    metrics: Mapping[str, Any],
    description: str | None = None,
    *,
    promotion_metric: str,
    test_split_hash: str | None = None,
    tags: Mapping[str, Any] | None = None,
    timeout_s: int = 300,
) -> ModelVersion:
    """Register `model_uri` as a new version of `name`, with its test metrics as version tags.

    `metrics` are the test-split metrics (a dict with a `test` sub-dict is accepted too);
    refused (RegistryError) when empty or without a finite `promotion_metric`, so no
    version ever exists without the numbers it is judged by. Tags: `metric.<name>` per
    metric, `run_id`, `promotion_metric`, `test_split_hash` (when given) and `tags`.
    Waits until the version is READY.
    """
    test_metrics = _test_metrics(metrics)
    if not test_metrics:
        raise RegistryError(f"refusing to register {name!r} from {model_uri}: no test metrics were given")
    if promotion_metric not in test_metrics:
        raise RegistryError(
            f"refusing to register {name!r} from {model_uri}: the metrics lack the promotion metric "
            f"{promotion_metric!r} (got: {', '.join(sorted(test_metrics))})"
        )
    if _as_float(test_metrics[promotion_metric]) is None:
        raise RegistryError(
            f"refusing to register {name!r}: promotion metric {promotion_metric!r} is "
            f"{test_metrics[promotion_metric]!r}, not a finite number"
        )
    if not run_id:
        raise RegistryError(f"refusing to register {name!r} from {model_uri}: no run id")

    version_tags: dict[str, str] = {f"{METRIC_TAG_PREFIX}{key}": _tag_value(value) for key, value in test_metrics.items()}
    version_tags[RUN_ID_TAG] = str(run_id)
    version_tags[PROMOTION_METRIC_TAG] = promotion_metric
    if test_split_hash:
        version_tags[SPLIT_HASH_TAG] = str(test_split_hash)
    for key, value in (tags or {}).items():
        version_tags[str(key)] = _tag_value(value)

    # One request creates the version with every tag: no version ever exists without its metrics.
    registered = mlflow.register_model(model_uri, name, await_registration_for=timeout_s, tags=version_tags)
    crash_point("registered_version")  # test hook (pipeline_steps/faults.py); a no-op otherwise
    client = MlflowClient()
    version = _wait_ready(client, name, str(registered.version), timeout_s)
    if description:
        client.update_model_version(name, version.version, description=description)
        version = client.get_model_version(name, version.version)
    logger.info(
        "registered %s version %s (run %s, %s=%s)",
        name,
        version.version,
        run_id,
        promotion_metric,
        test_metrics[promotion_metric],
    )
    return version


def _test_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}
    if isinstance(metrics.get("test"), Mapping):
        metrics = metrics["test"]
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            for sub_key, sub_value in _test_metrics(value).items():
                flat[f"{key}.{sub_key}"] = sub_value
        elif isinstance(value, (bool, int, float, str)) or hasattr(value, "item"):
            flat[str(key)] = value.item() if hasattr(value, "item") else value
    return flat


def _tag_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if hasattr(value, "item"):
        return str(value.item())
    return str(value)


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _wait_ready(client: MlflowClient, name: str, version: str, timeout_s: int) -> ModelVersion:
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        current = client.get_model_version(name, version)
        if current.status == "READY":
            return current
        if current.status == "FAILED_REGISTRATION":
            raise RegistryError(f"{name} version {version} failed registration: {current.status_message}")
        if time.monotonic() >= deadline:
            raise RegistryError(f"{name} version {version} not READY after {timeout_s}s (status {current.status})")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


@dataclass
class PromotionDecision:
    """What promote() did. `champion_version`/`champion_value`: the champion before the decision."""

    promoted: bool
    reason: str
    new_value: float | None
    champion_version: str | None
    champion_value: float | None
    name: str | None = None
    version: str | None = None
    alias: str | None = None  # the alias the new version received

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def promote(
    name: str,
    version: str | int,
    metric: str,
    higher_is_better: bool = True,
    min_improvement: float = 0.0,
    champion_alias: str = "champion",
    challenger_alias: str = "challenger",
) -> PromotionDecision:
    """Give `version` the champion alias if it beats the champion, else the challenger alias.

    Promoted when there is no champion yet, or when both versions carry the same
    `test_split_hash` (both absent counts as the same) and the new value beats the
    champion's by more than `min_improvement` (`higher_is_better` picks the direction).
    """
    version = str(version)
    client = MlflowClient()
    # Across processes and machines sharing one registry (pipeline_steps/registry_lock.py):
    # a PostgreSQL advisory lock, a lock entry in an MLflow server's registry, or a file lock (SQLite).
    with promotion_lock(name):
        new_version = client.get_model_version(name, version)
        new_value = metric_value(client, new_version, metric)
        if new_value is None:
            raise RegistryError(
                f"{name} version {version} has no recorded {metric!r} (tag '{METRIC_TAG_PREFIX}{metric}' or run metric); "
                "register it with register_model_version() and its test metrics"
            )
        champion = _version_by_alias(client, name, champion_alias)

        if champion is None:
            decision = PromotionDecision(
                True, f"no {champion_alias} yet: version {version} ({metric}={new_value:.6g}) becomes {champion_alias}",
                new_value, None, None,
            )
        elif str(champion.version) == version:
            champion_value = metric_value(client, champion, metric)
            decision = PromotionDecision(
                False, f"version {version} already is the {champion_alias}", new_value, str(champion.version), champion_value
            )
        else:
            decision = _compare(
                version, new_version, new_value, champion, metric, higher_is_better, min_improvement,
                champion_alias, client,
            )
        decision.name, decision.version = name, version

        if decision.promoted:
            client.set_registered_model_alias(name, champion_alias, version)
            verify_alias(client, name, champion_alias, version)  # re-check while still holding the lock
            decision.alias = champion_alias
            challenger = _version_by_alias(client, name, challenger_alias)
            if challenger is not None and str(challenger.version) == version:
                client.delete_registered_model_alias(name, challenger_alias)
        elif champion is None or str(champion.version) != version:
            client.set_registered_model_alias(name, challenger_alias, version)
            decision.alias = challenger_alias
        else:
            decision.alias = champion_alias

    logger.info("promotion of %s version %s: %s -> %s", name, version,
                "PROMOTED" if decision.promoted else "not promoted", decision.reason)
    return decision


def _compare(
    version: str,
    new_version: ModelVersion,
    new_value: float,
    champion: ModelVersion,
    metric: str,
    higher_is_better: bool,
    min_improvement: float,
    champion_alias: str,
    client: MlflowClient,
) -> PromotionDecision:
    champion_value = metric_value(client, champion, metric)
    new_label = f"version {version} {metric}={new_value:.6g}"
    if champion_value is None:
        return PromotionDecision(
            False,
            f"not comparable: {champion_alias} version {champion.version} has no recorded {metric!r} "
            f"({new_label}); re-evaluate the {champion_alias} or move the alias by hand",
            new_value, str(champion.version), None,
        )
    champ_label = f"{champion_alias} version {champion.version} {metric}={champion_value:.6g}"
    new_split = (new_version.tags or {}).get(SPLIT_HASH_TAG)
    champ_split = (champion.tags or {}).get(SPLIT_HASH_TAG)
    if new_split != champ_split:
        return PromotionDecision(
            False,
            f"not comparable: evaluated on different test splits ({SPLIT_HASH_TAG} {new_split or 'unknown'} vs "
            f"{champ_split or 'unknown'}); {new_label}, {champ_label}; re-evaluate both on one split",
            new_value, str(champion.version), champion_value,
        )
    improvement = (new_value - champion_value) if higher_is_better else (champion_value - new_value)
    direction = "higher" if higher_is_better else "lower"
    if improvement > min_improvement:
        return PromotionDecision(
            True,
            f"{new_label} beats {champ_label} by {improvement:.6g} ({direction} is better, "
            f"min_improvement={min_improvement:g})",
            new_value, str(champion.version), champion_value,
        )
    return PromotionDecision(
        False,
        f"{new_label} does not beat {champ_label} by more than min_improvement={min_improvement:g} "
        f"({direction} is better; improvement {improvement:.6g})",
        new_value, str(champion.version), champion_value,
    )


def metric_value(client: MlflowClient, model_version: ModelVersion, metric: str) -> float | None:
    """A version's test metric: its `metric.<name>` tag, else its run's (test_)metric."""
    tags = model_version.tags or {}
    for key in (f"{METRIC_TAG_PREFIX}{metric}", metric):
        value = _as_float(tags.get(key))
        if value is not None:
            return value
    run_id = model_version.run_id or tags.get(RUN_ID_TAG)
    if not run_id:
        return None
    try:
        run_metrics = client.get_run(run_id).data.metrics
    except MlflowException:
        return None
    for key in (f"test_{metric}", f"test.{metric}", f"test/{metric}", metric):
        value = _as_float(run_metrics.get(key))
        if value is not None:
            return value
    return None


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_version(name: str, alias: str = "champion") -> tuple[str, str | None] | None:
    """(version, run_id) of the version holding `alias`, or None when there is none."""
    found = _version_by_alias(MlflowClient(), name, alias)
    if found is None:
        return None
    return str(found.version), found.run_id or (found.tags or {}).get(RUN_ID_TAG)


def version_of_run(name: str, run_id: str) -> ModelVersion | None:
    """The newest version of `name` registered from `run_id`, if any (registering is then a no-op)."""
    found = MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def alias_split(name: str, alias: str = "champion") -> tuple[str, str | None] | None:
    """(version, test_split_hash tag) of the version holding `alias`, or None when there is none."""
    found = _version_by_alias(MlflowClient(), name, alias)
    if found is None:
        return None
    return str(found.version), (found.tags or {}).get(SPLIT_HASH_TAG)


def record_rescore(name: str, version: str | int, metrics: Mapping[str, Any], test_split_hash: str) -> ModelVersion:
    """Re-tag `version` with its metrics on another test split (a champion re-scored on new data).

    The `metric.*` and `test_split_hash` tags always describe the split the version was last
    scored on, so promote() compares like with like; the split it was registered with stays
    in `registered_test_split_hash` and the registration run keeps the original numbers.
    """
    test_metrics = _test_metrics(metrics)
    if not test_metrics:
        raise RegistryError(f"refusing to re-tag {name!r} version {version}: no metrics were given")
    client = MlflowClient()
    version = str(version)
    with _store_lock():
        current = client.get_model_version(name, version)
        tags = current.tags or {}
        if REGISTERED_SPLIT_TAG not in tags and tags.get(SPLIT_HASH_TAG):
            client.set_model_version_tag(name, version, REGISTERED_SPLIT_TAG, tags[SPLIT_HASH_TAG])
        for key, value in test_metrics.items():
            client.set_model_version_tag(name, version, f"{METRIC_TAG_PREFIX}{key}", _tag_value(value))
        client.set_model_version_tag(name, version, SPLIT_HASH_TAG, str(test_split_hash))
        return client.get_model_version(name, version)


def champion_uri(name: str, alias: str = "champion") -> str:
    return f"models:/{name}@{alias}"


def load_champion(name: str, alias: str = "champion") -> Any:
    """The pyfunc model behind `models:/<name>@<alias>`."""
    if champion_version(name, alias) is None:
        raise RegistryError(f"registered model {name!r} has no version with alias {alias!r}")
    return mlflow.pyfunc.load_model(champion_uri(name, alias))


def download_champion(name: str, alias: str, dst_dir: str | Path) -> Path:
    """Download the MLflow model directory (MLmodel, artifacts...) behind the alias; return its path."""
    if champion_version(name, alias) is None:
        raise RegistryError(f"registered model {name!r} has no version with alias {alias!r}")
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(artifact_uri=champion_uri(name, alias), dst_path=str(dst_dir))
    return Path(local)
