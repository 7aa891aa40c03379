"""The index stage's report, now step functions (they lived in flows/index.py): retrieval metrics and the neighbour grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline_steps.index import SimilarityIndex
from pipeline_steps.index_quality import index_quality_metrics
from pipeline_steps.visualise import neighbour_figure

CLASSES = ["Appliances", "Home & Garden"]


@pytest.fixture()
def indexed(tmp_path: Path) -> tuple[SimilarityIndex, np.ndarray, pd.DataFrame, Path]:
    """Two well separated clusters (one per class), 5 products each, the last two of each in test; one photo per product."""
    rng = np.random.default_rng(0)
    rows, vectors = [], []
    clean = tmp_path / "clean"
    (clean / "images").mkdir(parents=True)
    images = []
    for label in (0, 1):
        centre = np.eye(8, dtype=np.float32)[label] * 10
        for i in range(5):
            pid = f"p{label}{i}"
            rows.append({"product_id": pid, "image_id": None, "split": "test" if i >= 3 else "train", "label": label})
            vectors.append(centre + rng.normal(0, 0.1, 8).astype(np.float32))
            Image.new("RGB", (16, 16), (200 * label, 40, 40)).save(clean / "images" / f"i{pid}.jpg")
            images.append({"image_id": f"i{pid}", "product_id": pid, "path": f"images/i{pid}.jpg"})
    pd.DataFrame(images).to_parquet(clean / "images.parquet", index=False)
    (clean / "labels.json").write_text(json.dumps({"classes": CLASSES}))
    ids = pd.DataFrame(rows)
    matrix = np.stack(vectors)
    built = SimilarityIndex.build(matrix, ids, kind="text", factory="Flat", use_gpu=False)
    return built, matrix, ids, clean


def test_index_quality_metrics_on_separated_clusters(indexed) -> None:
    built, vectors, ids, _ = indexed
    metrics = index_quality_metrics(built, vectors, ids, eval_k=[1, 4])
    assert metrics["precision_at_1"] == 1.0 and metrics["precision_at_4"] == 1.0  # own product excluded, 4 same-class others
    assert "recall_at_10_vs_exact" not in metrics  # a Flat index is exact
    assert any(key.startswith("latency_") for key in metrics)
    assert all("@" not in key for key in metrics)  # MLflow-safe names
    assert index_quality_metrics(built, vectors, ids.assign(split="train"), eval_k=[1]) == {}  # no test query


def test_neighbour_figure_draws_test_queries(indexed, tmp_path: Path) -> None:
    built, vectors, ids, clean = indexed
    out = neighbour_figure(built, vectors, ids, clean, tmp_path / "plots" / "text_neighbours.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["text_neighbours.png"]  # written whole, no temporary left
    assert neighbour_figure(built, vectors, ids.assign(split="train"), clean, tmp_path / "none.png") is None
