"""Run the pipeline's own code on a real export folder and write one results file (JSON + Markdown).

    python benchmarks/real_data_report.py --raw-dir ../shared/data/marketplace \\
        --work-dir /tmp/real_data_report --out reports/real_data_report.json

Steps, each the function the pipeline's stage calls (no Prefect, MLflow or registry: nothing is
written outside --work-dir except the two result files): validate (`validation.validate_raw`),
clean (`cleaning.clean_dataset`), train (`baselines.train_*`, `training.train_*` from params.yaml's
`train:` section plus `--set` overrides), score on the test split (`inference.predict_split`,
`evaluation.classification_metrics`, `baselines.evaluate_baseline`) and one Flat index per
embedding kind (`index.SimilarityIndex`, `retrieval.precision_at_k`, the index stage's rule:
test queries, own product excluded, one hit per product for photos).

Reported: every classifier's test accuracy and macro-F1 (per photo for image models, per product
otherwise), the image models' per-product accuracy (the product's photo predictions pooled by
`train.image.product_pooling`: mean of log-probabilities by default; both poolings in the JSON),
the multimodal model with texts only / photos only, the price model, and each index's
precision@k. `--clean-dir` skips validate/clean and reads an existing clean folder; a trained
model directory already in --work-dir/models is reused with `--reuse`. `--split val` scores the
validation split instead (choose settings there; report the test split once at the end).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline_steps import runtime_env  # noqa: E402

runtime_env.apply()  # telemetry off, hubs offline, before any library reads them; exported values win

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from pipeline_steps import baselines, evaluation, image_eval, inference, retrieval, training  # noqa: E402
from pipeline_steps import datasets as ds  # noqa: E402
from pipeline_steps.index import SimilarityIndex  # noqa: E402
from pipeline_steps.config import set_value  # noqa: E402

NEURAL = ("text", "image", "multimodal")
KS = (1, 5, 10)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw-dir", type=Path, help="a raw export: Products.csv, Images.csv, images/")
    parser.add_argument("--clean-dir", type=Path, help="an existing clean folder (skips validate and clean)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/real_data_report"))
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "real_data_report.json", help="JSON; the Markdown goes next to it (.md)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override, e.g. train.image.epochs=20 (YAML value)")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="the split scored (val: to choose settings)")
    parser.add_argument("--reuse", action="store_true", help="reuse model directories already in --work-dir/models")
    parser.add_argument("--skip", default="", help="comma-separated models not to train/score (e.g. price,pixel-baseline)")
    parser.add_argument("--merge", action="store_true", help="keep the models/indexes of an existing --out file that this run does not score")
    parser.add_argument("--update-readme", type=Path, help="replace the block between README_MARKERS in this file with the Markdown")
    parser.add_argument("--markdown-only", action="store_true", help="re-render the Markdown (and README block) from --out's JSON")
    args = parser.parse_args(argv)
    if not args.raw_dir and not args.clean_dir and not args.markdown_only:
        parser.error("give --raw-dir or --clean-dir")
    return args


def load_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    work = args.work_dir
    settings["train"].update(models_dir=str(work / "models"), checkpoints_dir=str(work / "checkpoints"))
    settings["train"]["image"]["features_dir"] = str(work / "features")
    for item in args.set:
        key, _, value = item.partition("=")
        set_value(settings, key.strip(), yaml.safe_load(value))
    return settings


def prepare_clean(args: argparse.Namespace, settings: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    if args.clean_dir:
        return args.clean_dir, {"clean_dir": str(args.clean_dir)}
    from pipeline_steps.cleaning import clean_dataset
    from pipeline_steps.validation import validate_raw

    validated, clean = args.work_dir / "validated", args.work_dir / "clean"
    started = time.perf_counter()
    validation = validate_raw(args.raw_dir, validated, settings["validation"], args.work_dir / "data_docs")
    manifest = clean_dataset(validated, args.raw_dir / "images", clean, settings["cleaning"])
    info = {
        "raw_dir": str(args.raw_dir),
        "rejected_fraction": validation.get("rejected_fraction"),
        "seconds": round(time.perf_counter() - started, 1),
        "products": (manifest or {}).get("products") if isinstance(manifest, dict) else None,
    }
    return clean, info


def classifier_scores(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict[str, Any]:
    metrics = evaluation.classification_metrics(y, proba, classes)
    return {key: round(float(metrics[key]), 4) for key in ("accuracy", "macro_f1", "top3_accuracy") if key in metrics} | {"n": int(len(y))}


def per_product(prediction: inference.SplitPrediction, classes: list[str], pooling: str | None = None) -> dict[str, Any]:
    """An image model's accuracy per product: its photos' predictions pooled (`image_eval.pool_by_product`)."""
    pooling = image_eval.check_pooling(pooling)
    _, labels, proba = image_eval.pool_by_product(prediction.proba, prediction.ids["product_id"].astype(str).tolist(), prediction.labels, pooling)
    return classifier_scores(labels, proba, classes) | {"pooling": pooling}


def train_all(clean: Path, settings: dict[str, Any], reuse: bool, skip: set[str]) -> dict[str, Any]:
    models_dir = Path(settings["train"]["models_dir"])
    timings: dict[str, Any] = {}
    section = settings  # baseline_params reads train.baselines and train.seed, as the train_sklearn stage does
    jobs = {
        "text-baseline": lambda out: baselines.train_text_baseline(clean, section, out),
        "pixel-baseline": lambda out: baselines.train_pixel_baseline(clean, section, out),
        "price": lambda out: baselines.train_price_estimator(clean, section, out),
        "text": lambda out: training.train_text_classifier(clean, settings["train"], out),
        "image": lambda out: training.train_image_classifier(clean, settings["train"], out),
        "multimodal": lambda out: training.train_multimodal_classifier(clean, settings["train"], models_dir / "image", models_dir / "text", out),
    }
    for name, job in jobs.items():
        out = models_dir / name
        if name in skip or (reuse and (out / "config.json").is_file()):
            continue
        started = time.perf_counter()
        print(f"training {name} ...", flush=True)
        job(out)
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"  {name}: {timings[name]} s", flush=True)
    return timings


def score_all(clean: Path, settings: dict[str, Any], skip: set[str], split: str = "test") -> tuple[dict[str, Any], dict[str, Any]]:
    models_dir = Path(settings["train"]["models_dir"])
    features = Path(settings["train"]["image"]["features_dir"])
    results: dict[str, Any] = {}
    indexes: dict[str, Any] = {}
    for name in ("text-baseline", "pixel-baseline", "price"):
        if name in skip or not (models_dir / name).is_dir():
            continue
        scored = baselines.evaluate_baseline(models_dir / name, clean, split)
        metrics = scored["metrics"]
        keep = ("r2_log", "median_abs_error", "baseline_median_abs_error") if name == "price" else ("accuracy", "macro_f1", "top3_accuracy")
        results[name] = {k: round(float(metrics[k]), 4) for k in keep if k in metrics} | {"unit": "photo" if name == "pixel-baseline" else "product"}
    for name in NEURAL:
        if name in skip or not (models_dir / name).is_dir():
            continue
        classifier = inference.load_classifier(models_dir / name, device="cpu")
        full = inference.predict_split(classifier, clean, None, progress=False, feature_cache_dir=features)
        test = (full.ids["split"] == split).to_numpy()
        test_pred = inference.SplitPrediction(full.ids[test].reset_index(drop=True), full.labels[test], full.proba[test], full.embeddings[test])
        row = classifier_scores(test_pred.labels, test_pred.proba, classifier.classes)
        row["unit"] = "photo" if name == "image" else "product"
        if name == "image":
            pooling = classifier.config.get("params", {}).get("product_pooling")
            row["per_product"] = per_product(test_pred, classifier.classes, pooling)
            row["per_product_by_pooling"] = {p: per_product(test_pred, classifier.classes, p)["accuracy"] for p in image_eval.PRODUCT_POOLING}
            row["search_embedding"] = classifier.config.get("search_embedding")
            row["backbone"] = classifier.config["architecture"]["backbone"]
            row["mode"] = classifier.config["architecture"].get("mode")
            row["tail_blocks"] = classifier.config["architecture"].get("tail_blocks")
            row["input_size"] = classifier.config.get("preprocessing", {}).get("image", {}).get("input_size")
        if name == "multimodal":
            row.update(multimodal_ablations(classifier, clean, features, split))
        results[name] = row
        indexes[name] = index_precision(name, full, split)
    return results, indexes


def multimodal_ablations(classifier: inference.Classifier, clean: Path, features_dir: Path, split: str = "test") -> dict[str, Any]:
    """The fused model on the test split with texts only (no photo: the path a listing without one
    takes) and with photos only (products that have one; backbone features from the cache)."""
    import torch

    from pipeline_steps import image_features

    data = ds.load_clean(clean)
    products = data.products_of(split)
    by_product = data.image_paths_by_product()
    labels = products["label"].to_numpy()
    text_only = classifier.predict_proba([None] * len(products), products["text"].tolist())
    has_photo = np.array([bool(by_product.get(p)) for p in products["product_id"]])
    paths = [by_product[p] for p in products["product_id"][has_photo]]
    tower = classifier.module.image_tower
    flat = image_features.backbone_features(
        tower.backbone_name, tower.backbone, classifier.loaded.preprocessor, [x for row in paths for x in row], cache_dir=features_dir, progress=False, write=False
    )
    owner = torch.tensor([row for row, photos in enumerate(paths) for _ in photos], dtype=torch.long)
    with torch.inference_mode():
        logits, _ = classifier.multimodal_outputs(flat, owner, [None] * len(paths))
    photo_only = torch.softmax(logits.float(), dim=1).numpy()
    return {
        "texts_only": classifier_scores(labels, text_only, classifier.classes),
        "photos_only": classifier_scores(labels[has_photo], photo_only, classifier.classes),
    }


def index_precision(kind: str, prediction: inference.SplitPrediction, split: str = "test") -> dict[str, Any]:
    ids = prediction.ids[["product_id", "image_id", "split", "label"]].reset_index(drop=True)
    built = SimilarityIndex.build(prediction.embeddings, ids, kind=kind, factory="Flat", use_gpu=False)
    test = (ids["split"] == split).to_numpy()
    metrics = retrieval.precision_at_k(
        built, prediction.embeddings[test], ids.loc[test, "product_id"].tolist(), ids.loc[test, "label"].to_numpy(), "label",
        ks=KS, unique_products=kind == "image",
    )
    return {"vectors": int(built.size), "dim": int(built.dim), "queries": int(test.sum()), **{k: round(float(v), 4) for k, v in metrics.items()}}


def markdown(report: dict[str, Any]) -> str:
    res, idx = report["models"], report["indexes"]
    split = report.get("split", "test")
    lines = [
        f"Generated by `{report['command']}` on {report['created_at']} ({split} split; {report.get('clean', {}).get('clean_dir', '')}).",
        "",
        f"| model | unit | {split} accuracy | macro-F1 | top-3 | per-product accuracy (image models) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    labels = {
        "multimodal": "multimodal (pretrained image tower + text, learned fusion + wide)",
        "text": "text (MiniLM frozen + TF-IDF wide & deep)",
        "image": "image",
        "text-baseline": "text baseline (TF-IDF + logistic regression)",
        "pixel-baseline": "pixel baseline (16×16 logistic regression)",
    }
    for name in ("multimodal", "text", "text-baseline", "image", "pixel-baseline"):
        if name not in res:
            continue
        row = res[name]
        label = labels[name]
        if name == "image":
            size = row.get("input_size")
            how = {"frozen": "frozen backbone", "fine_tune": "fine-tuned backbone",
                   "tail": (f"last {row['tail_blocks']} block(s) + head conv" if row.get("tail_blocks") is not None else "backbone tail")
                   + " fine-tuned on cached maps"}.get(row.get("mode"), f"{row.get('mode')} backbone")
            label = f"image: {row.get('backbone')} ({how}{f', {size} px' if size else ''})"
        pp = row.get("per_product", {}).get("accuracy")
        pooling = row.get("per_product", {}).get("pooling", "mean of probabilities")
        lines.append(
            f"| {label} | {row['unit']} | {row['accuracy']:.1%} | {row['macro_f1']:.3f} | "
            f"{row.get('top3_accuracy', float('nan')):.1%} | {'' if pp is None else f'{pp:.1%} ({pooling})'} |"
        )
        if name == "multimodal":
            for ablation in ("texts_only", "photos_only"):
                if ablation in row:
                    a = row[ablation]
                    lines.append(f"| … multimodal, {ablation.replace('_', ' ')} | product | {a['accuracy']:.1%} | {a['macro_f1']:.3f} | {a['top3_accuracy']:.1%} | |")
    if "price" in res:
        p = res["price"]
        lines += ["", "| price estimator | R² (log-price) | median abs. error | always-the-median |", "|---|---:|---:|---:|",
                  f"| TF-IDF + category + town/county → ridge | {p.get('r2_log', float('nan')):.3f} | £{p.get('median_abs_error', float('nan')):.1f} | "
                  f"£{p.get('baseline_median_abs_error', float('nan')):.1f} |"]
    lines += ["", "| index | vectors | dim | queries | precision@1 | precision@5 | precision@10 |", "|---|---:|---:|---:|---:|---:|---:|"]
    names = {"image": "image → image (one hit per product)", "text": "text → listing", "multimodal": "multimodal (fusion layer)"}
    for kind, row in idx.items():
        label = names[kind]
        if kind == "image" and res.get("image", {}).get("search_embedding"):
            label += f", {res['image']['search_embedding']['vector']} vector"
        lines.append(
            f"| {label} | {row['vectors']:,} | {row['dim']} | {row['queries']:,} | {row['precision@1']:.3f} | {row['precision@5']:.3f} | **{row['precision@10']:.3f}** |"
        )
    search = res.get("image", {}).get("search_embedding")
    if search:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in search[[k for k in search if k.startswith("val_precision")][0]].items())
        lines += ["", f"Photo index vector: **{search['vector']}** ({search['dim']}-d), chosen by {search['chosen_by']} on the val split ({scores}; margin {search['margin']:.3f})."]
    if report.get("training_seconds"):
        lines += ["", "Training wall time (s, this run): " + ", ".join(f"{k} {v}" for k, v in report["training_seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


README_MARKERS = ("<!-- real_data_report:start -->", "<!-- real_data_report:end -->")


def update_readme(path: Path, text: str) -> None:
    content = path.read_text(encoding="utf-8")
    start, end = README_MARKERS
    if start not in content or end not in content:
        raise SystemExit(f"{path} has no {start} ... {end} block to replace")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}{end}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.markdown_only:
        text = markdown(json.loads(args.out.read_text(encoding="utf-8")))
        args.out.with_suffix(".md").write_text(text, encoding="utf-8")
        if args.update_readme:
            update_readme(args.update_readme, text)
        print(text)
        return
    settings = load_settings(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    clean, clean_info = prepare_clean(args, settings)
    clean_info["clean_dir"] = str(clean)
    timings = train_all(clean, settings, args.reuse, skip)
    models, indexes = score_all(clean, settings, skip, args.split)
    if args.merge and args.out.is_file():
        previous = json.loads(args.out.read_text(encoding="utf-8"))
        models = {**previous.get("models", {}), **models}
        indexes = {**previous.get("indexes", {}), **indexes}
        timings = {**previous.get("training_seconds", {}), **timings}
    report = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/real_data_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "split": args.split,
        "clean": clean_info,
        "overrides": args.set,
        "training_seconds": timings,
        "models": models,
        "indexes": indexes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    if args.update_readme:
        update_readme(args.update_readme, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
