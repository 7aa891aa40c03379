"""Photos per second of the cached backbone part's extraction, default layout vs channels-last.

    .venv/bin/python benchmarks/extraction_layout.py --photos 128 --rounds 3 \
        --out benchmarks/results/extraction_layout.json --update-markdown BENCHMARKS.md

What train_image spends most of its time on in a fresh clone's `make demo`: the frozen part of the
image backbone (params.yaml `train.image`: the prefix in `tail` mode, the whole backbone otherwise)
run over every photo once, to fill the feature cache (`image_features.extract`). `extract` runs the
convolutions in the channels-last layout; this script times it against the same loop in the default
(contiguous) layout, which is what `extract` did before, on the same photos, the two alternating
round by round so that a change in the box's load hits both. It also records how far apart the two
layouts' outputs are (float rounding only).

The photos are the first `--photos` of the clean layer's images (`data.clean_dir`: run `make demo`
or the clean stage first), in that order, in batches of `image_features`'s default size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline_steps import runtime_env  # noqa: E402

runtime_env.apply()

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchmarks.markdown_report import replace_section  # noqa: E402
from pipeline_steps import datasets as ds  # noqa: E402
from pipeline_steps import image_features, models, recipe_image  # noqa: E402
from pipeline_steps.config import load_params, resolve_path  # noqa: E402

SECTION = "## Feature extraction: channels-last layout"
BATCH = 32  # extract()'s batch size in the pipeline (image_features.backbone_features' default)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=128, help="photos per timed pass")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per layout (alternating)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--update-markdown", type=Path, help="rewrite this file's section with the results")
    return parser.parse_args()


@torch.inference_mode()
def extract_default_layout(module: torch.nn.Module, preprocessor, paths: list[Path]) -> torch.Tensor:  # noqa: ANN001
    """`image_features.extract` as it was before the channels-last change: contiguous batches."""
    module.eval()
    chunks = []
    for start in range(0, len(paths), BATCH):
        pixels = torch.stack([preprocessor(ds.load_rgb(path)) for path in paths[start : start + BATCH]])
        chunks.append(module(pixels).float().cpu())
    return torch.cat(chunks)


def cached_part(image_params: dict) -> tuple[torch.nn.Module, str]:
    """The module whose outputs train_image caches, built from `train.image` as the recipe builds it."""
    model = models.build_image_classifier({**image_params, "freeze_backbone": False}, n_classes=13)
    mode = recipe_image.resolve_image_mode(image_params["mode"], torch.device("cpu"), image_params["weights"] is not None, image_params["backbone"])
    if mode == "tail":
        model.split_backbone(int(image_params["tail_blocks"]))
    module, split = image_features._cached_part(model.backbone)
    tail = int(image_params["tail_blocks"])
    return module, (f"{image_params['backbone']} prefix (all but its last {tail} block{'s' if tail != 1 else ''})" if split else image_params["backbone"])


def main() -> int:
    args = parse_args()
    params = load_params()
    image_params = params["train"]["image"]
    torch.set_num_threads(int(params["train"]["num_threads"] or os.cpu_count() or 1))
    clean = resolve_path(params["data"]["clean_dir"])
    if not (clean / "images.parquet").is_file():
        print(f"{clean} holds no clean layer: run `make demo` (or the clean stage) first", file=sys.stderr)
        return 2
    frame = pd.read_parquet(clean / "images.parquet")
    paths = [clean / rel for rel in frame["path"].tolist()[: args.photos]]
    module, described = cached_part(image_params)
    preprocessor = models.build_image_preprocessor(image_params, models.describe_weights(image_params["backbone"], image_params["weights"]))
    extract_default_layout(module, preprocessor, paths[:BATCH])  # warm-up: first-call allocations
    image_features.extract(module, preprocessor, paths[:BATCH], progress=False)
    seconds: dict[str, list[float]] = {"default": [], "channels_last": []}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for layout in seconds:
            started = time.perf_counter()
            if layout == "default":
                outputs[layout] = extract_default_layout(module, preprocessor, paths)
            else:
                outputs[layout] = image_features.extract(module, preprocessor, paths, progress=False)
            seconds[layout].append(time.perf_counter() - started)
    rate = {layout: len(paths) / statistics.median(values) for layout, values in seconds.items()}
    difference = (outputs["channels_last"] - outputs["default"]).abs()
    result = {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M UTC"),
        "module": described,
        "input_size": int(preprocessor.input_size),
        "photos": len(paths),
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "seconds": seconds,
        "photos_per_second_median": rate,
        "speed_up": rate["channels_last"] / rate["default"],
        "max_abs_difference": float(difference.max()),
        "max_abs_value": float(outputs["default"].abs().max()),
        "float16_equal_share": float((outputs["channels_last"].half() == outputs["default"].half()).float().mean()),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.update_markdown:
        replace_section(args.update_markdown, SECTION, render(result, args))
    return 0


def render(result: dict, args: argparse.Namespace) -> str:
    command = (
        f"`.venv/bin/python benchmarks/extraction_layout.py --photos {args.photos} --rounds {args.rounds} "
        f"--out {args.out} --update-markdown {args.update_markdown}`"
    )
    rate = result["photos_per_second_median"]
    seconds_per_photo = {layout: 1 / value for layout, value in rate.items()}
    return "\n".join([
        SECTION,
        "",
        f"{command}: {result['module']} at {result['input_size']} px, the first {result['photos']} photos of the clean sample, "
        f"batches of {BATCH}, {result['threads']} torch threads, {result['rounds']} alternating rounds per layout (median); "
        f"load average at start {result['load_average_at_start']:.1f}, run started {result['started']}.",
        "",
        "| layout | photos/s | s per 955 photos (the sample) |",
        "|---|---:|---:|",
        f"| default (contiguous; `extract` before) | {rate['default']:.2f} | {955 * seconds_per_photo['default']:.0f} |",
        f"| channels-last (`extract` now) | {rate['channels_last']:.2f} | {955 * seconds_per_photo['channels_last']:.0f} |",
        "",
        f"Speed-up ×{result['speed_up']:.2f}. The outputs differ by float rounding only: at most {result['max_abs_difference']:.1e} "
        f"(values up to {result['max_abs_value']:.1f}); {100 * result['float16_equal_share']:.1f}% of them are equal once stored as "
        "float16 (the feature cache's dtype for a prefix's maps).",
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
