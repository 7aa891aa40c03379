"""Flow: log each evaluated model to MLflow, register a new version, promote the better one.

A version is registered only with its test metrics (read from the evaluate
stage's metrics/<model>.json, which must name the run that trained the model in
models/<kind>), and the `champion` alias moves to it only when it beats the
current champion on the configured metric on the same test split; otherwise it
becomes `challenger` and the reason is printed. A champion scored on another
test split (new data or a new split seed) is first re-scored on this one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows import tracking
from flows.common import base_parser, load_params, path_of, run_cli
from flows.evaluate import MODEL_RUN_KEY, SPLIT_HASH_KEY, score_model
from pipeline_steps import registry
from pipeline_steps.config import existing_dir, require_choice
from pipeline_steps.errors import PipelineError
from pipeline_steps.io_utils import read_json, write_json
from pipeline_steps.mlflow_models import find_model_dir, log_model_dir

MODELS = ("text-baseline", "pixel-baseline", "price", "image", "text", "multimodal")


def checked_split_hash(kind: str, model_dir: Path, trained_in: str | None, metrics_file: Path, metrics: dict[str, Any]) -> str:
    """The test-split hash of `metrics_file`, once it is clear those numbers score this very model.

    evaluate writes the training run of the model it scored and a hash of the rows it scored;
    a model retrained since (another run id) would otherwise be registered with its
    predecessor's numbers.
    """
    scored_run, split = metrics.get(MODEL_RUN_KEY), metrics.get(SPLIT_HASH_KEY)
    again = f"run `python -m flows.evaluate --model {kind}` (or `dvc repro evaluate`) first"
    if not scored_run or not split:
        raise PipelineError(f"{metrics_file} does not say which model and test rows it scored (an older evaluate wrote it): {again}")
    if scored_run != trained_in:
        raise PipelineError(
            f"{metrics_file} scores the {kind} model of run {scored_run}, but {model_dir} was trained in run {trained_in}: {again}"
        )
    return str(split)


def rescore_champion(kind: str, name: str, split: str, clean_dir: Path, alias: str) -> str | None:
    """Score the champion on this test split when it was scored on another one (new data, new split).

    Without this a new export or split seed could never unseat the champion: the versions would
    be "not comparable" forever and the index and service would keep the old model. Returns a
    line for the log, or None when the champion already has numbers for this split.
    """
    found = registry.alias_split(name, alias)
    if found is None or found[1] == split:
        return None
    version, old_split = found
    with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
        model_dir = find_model_dir(registry.download_champion(name, alias, tmp))
        model_classes = read_json(model_dir / "config.json").get("classes")
        if model_classes is not None and list(model_classes) != list(read_json(clean_dir / "labels.json")["classes"]):
            return f"{alias} v{version} predicts another class list than {clean_dir / 'labels.json'}: not re-scored"
        scored = score_model(kind, model_dir, clean_dir)
    numbers = {key: value for key, value in scored.metrics.items() if isinstance(value, (int, float))}
    registry.record_rescore(name, version, numbers, registry.split_hash(scored.ids))
    return f"{alias} v{version} had been scored on another test split ({(old_split or 'unknown')[:12]}…): re-scored on this one"


@task(name="register-model-version")
def register_task(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Not retried: a retry after a half-finished registration would register a second version."""
    registry_params = settings["registry"]
    model_dir = path_of(settings, "train.models_dir") / kind
    metrics_file = path_of(settings, "evaluate.metrics_dir") / f"{kind}.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} is missing: evaluate '{kind}' before registering it")
    scored = read_json(metrics_file)
    run_id = tracking.run_id_of(model_dir)
    split = checked_split_hash(kind, model_dir, run_id, metrics_file, scored)
    # The headline numbers become version tags; the per-class report stays in the run.
    metrics = {key: value for key, value in scored.items() if isinstance(value, (int, float))}
    name = registry.model_name(registry_params["model_prefix"], kind)
    promotion = registry.promotion_settings(registry_params, kind)
    tracking.setup(settings)  # before any registry lookup: else MLflow's default store (./mlflow.db) answers
    existing = registry.version_of_run(name, run_id) if run_id else None
    if existing is not None:
        # registering the same trained model twice would only add a duplicate version
        print(f"{name}: the model of run {run_id} already is version {existing.version}")
        if (existing.tags or {}).get(registry.SPLIT_HASH_TAG) != split:  # evaluated again on new data
            registry.record_rescore(name, existing.version, metrics, split)
        return {"name": name, "version": str(existing.version), "split": split}
    with tracking.reopen_run(settings, model_dir) as run:
        info = log_model_dir(kind, model_dir, name="model")
        version = registry.register_model_version(
            info.model_uri,
            name,
            run.info.run_id,
            metrics,
            description=f"{kind} model trained in run {run.info.run_id}",
            promotion_metric=promotion["metric"],
            test_split_hash=split,
            tags={"model_kind": kind},
        )
    return {"name": name, "version": str(version.version), "split": split}


@task(name="promote-model-version", retries=2, retry_delay_seconds=5)
def promote_task(kind: str, registered: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Retried: a locked SQLite store or a slow download is transient, and every step here is idempotent."""
    name, version = registered["name"], registered["version"]
    tracking.setup(settings)
    promotion = registry.promotion_settings(settings["registry"], kind)
    note = rescore_champion(kind, name, registered["split"], existing_dir(settings, "data.clean_dir"), promotion["champion_alias"])
    if note:
        print(f"{name}: {note}")
    decision = registry.promote(name, version, **promotion)
    print(f"{name} v{version}: {'champion' if decision.promoted else decision.alias} — {decision.reason}")
    return decision.to_dict()


@flow(name="register", log_prints=True)
def register_flow(params: str | None = None, overrides: list[str] | None = None, model: str = "all") -> dict[str, Any]:
    settings = load_params(params, overrides or [])
    require_choice(model, "--model", ("all", *MODELS))
    kinds = MODELS if model == "all" else (model,)
    summary_path = path_of(settings, "registry.summary_file")
    uri = registry.tracking_uri_for(settings["registry"])
    registry.bound_http_retries()
    registry.require_tracking_server(uri)  # a stopped server: one message naming it, within seconds
    decisions: dict[str, Any] = {}
    for kind in kinds:
        # If the server goes away mid-stage: one message naming it. A version is created with its
        # metric tags in one request and aliases move only to READY versions, so nothing
        # half-registered is left; a rerun reuses the versions of runs already registered.
        with registry.tracking_guard(uri):
            decisions[kind] = promote_task(kind, register_task(kind, settings), settings)
        # one model at a time: a later failure leaves the earlier decisions on record
        summary = read_json(summary_path) if summary_path.is_file() else {}
        summary[kind] = decisions[kind]
        write_json(summary_path, summary)
    return decisions


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Register evaluated models in the MLflow Model Registry and promote the better one.")
    parser.add_argument("--model", default="all", choices=("all", *MODELS))
    run_cli(register_flow, parser, argv)


if __name__ == "__main__":
    main()
