"""Flow: log each evaluated model to MLflow, register a new version, promote the better one.

A version is registered only with its test metrics (read from the evaluate
stage's metrics/<model>.json, which must name the run that trained the model in
models/<kind>), and the `champion` alias moves to it only when it beats the
current champion on the configured metric on the same test split; otherwise it
becomes `challenger` and the reason is printed. A champion scored on another
test split (new data or a new split seed) is first re-scored on this one; so is a
price champion scored with another category classifier than the new version
(the price model is scored with the category the served text classifier predicts).
The work is in pipeline_steps/registry.py and promotion.py; this module wires it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows import tracking
from flows.common import base_parser, load_params, path_of, run_cli
from pipeline_steps import registry
from pipeline_steps.config import existing_dir, require_choice
from pipeline_steps.evaluation import CATEGORY_MODEL_KEY
from pipeline_steps.model_kinds import ALL_KINDS, PRICE_CATEGORY_KIND
from pipeline_steps.io_utils import read_json, write_json
from pipeline_steps.mlflow_models import log_model_dir
from pipeline_steps.promotion import PromotionPolicy, checked_split_hash

MODELS = ALL_KINDS


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
    # the price model's numbers also name the classifier whose category it was scored with
    context = {CATEGORY_MODEL_KEY: scored[CATEGORY_MODEL_KEY]} if scored.get(CATEGORY_MODEL_KEY) else {}
    name = registry.model_name(registry_params["model_prefix"], kind)
    policy = PromotionPolicy.from_params(registry_params, kind)
    tracking.setup(settings)  # before any registry lookup: else MLflow's default store (./mlflow.db) answers
    existing = registry.version_of_run(name, run_id) if run_id else None
    registered = {"name": name, "split": split, **context}
    if existing is not None:
        # registering the same trained model twice would only add a duplicate version
        print(f"{name}: the model of run {run_id} already is version {existing.version}")
        registry.refresh_scores(name, existing, metrics, split, context)  # evaluated again: tags follow
        return {**registered, "version": str(existing.version)}
    with tracking.reopen_run(settings, model_dir) as run:
        info = log_model_dir(kind, model_dir, name="model")
        version = registry.register_model_version(
            info.model_uri,
            name,
            run.info.run_id,
            metrics,
            description=f"{kind} model trained in run {run.info.run_id}",
            promotion_metric=policy.metric,
            test_split_hash=split,
            tags={"model_kind": kind, **context},
        )
    return {**registered, "version": str(version.version)}


@task(name="promote-model-version", retries=2, retry_delay_seconds=5)
def promote_task(kind: str, registered: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Retried: a locked SQLite store or a slow download is transient, and every step here is idempotent."""
    name, version = registered["name"], registered["version"]
    tracking.setup(settings)
    policy = PromotionPolicy.from_params(settings["registry"], kind)
    # a champion scored on other rows (or, for price, with another category classifier) is scored again first
    note = registry.rescore_champion(
        kind, name, registered["split"], existing_dir(settings, "data.clean_dir"), policy.champion_alias,
        category_model_dir=path_of(settings, "train.models_dir") / PRICE_CATEGORY_KIND if kind == "price" else None,
        category_model_run=registered.get(CATEGORY_MODEL_KEY),
    )
    if note:
        print(f"{name}: {note}")
    decision = registry.promote(name, version, **policy.as_kwargs())
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
