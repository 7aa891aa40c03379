"""Train and score the category classifiers on a real clean folder; write one JSON of results.

    python benchmarks/real_data_models.py --clean-dir /path/to/clean --out reports/real_data_models.json

The clean folder follows the Clean contract (docs/ARCHITECTURE.md) and is only read. Every
model is trained with the pipeline's own code (`pipeline_steps.training`) from params.yaml's
`train:` section (plus `--set` overrides), written under `--work-dir`, loaded back from disk
with `pipeline_steps.inference.load_classifier` and scored on the val and test splits
(accuracy, macro-F1, log-loss). Hyper-parameters are chosen on val; test is only reported.

Models (`--models`, comma-separated; default all):
  text_deep       frozen MiniLM pooled embedding -> MLP head (`train.text.wide: false`)
  text_wide       the wide branch alone: TF-IDF -> sparse linear layer, same loop and settings
  text_wide_deep  the text model as configured with `train.text.wide: true`
  text_baseline   scikit-learn TF-IDF + logistic regression (`train.baselines`), for reference
  image           resnet18 from scratch (`train.image`); or pass --image-model to reuse one
  multimodal_deep fusion of image + text_deep towers, no wide branch
  multimodal      fusion of image + text_wide_deep towers with the wide branch
                  (also scored with photos only and with texts only on test)
  text_fine_tuned text_wide_deep with the encoder fine-tuned (FINE_TUNE_OVERRIDES; ~20 min on 2 CPUs)
  ensemble        mean of the class probabilities of the text models scored before it in the same
                  run (text_wide_deep, text_fine_tuned, text_baseline): equal weights, nothing fitted,
                  so val stays a fair check

Examples:
  # everything (the image model takes ~15-20 min on 2 busy CPU cores, the rest a few minutes)
  python benchmarks/real_data_models.py --clean-dir /tmp/real/clean --out /tmp/real_models.json
  # try a setting on val
  python benchmarks/real_data_models.py --clean-dir /tmp/real/clean --models text_wide_deep \\
      --set text.wide_lr=0.05 --set text.wide_weight_decay=0.1 --out /tmp/try.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline_steps import runtime_env  # noqa: E402

runtime_env.apply()  # telemetry off, hubs offline, before any library reads them; exported values win

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from pipeline_steps import baselines, evaluation, inference, models, training, training_loop, wide_branch  # noqa: E402
from pipeline_steps import datasets as ds  # noqa: E402
from pipeline_steps.train_params import model_params  # noqa: E402
from pipeline_steps.config import set_value  # noqa: E402

ALL_MODELS = (
    "text_deep", "text_wide", "text_wide_deep", "text_baseline", "image", "multimodal_deep", "multimodal", "text_fine_tuned", "ensemble",
)
ENSEMBLE_MEMBERS = ("text_wide_deep", "text_fine_tuned", "text_baseline")
# the fine-tuned run measured in the README (val loss was lowest at epoch 3 of 5)
FINE_TUNE_OVERRIDES = {"fine_tune": True, "epochs": 5, "encoder_lr": 5e-5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean-dir", required=True, type=Path, help="clean folder (products.parquet, images.parquet, labels.json)")
    parser.add_argument("--out", type=Path, default=Path("reports/real_data_models.json"), help="JSON of results")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/real_data_models"), help="models and checkpoints go here")
    parser.add_argument("--params", type=Path, default=Path(__file__).resolve().parent.parent / "params.yaml")
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated subset of {','.join(ALL_MODELS)}")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a train: key, e.g. text.wide_lr=0.05 or early_stopping_patience=4 (YAML value)")
    parser.add_argument("--image-model", type=Path, help="an already trained image model dir to use instead of training one")
    parser.add_argument("--threads", type=int, default=1, help="train.num_threads (1 is fastest on a busy shared CPU)")
    parser.add_argument("--seed", type=int, help="train.seed override")
    parser.add_argument("--reuse", action="store_true",
                        help="score a text model already saved under --work-dir/models/<name> instead of training it again")
    return parser.parse_args(argv)


def train_params(args: argparse.Namespace) -> dict[str, Any]:
    params = yaml.safe_load(args.params.read_text(encoding="utf-8"))["train"]
    params.update(
        device="cpu", num_workers=0, num_threads=args.threads,
        models_dir=str(args.work_dir / "models"), checkpoints_dir=str(args.work_dir / "checkpoints"),
    )
    if args.seed is not None:
        params["seed"] = args.seed
    for item in args.set:
        key, _, value = item.partition("=")
        set_value(params, key.strip(), yaml.safe_load(value))
    return params


def scores(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict[str, Any]:
    metrics = evaluation.classification_metrics(y, proba, classes)
    return {key: round(metrics[key], 4) if isinstance(metrics[key], float) else metrics[key] for key in ("n", "accuracy", "macro_f1", "log_loss", "top3_accuracy")}


# (model name, split) -> class probabilities of the products of that split, for the ensemble row
PROBABILITIES: dict[tuple[str, str], np.ndarray] = {}


def score_dir(model_dir: Path, clean_dir: Path) -> dict[str, Any]:
    classifier = inference.load_classifier(model_dir, device="cpu")
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        prediction = inference.predict_split(classifier, clean_dir, split, progress=False)
        out[split] = scores(prediction.labels, prediction.proba, classifier.classes)
        PROBABILITIES[(model_dir.name, split)] = prediction.proba
    return out


def run_ensemble(clean_dir: Path) -> dict[str, Any]:
    """Average the members' probabilities (one row per product, the same order for every text model)."""
    members = [name for name in ENSEMBLE_MEMBERS if (name, "val") in PROBABILITIES]
    if len(members) < 2:
        raise SystemExit(f"ensemble needs at least two of {ENSEMBLE_MEMBERS} earlier in --models; got {members}")
    data = ds.load_clean(clean_dir)
    out: dict[str, Any] = {"members": members, "weights": "equal"}
    for split in ("val", "test"):
        proba = np.mean([PROBABILITIES[(name, split)] for name in members], axis=0)
        out[split] = scores(data.products_of(split)["label"].to_numpy(), proba, data.classes)
    return out


def training_summary(result: training.TrainResult, wall: float) -> dict[str, Any]:
    return {
        "train_loop_seconds": round(result.seconds, 1),
        "wall_seconds": round(wall, 1),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "history": [{k: round(v, 4) for k, v in row.items()} for row in result.history],
        "architecture_wide": result.config["architecture"].get("wide"),
    }


def run_text(params: dict[str, Any], clean_dir: Path, work: Path, wide: bool, name: str, reuse: bool = False) -> dict[str, Any]:
    params = copy.deepcopy(params)
    params["text"]["wide"] = wide
    if name == "text_fine_tuned":
        params["text"].update(FINE_TUNE_OVERRIDES)
    saved = work / "models" / name
    if reuse and (saved / "config.json").is_file():
        config = json.loads((saved / "config.json").read_text())
        return {**score_dir(saved, clean_dir), "model_dir": str(saved), "trained_here": False, "params": config.get("params")}
    params["checkpoints_dir"] = str(work / "checkpoints" / name)
    _share_embedding_cache(work, name)
    started = time.perf_counter()
    result = training.train_text_classifier(clean_dir, params, work / "models" / name, progress=False)
    return {**score_dir(result.model_dir, clean_dir), **training_summary(result, time.perf_counter() - started), "params": params["text"]}


def _share_embedding_cache(work: Path, name: str) -> None:
    """All runs read one MiniLM embedding cache (encoding is the slow part of frozen training)."""
    shared = work / "embedding_cache"
    shared.mkdir(parents=True, exist_ok=True)
    link = work / "checkpoints" / name / "embedding_cache"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(shared, target_is_directory=True)


class _WideOnly(nn.Module):
    """The wide branch alone (for the "wide only" row): TF-IDF bag -> sparse linear layer + bias."""

    def __init__(self, wide: models.WideLinear, n_classes: int) -> None:
        super().__init__()
        self.wide = wide
        self.bias = nn.Parameter(torch.zeros(n_classes))

    def forward(self, **wide_inputs: torch.Tensor) -> torch.Tensor:
        return self.wide(*(wide_inputs[k] for k in models.WIDE_INPUTS)) + self.bias


def run_text_wide_only(params: dict[str, Any], clean_dir: Path, work: Path) -> dict[str, Any]:
    """Same featurizer, layer, loop and settings as the wide branch of text_wide_deep, without the deep head."""
    section = model_params(params, "text")
    started = time.perf_counter()
    data = ds.load_clean(clean_dir)
    frames = {s: data.products_of(s) for s in ("train", "val", "test")}
    featurizer = models.WideFeaturizer.fit(frames["train"]["text"].tolist(), wide_branch.wide_settings(section, "text"))
    wide_opt = wide_branch.wide_optimizer_settings(section, "text")
    settings = training_loop.loop_settings({**section, "checkpoints_dir": str(work / "checkpoints" / "text_wide")}, "text", progress=False)
    sets = {
        s: ds.TensorDictDataset({}, frame["label"].tolist(), sparse=featurizer.transform(frame["text"].tolist())) for s, frame in frames.items()
    }
    training_loop.seed_everything(settings.seed)
    with training_loop.deterministic(settings.num_threads):
        model = _WideOnly(models.WideLinear(featurizer.n_features, len(data.classes), wide_opt["dropout"]), len(data.classes))
        groups = [{"params": list(model.parameters()), "lr": wide_opt["lr"], "weight_decay": wide_opt["weight_decay"]}]
        outcome = training_loop.fit(model, groups, sets["train"], sets["val"], ds.collate_tensor_dicts, settings)
        out: dict[str, Any] = {}
        with torch.inference_mode():
            for split in ("val", "test"):
                inputs, labels = ds.collate_tensor_dicts([sets[split][i] for i in range(len(sets[split]))])
                proba = torch.softmax(model(**inputs), dim=1).numpy()
                out[split] = scores(labels.numpy(), proba, data.classes)
    return {
        **out,
        "train_loop_seconds": round(outcome.seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "best_epoch": outcome.best_epoch,
        "epochs_run": len(outcome.history),
        "stopped_early": outcome.stopped_early,
        "n_features": featurizer.n_features,
        "wide": {**wide_opt, **wide_branch.wide_settings(section, "text")},
    }


def run_text_baseline(params: dict[str, Any], clean_dir: Path, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    section = {**params["baselines"], "seed": params.get("seed", 0)}
    baselines.train_text_baseline(clean_dir, section, work / "models" / "text_baseline")
    model = baselines.load_sklearn_model(work / "models" / "text_baseline")
    out: dict[str, Any] = {"wall_seconds": round(time.perf_counter() - started, 1), "params": params["baselines"]}
    data = ds.load_clean(clean_dir)
    for split in ("val", "test"):
        frame = data.products_of(split)
        proba = np.asarray(model.predict_proba(texts=frame["text"].tolist()))
        out[split] = scores(frame["label"].to_numpy(), proba, data.classes)
        PROBABILITIES[("text_baseline", split)] = proba
    return out


def run_image(params: dict[str, Any], clean_dir: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    params = copy.deepcopy(params)
    params["checkpoints_dir"] = str(work / "checkpoints" / "image_run")
    started = time.perf_counter()

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        print(f"  image epoch {epoch}: val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.4f} ({metrics['epoch_seconds']:.0f}s)", flush=True)

    result = training.train_image_classifier(clean_dir, params, work / "models" / "image", on_epoch_end=log_epoch, progress=False)
    summary = {**score_dir(result.model_dir, clean_dir), **training_summary(result, time.perf_counter() - started), "params": params["image"]}
    return result.model_dir, summary


def run_multimodal(params: dict[str, Any], clean_dir: Path, work: Path, image_dir: Path, text_dir: Path, wide: bool, name: str) -> dict[str, Any]:
    params = copy.deepcopy(params)
    params["multimodal"]["wide"] = wide
    params["checkpoints_dir"] = str(work / "checkpoints" / name)
    _share_embedding_cache(work, name)
    started = time.perf_counter()
    result = training.train_multimodal_classifier(clean_dir, params, image_dir, text_dir, work / "models" / name, progress=False)
    out = {**score_dir(result.model_dir, clean_dir), **training_summary(result, time.perf_counter() - started), "params": params["multimodal"]}
    # one modality at a time on test: a listing without text (wide logits 0) and one without photos
    classifier = inference.load_classifier(result.model_dir, device="cpu")
    data = ds.load_clean(clean_dir)
    test = data.products_of("test")
    by_product = data.image_paths_by_product()
    with_photo = test[[bool(by_product.get(p)) for p in test["product_id"]]].reset_index(drop=True)
    photos = [[ds.load_rgb(path) for path in by_product[p]] for p in with_photo["product_id"]]
    out["test_photos_only"] = scores(with_photo["label"].to_numpy(), classifier.predict_proba(photos, [None] * len(photos)), classifier.classes)
    out["test_text_only"] = scores(test["label"].to_numpy(), classifier.predict_proba(None, test["text"].tolist()), classifier.classes)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(ALL_MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {ALL_MODELS}")
    params = train_params(args)
    clean_dir, work = args.clean_dir, args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((clean_dir / "manifest.json").read_text()) if (clean_dir / "manifest.json").is_file() else {}
    report: dict[str, Any] = {
        "clean_dir": str(clean_dir),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "splits": manifest.get("products") or {s: len(ds.load_clean(clean_dir).products_of(s)) for s in ("train", "val", "test")},
        "train_params": params,
        "models": {},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")

    text_dirs: dict[str, Path] = {}
    image_dir = args.image_model
    for name in wanted:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        if name in ("text_deep", "text_wide_deep", "text_fine_tuned"):
            report["models"][name] = run_text(params, clean_dir, work, wide=name != "text_deep", name=name, reuse=args.reuse)
            text_dirs[name] = work / "models" / name
        elif name == "ensemble":
            report["models"][name] = run_ensemble(clean_dir)
        elif name == "text_wide":
            report["models"][name] = run_text_wide_only(params, clean_dir, work)
        elif name == "text_baseline":
            report["models"][name] = run_text_baseline(params, clean_dir, work)
        elif name == "image":
            if image_dir is not None:
                config = json.loads((image_dir / "config.json").read_text())
                history = json.loads((image_dir / "history.json").read_text())
                report["models"][name] = {
                    **score_dir(image_dir, clean_dir), "model_dir": str(image_dir), "trained_here": False,
                    "training": config.get("training"), "params": config.get("params"),
                    "history": [{k: round(v, 4) for k, v in row.items()} for row in history],
                }
            else:
                image_dir, report["models"][name] = run_image(params, clean_dir, work)
        else:
            tower = "text_wide_deep" if name == "multimodal" else "text_deep"
            if tower not in text_dirs:
                report["models"][tower] = run_text(params, clean_dir, work, wide=tower == "text_wide_deep", name=tower)
                text_dirs[tower] = work / "models" / tower
            if image_dir is None:
                image_dir, report["models"]["image"] = run_image(params, clean_dir, work)
            report["models"][name] = run_multimodal(params, clean_dir, work, image_dir, text_dirs[tower], wide=name == "multimodal", name=name)
        result = report["models"][name]
        print(
            f"   {name}: val acc {result['val']['accuracy']:.4f} f1 {result['val']['macro_f1']:.4f} | "
            f"test acc {result['test']['accuracy']:.4f} f1 {result['test']['macro_f1']:.4f} ({time.perf_counter() - started:.0f}s)",
            flush=True,
        )
        save()
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save()
    return report


if __name__ == "__main__":
    main()
