"""Flow: train one model (or all of them) on the clean, product-split data.

`python -m flows.train --model image` is what the `train_image` DVC stage runs;
the `pipeline` flow calls `train_flow` for every model as a subflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, task

from flows import tracking
from flows.common import base_parser, load_params, path_of, run_cli
from pipeline_steps import baselines
from pipeline_steps.config import existing_dir, require_choice
from pipeline_steps.model_kinds import BASELINE_KINDS, PRICE_KIND
from pipeline_steps.model_kinds import NEURAL_KINDS as NEURAL

MODELS = ("baselines", PRICE_KIND, *NEURAL)
#: `--model` names that train several models in one process. The scikit-learn models share
#: their inputs and settings, so one DVC stage (train_sklearn) trains them and pays the
#: process start and imports once.
GROUPS = {"all": MODELS, "sklearn": ("baselines", PRICE_KIND)}


def _shared_train_params(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in settings["train"].items() if not isinstance(value, dict)}


@task(name="train-neural-model", retries=0)
def train_neural_task(kind: str, settings: dict[str, Any], resume: bool) -> str:
    # Imported here: the train_sklearn stage never pays for torch.
    from pipeline_steps import training

    clean_dir = existing_dir(settings, "data.clean_dir")
    models_dir = path_of(settings, "train.models_dir")
    out_dir = models_dir / kind
    checkpoint_dir = path_of(settings, "train.checkpoints_dir") / kind
    section = {**_shared_train_params(settings), **settings["train"][kind]}
    resume_run = tracking.run_id_of(checkpoint_dir) if resume else None
    with tracking.training_run(settings, f"{kind}-classifier", section, resume_run) as run:
        tracking.remember_run(checkpoint_dir, run.info.run_id)
        # one process, or train.distributed.nproc under torchrun (DistributedDataParallel)
        training.train_model(kind, clean_dir, settings["train"], models_dir, resume=resume, on_epoch_end=tracking.log_epoch)
        tracking.remember_run(out_dir, run.info.run_id)
        mlflow.log_artifact(str(out_dir / "config.json"), artifact_path="model_config")
    return str(out_dir)


@task(name="train-sklearn-models")
def train_sklearn_task(kind: str, settings: dict[str, Any]) -> list[str]:
    clean_dir = existing_dir(settings, "data.clean_dir")
    models_dir = path_of(settings, "train.models_dir")
    section = settings["train"]["baselines"]
    trainers = {
        "text-baseline": baselines.train_text_baseline,
        "pixel-baseline": baselines.train_pixel_baseline,
        PRICE_KIND: baselines.train_price_estimator,
    }
    jobs = {name: trainers[name] for name in ((PRICE_KIND,) if kind == PRICE_KIND else BASELINE_KINDS)}
    written = []
    for name, train_fn in jobs.items():
        out_dir = models_dir / name
        with tracking.training_run(settings, name, section) as run:
            train_fn(clean_dir, settings, out_dir)  # train.baselines + train.seed
            tracking.remember_run(out_dir, run.info.run_id)
        written.append(str(out_dir))
    return written


@flow(name="train", log_prints=True)
def train_flow(
    params: str | None = None, overrides: list[str] | None = None, model: str = "all", resume: bool = False
) -> list[str]:
    settings = load_params(params, overrides or [])
    require_choice(model, "--model", (*GROUPS, *MODELS))
    kinds = GROUPS.get(model, (model,))
    written: list[str] = []
    for kind in kinds:
        if kind in NEURAL:
            written.append(train_neural_task(kind, settings, resume))
        else:
            written.extend(train_sklearn_task(kind, settings))
    print("trained: " + ", ".join(written))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Train the category classifiers, the price estimator and the baselines.")
    parser.add_argument("--model", default="all", choices=(*GROUPS, *MODELS))
    parser.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    run_cli(train_flow, parser, argv)


if __name__ == "__main__":
    main()
