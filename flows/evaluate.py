"""Flow: score every trained model on the untouched test split, the same way for each.

Writes `metrics/<model>.json` (for `dvc metrics show/diff`), per-epoch curves
and predictions for `dvc plots`, PNGs (confusion matrix, per-class F1,
training curves), and logs all of it into the MLflow run that trained the model,
so the MLflow UI's run comparison lines the models up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, task

from flows import tracking
from flows.common import base_parser, load_params, path_of, run_cli
from pipeline_steps import evaluation, visualise
from pipeline_steps.config import existing_dir, require_choice
from pipeline_steps.evaluation import CATEGORY_MODEL_KEY, MODEL_RUN_KEY, SPLIT_HASH_KEY
from pipeline_steps.io_utils import read_json
from pipeline_steps.model_kinds import ALL_KINDS, CLASSIFIER_KINDS, PRICE_CATEGORY_KIND

MODELS = ALL_KINDS


def _text_cache_dir(settings: dict[str, Any]) -> Path:
    """The training's text-vector cache (imported here: torch only for the networks)."""
    from pipeline_steps.text_embedding_cache import embedding_cache_dir

    return embedding_cache_dir(settings["train"])


@task(name="evaluate-model")
def evaluate_task(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    clean_dir = existing_dir(settings, "data.clean_dir")
    model_dir = path_of(settings, "train.models_dir") / kind
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no trained model: run the train stage first")
    metrics_dir = path_of(settings, "evaluate.metrics_dir")
    plots_dir = path_of(settings, "evaluate.plots_dir")
    # the price model is scored as served: with the category the classifier beside it predicts
    category_model_dir = path_of(settings, "train.models_dir") / PRICE_CATEGORY_KIND if kind == "price" else None
    if category_model_dir is not None and not (category_model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{category_model_dir} holds no trained model: the price model is scored with the category the "
            f"{PRICE_CATEGORY_KIND} classifier predicts (as the service does); train it first"
        )
    # the image and multimodal models read the test photos' features from the image model's cache (train_image fills
    # it), the text and multimodal models the texts' encoder vectors from the training's text-vector cache
    metrics, y_true, y_pred, classes, ids = evaluation.score_model(
        kind, model_dir, clean_dir, category_model_dir, feature_cache_dir=path_of(settings, "train.image.features_dir"),
        text_cache_dir=_text_cache_dir(settings) if kind in CLASSIFIER_KINDS else None,
    )
    metrics["split"] = "test"
    # what register checks: these numbers belong to this model (its training run) and these rows
    metrics[MODEL_RUN_KEY] = tracking.run_id_of(model_dir)
    metrics[SPLIT_HASH_KEY] = evaluation.split_hash(ids)
    if category_model_dir is not None:
        metrics[CATEGORY_MODEL_KEY] = tracking.run_id_of(category_model_dir)
    evaluation.write_metrics_json(metrics_dir / f"{kind}.json", metrics)

    figures = []
    if kind != "price":
        figures.append(visualise.save_confusion_matrix(y_true, y_pred, classes, plots_dir / f"{kind}_confusion.png",
                                                        title=f"{kind} (test)"))
        figures.append(visualise.save_per_class_bar(metrics, plots_dir / f"{kind}_per_class_f1.png", title=f"{kind} per-class F1"))
        evaluation.write_predictions_csv(plots_dir / f"{kind}_predictions.csv", y_true, y_pred, classes)
    history_file = model_dir / "history.json"
    if history_file.is_file() and read_json(history_file):
        history = read_json(history_file)
        evaluation.write_history_csv(history, plots_dir / f"{kind}_history.csv")
        figures.append(visualise.save_training_curves(history, plots_dir / f"{kind}_curves.png", title=kind))

    with tracking.reopen_run(settings, model_dir):
        mlflow.log_metrics(evaluation.flatten_metrics(metrics, "test"))
        mlflow.log_dict(evaluation._json_safe(metrics), "evaluation/test_metrics.json")
        for figure in figures:
            tracking.log_figure_file(figure, "plots")
    headline = {k: metrics[k] for k in ("accuracy", "macro_f1", "top3_accuracy", "median_abs_error",
                                         "median_abs_error_true_category", "r2_log") if k in metrics}
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
