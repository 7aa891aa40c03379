"""Val only: would test-time flips help the tail-mode image model? (issue 9, per-product accuracy)

Why it exists: per-product test accuracy of the tail-mode EfficientNet-Lite2 tower is 59.2% against a
60% target, and averaging a photo's prediction with its mirror image is the cheapest lever left. The
tail trains on cached prefix maps flipped left-right, so this probe scores the val photos three ways
from the same cache: the maps as they are, flipped, and the mean of the two logits; per photo and per
product (photos pooled by `mean_log`, as the report does). No test split is read.

    .venv/bin/python benchmarks/flip_tta_probe.py --clean-dir /tmp/real/w224/clean \\
        --model-dir /tmp/real/rep_test/models/image --features-dir /tmp/real/rep_test/features
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline_steps import runtime_env  # noqa: E402

runtime_env.apply()

import torch  # noqa: E402

from pipeline_steps import datasets as ds  # noqa: E402
from pipeline_steps import image_features, inference  # noqa: E402
from pipeline_steps.image_features import pool_by_product  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean-dir", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True, help="a trained tail-mode image model")
    parser.add_argument("--features-dir", type=Path, required=True, help="its feature cache (the prefix maps)")
    args = parser.parse_args()
    classifier = inference.load_classifier(args.model_dir, device="cpu")
    module = classifier.module.eval()
    if getattr(module.backbone, "split_at", None) is None:
        raise SystemExit(f"{args.model_dir} is not a tail-mode model (train.image.mode: tail)")
    data = ds.load_clean(args.clean_dir)
    frame = data.images_of("val")
    paths = [data.clean_dir / rel for rel in frame["path"]]
    maps = image_features.backbone_features(
        module.backbone_name, module.backbone, classifier.loaded.preprocessor, paths,
        cache_dir=args.features_dir, progress=False, write=False, maps=True,
    )
    with torch.inference_mode():
        plain = module.head_logits(image_features.pooled_from_maps(module.backbone, maps))
        flipped = module.head_logits(image_features.pooled_from_maps(module.backbone, maps.flip(-1)))
    labels, ids = frame["label"].to_numpy(), frame["product_id"].astype(str).tolist()
    results = {}
    for name, logits in (("as stored", plain), ("flipped", flipped), ("mean of both (TTA)", (plain + flipped) / 2)):
        proba = torch.softmax(logits.float(), dim=1).numpy()
        _, product_labels, pooled = pool_by_product(proba, ids, labels, "mean_log")
        results[name] = {
            "val_photo_accuracy": round(float((proba.argmax(1) == labels).mean()), 4),
            "val_product_accuracy": round(float((pooled.argmax(1) == product_labels).mean()), 4),
        }
    print(json.dumps({"photos": len(paths), "products": int(len(set(ids))), "results": results}, indent=2))


if __name__ == "__main__":
    main()
