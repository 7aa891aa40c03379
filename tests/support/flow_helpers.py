"""Shared set-up for tests that run the real Prefect flows on a tiny generated export.

Every path of params.yaml is redirected into a temporary folder through the
flows' own `--set` overrides, and MLflow/BentoML stores live there too, so a
test run never touches the project's data/, mlruns/ or artifacts/.
"""

from __future__ import annotations

from pathlib import Path

from pipeline_steps.config import load_params
from pipeline_steps.sample_data import generate_sample

TINY_SAMPLE = {"n_products": 130, "image_size_min": 40, "image_size_max": 90}


def tiny_raw_export(target: Path) -> Path:
    """A small but complete raw export (all 13 roots, every quirk) in `target`."""
    sample = {**load_params()["sample"], **TINY_SAMPLE}
    generate_sample(target, sample)
    return target


def path_overrides(work: Path, raw_dir: Path) -> list[str]:
    """`--set` overrides that keep every stage's outputs inside `work`."""
    return [
        f"data.raw_dir={raw_dir}",
        f"data.validated_dir={work / 'validated'}",
        f"data.clean_dir={work / 'clean'}",
        f"validation.data_docs_dir={work / 'docs'}",
        f"validation.clean_data_docs_dir={work / 'clean_data_docs'}",
        f"evaluate.metrics_dir={work / 'metrics'}",
        f"evaluate.plots_dir={work / 'plots'}",
        f"train.models_dir={work / 'artifacts' / 'models'}",
        f"train.checkpoints_dir={work / 'artifacts' / 'checkpoints'}",
        f"index.dir={work / 'artifacts' / 'index'}",
        f"index.champions_dir={work / 'artifacts' / 'champions'}",
        f"index.embeddings_dir={work / 'artifacts' / 'embeddings'}",
        f"registry.summary_file={work / 'artifacts' / 'registry.json'}",
        f"serve.bundle_dir={work / 'artifacts' / 'bundle'}",
        f"serve.package_file={work / 'artifacts' / 'package.json'}",
    ]


# Small, fast model settings: the point is that every stage runs for real, not model quality.
FAST_TRAINING = [
    "cleaning.image_size=48",
    "cleaning.min_products_per_class=3",
    "train.num_threads=1",
    "train.image.input_size=32",
    "train.image.epochs=2",
    "train.image.batch_size=32",
    "train.image.augmentation=[horizontal_flip]",
    "train.text.epochs=15",
    "train.text.max_length=32",
    "train.multimodal.epochs=20",
]
