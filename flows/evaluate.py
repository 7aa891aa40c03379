"""Flow: score every trained model on the untouched test split, the same way for each.

Writes `metrics/<model>.json` (for `dvc metrics show/diff`), per-epoch curves
and predictions for `dvc plots`, PNGs (confusion matrix, per-class F1,
training curves), and logs all of it into the MLflow run that trained the model,
so the MLflow UI's run comparison lines the models up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
from prefect import flow, task

from flows import tracking
from flows.common import base_parser, load_params, path_of, run_cli
from pipeline_steps import evaluation, inference, registry
from pipeline_steps.baselines import evaluate_baseline
from pipeline_steps.config import existing_dir, require_choice
from pipeline_steps.io_utils import read_json

CLASSIFIERS = ("image", "text", "multimodal")
SKLEARN = ("text-baseline", "pixel-baseline", "price")
MODELS = (*SKLEARN, *CLASSIFIERS)
MODEL_RUN_KEY = "model_run_id"
SPLIT_HASH_KEY = "test_split_hash"


class Scored(NamedTuple):
    metrics: dict[str, Any]
    y_true: np.ndarray
    y_pred: np.ndarray
    classes: list[str]
    ids: list[str]  # product_id of each scored row (one per photo for the image models)


def score_model(kind: str, model_dir: Path, clean_dir: Path) -> Scored:
    """Test-split metrics, (y_true, y_pred) for the confusion matrix and the ids of the scored rows.

    Also used by the register stage to re-score a champion on the current test split.
    """
    if kind in CLASSIFIERS:
        classifier = inference.load_classifier(model_dir)
        prediction = inference.predict_split(classifier, clean_dir, "test")
        metrics = evaluation.classification_metrics(prediction.labels, prediction.proba, classifier.classes)
        metrics["unit"] = "image" if kind == "image" else "product"
        ids = prediction.ids["product_id"].astype(str).tolist()
        return Scored(metrics, prediction.labels, prediction.proba.argmax(axis=1), classifier.classes, ids)
    result = evaluate_baseline(model_dir, clean_dir, "test")
    metrics = result["metrics"]
    classes = read_json(clean_dir / "labels.json")["classes"]
    if kind != "price":
        metrics["unit"] = "image" if kind == "pixel-baseline" else "product"
    return Scored(metrics, np.asarray(result["y_true"]), np.asarray(result["y_pred"]), classes, result["ids"])


@task(name="evaluate-model")
def evaluate_task(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    clean_dir = existing_dir(settings, "data.clean_dir")
    model_dir = path_of(settings, "train.models_dir") / kind
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no trained model: run the train stage first")
    metrics_dir = path_of(settings, "evaluate.metrics_dir")
    plots_dir = path_of(settings, "evaluate.plots_dir")
    metrics, y_true, y_pred, classes, ids = score_model(kind, model_dir, clean_dir)
    metrics["split"] = "test"
    # what register checks: these numbers belong to this model (its training run) and these rows
    metrics[MODEL_RUN_KEY] = tracking.run_id_of(model_dir)
    metrics[SPLIT_HASH_KEY] = registry.split_hash(ids)
    evaluation.write_metrics_json(metrics_dir / f"{kind}.json", metrics)

    figures = []
    if kind != "price":
        figures.append(evaluation.save_confusion_matrix(y_true, y_pred, classes, plots_dir / f"{kind}_confusion.png",
                                                        title=f"{kind} (test)"))
        figures.append(evaluation.save_per_class_bar(metrics, plots_dir / f"{kind}_per_class_f1.png", title=f"{kind} per-class F1"))
        evaluation.write_predictions_csv(plots_dir / f"{kind}_predictions.csv", y_true, y_pred, classes)
    history_file = model_dir / "history.json"
    if history_file.is_file() and read_json(history_file):
        history = read_json(history_file)
        evaluation.write_history_csv(history, plots_dir / f"{kind}_history.csv")
        figures.append(evaluation.save_training_curves(history, plots_dir / f"{kind}_curves.png", title=kind))

    with tracking.reopen_run(settings, model_dir):
        mlflow.log_metrics(evaluation.flatten_metrics(metrics, "test"))
        mlflow.log_dict(evaluation._json_safe(metrics), "evaluation/test_metrics.json")
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="plots")
    headline = {k: metrics[k] for k in ("accuracy", "macro_f1", "top3_accuracy", "median_abs_error", "r2_log") if k in metrics}
    print(f"{kind}: " + ", ".join(f"{k}={v:.3f}" for k, v in headline.items()))
    return metrics


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: str | None = None, overrides: list[str] | None = None, model: str = "all") -> dict[str, Any]:
    settings = load_params(params, overrides or [])
    require_choice(model, "--model", ("all", *MODELS))
    kinds = MODELS if model == "all" else (model,)
    return {kind: evaluate_task(kind, settings) for kind in kinds}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Evaluate trained models on the test split.")
    parser.add_argument("--model", default="all", choices=("all", *MODELS))
    run_cli(evaluate_flow, parser, argv)


if __name__ == "__main__":
    main()
