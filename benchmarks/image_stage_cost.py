"""What the image model costs `make demo`: the train_image work on the embedded sample, per setting.

    .venv/bin/python benchmarks/image_stage_cost.py --out benchmarks/results/image_stage_cost.json

Generates the sample (`sample_data`), validates and cleans it with the pipeline's functions into
`--work-dir`, then trains the image model (`training.train_image_classifier`, what the train_image
stage runs) once per setting, each with an empty feature cache as on a fresh clone, and records
the wall time and the val loss. Settings: params.yaml as it is (`current`), and the ones given
with `--variant NAME:KEY=VALUE,KEY=VALUE` (YAML values). The default variants are the image
settings before issue 9 (ResNet-18 from scratch at 64 px, 12 epochs) and the frozen Lite2 head.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline_steps import runtime_env  # noqa: E402

runtime_env.apply()

import yaml  # noqa: E402

from pipeline_steps import training  # noqa: E402
from pipeline_steps.config import set_value  # noqa: E402

DEFAULT_VARIANTS = [
    "before_issue_9:backbone=resnet18,weights=null,input_size=64,mode=auto,epochs=12,lr=0.001,weight_decay=0.05,dropout=0.2",
    "frozen_lite2:mode=frozen,epochs=30",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/image_stage_cost"))
    parser.add_argument("--variant", action="append", default=None, help="NAME:key=value,... under train.image")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--note", default="", help="the conditions of the run (what else ran on the box), kept in the JSON")
    return parser.parse_args()


def prepare_sample(settings: dict, work: Path) -> Path:
    from pipeline_steps.cleaning import clean_dataset
    from pipeline_steps.sample_data import generate_sample
    from pipeline_steps.validation import validate_raw

    clean = work / "clean"
    if (clean / "images.parquet").is_file():
        return clean
    generate_sample(work / "raw", settings["sample"])
    validate_raw(work / "raw", work / "validated", settings["validation"], work / "data_docs")
    clean_dataset(work / "validated", work / "raw" / "images", clean, settings["cleaning"])
    return clean


def main() -> None:
    args = parse_args()
    settings = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    clean = prepare_sample(settings, args.work_dir)
    variants = [("current", {})]
    for text in args.variant if args.variant is not None else DEFAULT_VARIANTS:
        name, _, pairs = text.partition(":")
        variants.append((name, {k: yaml.safe_load(v) for k, _, v in (p.partition("=") for p in pairs.split(","))}))
    results = []
    for name, overrides in variants:
        train = copy.deepcopy(settings["train"])
        for key, value in overrides.items():
            set_value(train, f"image.{key}", value)
        train["image"]["features_dir"] = str(args.work_dir / name / "features")  # empty: as on a fresh clone
        started = time.perf_counter()
        result = training.train_image_classifier(clean, train, args.work_dir / name / "model", progress=False)
        seconds = time.perf_counter() - started
        last = result.history[result.best_epoch - 1] if result.history else {}
        results.append({"variant": name, "overrides": overrides, "seconds": round(seconds, 1), "mode": result.config["architecture"]["mode"],
                        "epochs_run": len(result.history), "best_epoch": result.best_epoch, "best_val_loss": round(result.best_val_loss, 4),
                        "val_accuracy_at_best": last.get("val_accuracy", last.get("val_acc"))})
        print(json.dumps(results[-1]), flush=True)
    out = {"note": args.note, "clean_dir": str(clean), "photos": int(sum(1 for _ in (clean / "images").rglob("*.jpg"))), "results": results}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
