"""The MLflow Model Registry: register versions with their numbers, move the aliases, fetch champions.

Models are promoted with aliases, never stages: `champion` is what the index and the service
use, `challenger` marks the latest version that did not beat it.

Rules the registry keeps:
- a model version is registered together with its test metrics (as `metric.<name>`
  version tags, written in the same call that creates the version) and its run id;
  registering without the promotion metric is refused;
- the champion alias moves as `pipeline_steps.promotion.decide` says (the metric's own
  direction, `min_improvement`, the *same* test split, `test_split_hash` tag), under a lock
  that holds across processes and machines (`pipeline_steps/registry_lock.py`);
- a champion scored on other rows (new data, a new split seed, or for the price model another
  category classifier) is re-scored on the current ones first (`rescore_champion`), so a new
  export can unseat it;
- every decision is logged with both values.

Every function takes the MlflowClient to use (`client=`); without one it makes a client for
the store `pipeline_steps.tracking.configure_tracking` set. Nothing happens at import.

Store set-up lives in `pipeline_steps/tracking.py`, lineage tags in `lineage.py`, the policy in
`promotion.py`; the names re-exported below keep `registry.<name>` working for callers that
predate the split.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline_steps.clean_schema import load_classes
from pipeline_steps.faults import crash_point
from pipeline_steps.io_utils import read_json
from pipeline_steps.model_kinds import CLASSIFIER_KINDS, model_name  # noqa: F401  (re-exported: registry.<name>)
from pipeline_steps.promotion import (  # noqa: F401  (re-exported: registry.<name>)
    CATEGORY_MODEL_KEY,
    PRICE_KIND,  # from pipeline_steps.model_kinds
    PromotionDecision,
    PromotionPolicy,
    Standing,
    decide,
    higher_is_better as promotion_higher_is_better,
    is_price_kind,
    promotion_settings,
    split_hash,
)
from pipeline_steps.registry_lock import promotion_lock, verify_alias
from pipeline_steps.tracking import (  # noqa: F401  (re-exported: registry.<name>)
    HTTP_RETRY_ENV,
    RegistryError,
    TrackingUnavailable,
    bound_http_retries,
    configure_tracking,
    require_tracking_server,
    resolve_tracking_uri,
    sqlite_path,
    store_lock,
    tracking_guard,
    tracking_uri_for,
)

logger = logging.getLogger(__name__)

METRIC_TAG_PREFIX = "metric."
RUN_ID_TAG = "run_id"
SPLIT_HASH_TAG = "test_split_hash"
REGISTERED_SPLIT_TAG = "registered_test_split_hash"
PROMOTION_METRIC_TAG = "promotion_metric"
# The price model is scored with the category its served companion classifier predicts
# (pipeline_steps/evaluation.py:score_price): the run of that classifier is part of what the
# numbers describe, like the rows.
CATEGORY_MODEL_TAG = CATEGORY_MODEL_KEY


def _client(client: MlflowClient | None) -> MlflowClient:
    return client if client is not None else MlflowClient()


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
    client: MlflowClient | None = None,
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
    client = _client(client)
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




# ---------------------------------------------------------------------------------------
# Promotion: read both versions, decide (pipeline_steps.promotion), move the aliases
# ---------------------------------------------------------------------------------------


def promote(
    name: str,
    version: str | int,
    metric: str,
    higher_is_better: bool | None = None,
    min_improvement: float = 0.0,
    champion_alias: str = "champion",
    challenger_alias: str = "challenger",
    client: MlflowClient | None = None,
) -> PromotionDecision:
    """Give `version` the champion alias if it beats the champion, else the challenger alias.

    Args:
        name, version: the registered version to judge.
        metric: the promotion metric (a `metric.<name>` version tag, else its run's test metric).
        higher_is_better: the metric's direction; None (default) takes it from the metric itself
            (`promotion.higher_is_better`), so a loss is never maximised by accident.
        min_improvement: the margin the new version must beat the champion by.
        champion_alias, challenger_alias: the alias names.
        client: the registry client (default: one for the configured store).

    Returns:
        The decision (`promotion.decide`), with the alias the version received. Promoted when
        there is no champion yet, or when both versions carry the same `test_split_hash` (both
        absent counts as the same) and the new value beats the champion's by more than
        `min_improvement`.
    """
    version = str(version)
    client = _client(client)
    policy = PromotionPolicy(
        metric=metric,
        higher_is_better=promotion_higher_is_better(metric) if higher_is_better is None else bool(higher_is_better),
        min_improvement=float(min_improvement),
        champion_alias=champion_alias,
        challenger_alias=challenger_alias,
    )
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
        decision = decide(
            Standing(version, new_value, (new_version.tags or {}).get(SPLIT_HASH_TAG)),
            None if champion is None else Standing(
                str(champion.version), metric_value(client, champion, metric), (champion.tags or {}).get(SPLIT_HASH_TAG)
            ),
            policy,
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


# ---------------------------------------------------------------------------------------
# Looking versions up
# ---------------------------------------------------------------------------------------


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_by_alias(name: str, alias: str = "champion", client: MlflowClient | None = None) -> ModelVersion | None:
    """The version holding `alias` (with its tags), or None when there is none."""
    return _version_by_alias(_client(client), name, alias)


def champion_version(name: str, alias: str = "champion", client: MlflowClient | None = None) -> tuple[str, str | None] | None:
    """(version, run_id) of the version holding `alias`, or None when there is none."""
    found = _version_by_alias(_client(client), name, alias)
    if found is None:
        return None
    return str(found.version), found.run_id or (found.tags or {}).get(RUN_ID_TAG)


def version_of_run(name: str, run_id: str, client: MlflowClient | None = None) -> ModelVersion | None:
    """The newest version of `name` registered from `run_id`, if any (registering is then a no-op)."""
    found = _client(client).search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def alias_split(name: str, alias: str = "champion", client: MlflowClient | None = None) -> tuple[str, str | None] | None:
    """(version, test_split_hash tag) of the version holding `alias`, or None when there is none."""
    found = _version_by_alias(_client(client), name, alias)
    if found is None:
        return None
    return str(found.version), (found.tags or {}).get(SPLIT_HASH_TAG)


def tag_version(name: str, version: str | int, tags: Mapping[str, Any], client: MlflowClient | None = None) -> None:
    """Set tags on a registered version, e.g. `index_run_id`: the run that built the index of this version.

    The index stage records which MLflow run holds the index of a champion here, so the
    registry, not a side file, says which index belongs to which model version.
    """
    client = _client(client)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), str(key), _tag_value(value))


def record_rescore(
    name: str,
    version: str | int,
    metrics: Mapping[str, Any],
    test_split_hash: str,
    tags: Mapping[str, Any] | None = None,
    client: MlflowClient | None = None,
) -> ModelVersion:
    """Re-tag `version` with its metrics on another test split (a champion re-scored on new data).

    The `metric.*` and `test_split_hash` tags always describe the split the version was last
    scored on, so promote() compares like with like; the split it was registered with stays
    in `registered_test_split_hash` and the registration run keeps the original numbers.
    `tags` (e.g. `category_model_run_id` for the price model) are set with them.
    """
    test_metrics = _test_metrics(metrics)
    if not test_metrics:
        raise RegistryError(f"refusing to re-tag {name!r} version {version}: no metrics were given")
    client = _client(client)
    version = str(version)
    with store_lock():
        current = client.get_model_version(name, version)
        current_tags = current.tags or {}
        if REGISTERED_SPLIT_TAG not in current_tags and current_tags.get(SPLIT_HASH_TAG):
            client.set_model_version_tag(name, version, REGISTERED_SPLIT_TAG, current_tags[SPLIT_HASH_TAG])
        for key, value in test_metrics.items():
            client.set_model_version_tag(name, version, f"{METRIC_TAG_PREFIX}{key}", _tag_value(value))
        for key, value in (tags or {}).items():
            client.set_model_version_tag(name, version, str(key), _tag_value(value))
        client.set_model_version_tag(name, version, SPLIT_HASH_TAG, str(test_split_hash))
        return client.get_model_version(name, version)


def refresh_scores(
    name: str,
    existing: ModelVersion,
    metrics: Mapping[str, Any],
    test_split_hash: str,
    context: Mapping[str, Any] | None = None,
    client: MlflowClient | None = None,
) -> bool:
    """Re-tag an already registered version when it was evaluated again on other rows (or, for
    the price model, with another category classifier); the same trained model is never
    registered twice.

    Args:
        name: the registered model name.
        existing: the version registered from this model's training run.
        metrics: the new evaluation's numbers.
        test_split_hash: the rows they were computed on.
        context: what else the numbers depend on (`category_model_run_id` for the price model).
        client: the registry client.

    Returns:
        True when the tags were rewritten, False when they already describe this evaluation.
    """
    tags = existing.tags or {}
    context = dict(context or {})
    if tags.get(SPLIT_HASH_TAG) == test_split_hash and all(tags.get(k) == str(v) for k, v in context.items()):
        return False
    record_rescore(name, existing.version, metrics, test_split_hash, tags=context, client=client)
    return True


def champion_uri(name: str, alias: str = "champion") -> str:
    """`models:/<name>@<alias>`: what `mlflow.pyfunc.load_model` takes to load the champion."""
    return f"models:/{name}@{alias}"


def download_champion(name: str, alias: str, dst_dir: str | Path, client: MlflowClient | None = None) -> Path:
    """Download the MLflow model directory (MLmodel, artifacts...) behind the alias; return its path."""
    if champion_version(name, alias, client=client) is None:
        raise RegistryError(f"registered model {name!r} has no version with alias {alias!r}")
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(artifact_uri=champion_uri(name, alias), dst_path=str(dst_dir))
    return Path(local)


# ---------------------------------------------------------------------------------------
# A champion scored on other rows: score it again on these
# ---------------------------------------------------------------------------------------


def rescore_champion(
    kind: str,
    name: str,
    split: str,
    clean_dir: str | Path,
    alias: str = "champion",
    category_model_dir: str | Path | None = None,
    category_model_run: str | None = None,
    client: MlflowClient | None = None,
) -> str | None:
    """Score the champion on this test split when its numbers describe other rows (new data, new split).

    Without this a new export or split seed could never unseat the champion: the versions would
    be "not comparable" forever and the index and service would keep the old model. For the
    price model the numbers also depend on the classifier whose predicted category it is
    scored with (`category_model_run`): a champion scored with another one is re-scored too.

    Args:
        kind: the model kind (how to score it: pipeline_steps.evaluation.score_model).
        name: the registered model name.
        split: the `test_split_hash` of the rows the new version was scored on.
        clean_dir: the clean layer holding those rows.
        alias: the champion alias.
        category_model_dir, category_model_run: for the price model, the classifier (and its run)
            the new version was scored with; the champion is scored with the same one.
        client: the registry client.

    Returns:
        A line for the log, or None when the champion already has numbers for these rows.
    """
    client = _client(client)
    champion = _version_by_alias(client, name, alias)
    if champion is None:
        return None
    tags = champion.tags or {}
    same_rows = tags.get(SPLIT_HASH_TAG) == split
    same_category_model = category_model_run is None or tags.get(CATEGORY_MODEL_TAG) == category_model_run
    if same_rows and same_category_model:
        return None
    from pipeline_steps import evaluation  # scoring needs torch for the networks: only when re-scoring
    from pipeline_steps.mlflow_models import find_model_dir

    version = str(champion.version)
    clean_dir = Path(clean_dir)
    with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
        model_dir = find_model_dir(download_champion(name, alias, tmp, client=client))
        model_classes = read_json(model_dir / "config.json").get("classes")
        if model_classes is not None and list(model_classes) != load_classes(clean_dir):
            return f"{alias} v{version} predicts another class list than {clean_dir / 'labels.json'}: not re-scored"
        scored = evaluation.score_model(kind, model_dir, clean_dir, category_model_dir=category_model_dir)
    numbers = {key: value for key, value in scored.metrics.items() if isinstance(value, (int, float))}
    extra = {CATEGORY_MODEL_TAG: category_model_run} if category_model_run else None
    record_rescore(name, version, numbers, split_hash(scored.ids), tags=extra, client=client)
    why = (
        f"had been scored on another test split ({(tags.get(SPLIT_HASH_TAG) or 'unknown')[:12]}…)" if not same_rows
        else f"had been scored with another category classifier (run {tags.get(CATEGORY_MODEL_TAG) or 'unknown'})"
    )
    return f"{alias} v{version} {why}: re-scored on this one"
