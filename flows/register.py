"""Flow: log each evaluated model to MLflow, register a new version, promote the better one.

A version is registered only with its test metrics (read from the evaluate
stage's metrics/<model>.json), and the `champion` alias moves to it only when it
beats the current champion on the configured metric on the same test split;
otherwise it becomes `challenger` and the reason is printed.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import flow, task

from flows import tracking
from flows.common import base_parser, load_params, path_of, run_cli
from pipeline_steps import registry
from pipeline_steps.config import existing_dir, require_choice
from pipeline_steps.io_utils import read_json, write_json
from pipeline_steps.mlflow_models import log_model_dir

MODELS = ("text-baseline", "pixel-baseline", "price", "image", "text", "multimodal")


def _test_split_hash(clean_dir: Any, kind: str) -> str:
    """Identity of the test split a model was scored on (photos for image models, else products)."""
    table = "images" if kind in ("image", "pixel-baseline") else "products"
    frame = pd.read_parquet(clean_dir / f"{table}.parquet", columns=["split", "product_id"])
    return registry.split_hash(frame.loc[frame["split"] == "test", "product_id"].astype(str))


@task(name="register-and-promote", retries=2, retry_delay_seconds=5)
def register_task(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Retried: a locked SQLite store or a slow artifact copy is transient."""
    registry_params = settings["registry"]
    clean_dir = existing_dir(settings, "data.clean_dir")
    model_dir = path_of(settings, "train.models_dir") / kind
    metrics_file = path_of(settings, "evaluate.metrics_dir") / f"{kind}.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} is missing: evaluate '{kind}' before registering it")
    # The headline numbers become version tags; the per-class report stays in the run.
    metrics = {key: value for key, value in read_json(metrics_file).items() if isinstance(value, (int, float))}
    name = registry.model_name(registry_params["model_prefix"], kind)
    promotion = registry.promotion_settings(registry_params, kind)
    with tracking.reopen_run(settings, model_dir) as run:
        info = log_model_dir(kind, model_dir, name="model")
        version = registry.register_model_version(
            info.model_uri,
            name,
            run.info.run_id,
            metrics,
            description=f"{kind} model trained in run {run.info.run_id}",
            promotion_metric=promotion["metric"],
            test_split_hash=_test_split_hash(clean_dir, kind),
            tags={"model_kind": kind},
        )
    decision = registry.promote(name, version.version, **promotion)
    print(f"{name} v{version.version}: {'champion' if decision.promoted else decision.alias} — {decision.reason}")
    return decision.to_dict()


@flow(name="register", log_prints=True)
def register_flow(params: str | None = None, overrides: list[str] | None = None, model: str = "all") -> dict[str, Any]:
    settings = load_params(params, overrides or [])
    require_choice(model, "--model", ("all", *MODELS))
    kinds = MODELS if model == "all" else (model,)
    decisions = {kind: register_task(kind, settings) for kind in kinds}
    summary_path = path_of(settings, "train.models_dir").parent / "registry.json"
    summary = read_json(summary_path) if summary_path.is_file() else {}
    summary.update(decisions)
    write_json(summary_path, summary)
    return decisions


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Register evaluated models in the MLflow Model Registry and promote the better one.")
    parser.add_argument("--model", default="all", choices=("all", *MODELS))
    run_cli(register_flow, parser, argv)


if __name__ == "__main__":
    main()
