"""Tests for pipeline_steps.retrieval: precision@k by hand, recall vs exact, latency numbers."""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import pytest

from pipeline_steps.index import SimilarityIndex, normalise_rows
from pipeline_steps.retrieval import precision_at_k, query_latency, recall_at_k_vs_exact, recall_from_rows


def toy() -> tuple[SimilarityIndex, np.ndarray]:
    """Six photos of four products on the unit circle, so every ranking can be worked out by hand.

    angle:    0     0.1   0.25  0.45  0.7   1.0
    photo:    a1    a2    b1    c1    c2    d1
    product:  A     A     B     C     C     D
    category: cars  cars  cars  home  home  home
    """
    angles = np.array([0.0, 0.1, 0.25, 0.45, 0.7, 1.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    ids = pd.DataFrame({
        "product_id": ["A", "A", "B", "C", "C", "D"],
        "image_id": ["a1", "a2", "b1", "c1", "c2", "d1"],
        "category": ["cars", "cars", "cars", "home", "home", "home"],
    })
    return SimilarityIndex.build(x, ids, kind="image", factory="Flat", use_gpu=False), x


def test_precision_at_k_matches_hand_computation():
    index, x = toy()
    # query a1 (cars), A excluded -> b1 c1 c2 d1            = cars home home home -> P@1 1, P@3 1/3, P@5 1/5
    # query d1 (home), D excluded -> c2 c1 b1 a2 a1         = home home cars cars cars -> 1, 2/3, 2/5
    # query b1 (cars), B excluded -> a2 c1 a1 c2 d1         = cars home cars home home -> 1, 2/3, 2/5
    queries = x[[0, 5, 2]]
    result = precision_at_k(index, queries, ["A", "D", "B"], ["cars", "home", "cars"], "category", ks=(1, 3, 5))
    assert result == pytest.approx({"precision@1": 1.0, "precision@3": 5 / 9, "precision@5": 1 / 3})
    # label_of_row as an array gives the same numbers
    same = precision_at_k(index, queries, ["A", "D", "B"], ["cars", "home", "cars"],
                          index.ids["category"].to_numpy(), ks=(1, 3, 5))
    assert same == result


def test_precision_excludes_own_product_and_counts_missing_hits_as_misses():
    index, x = toy()
    # Without exclusion a1 would find itself and a2 first; with it, and only 4 other photos, P@10 = 1/10.
    result = precision_at_k(index, x[:1], ["A"], ["cars"], "category", ks=(10,))
    assert result["precision@10"] == pytest.approx(1 / 10)
    # unique_products: b1, c1, d1 -> cars home home
    result = precision_at_k(index, x[:1], ["A"], ["cars"], "category", ks=(1, 3), unique_products=True)
    assert result == pytest.approx({"precision@1": 1.0, "precision@3": 1 / 3})
    with pytest.raises(ValueError, match="lengths must match"):
        precision_at_k(index, x[:2], ["A"], ["cars"], "category")


def test_recall_vs_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 16)).astype(np.float32)
    ids = pd.DataFrame({"product_id": range(1000)})
    exact = SimilarityIndex.build(x, ids, kind="text", factory="Flat", use_gpu=False)
    assert recall_at_k_vs_exact(exact, exact, x[:50], k=10) == 1.0
    # Bare faiss indexes work too (queries passed as given).
    flat = faiss.IndexFlatIP(16)
    flat.add(normalise_rows(x))
    assert recall_at_k_vs_exact(flat, exact, normalise_rows(x[:50]), k=10) == pytest.approx(1.0)
    # An IVF index probing 1 of 16 lists on unclustered data loses neighbours: recall < 1.
    ivf = SimilarityIndex.build(x, ids, kind="text", factory="IVF16,Flat", nprobe=1, use_gpu=False)
    assert 0.0 < recall_at_k_vs_exact(ivf, exact, x[:50], k=10) < 1.0


def test_recall_from_rows_by_hand():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    approx = np.array([[0, 1, 9, -1], [7, 6, 5, 4]])
    assert recall_from_rows(approx, exact) == pytest.approx((2 / 4 + 1.0) / 2)


def test_query_latency_reports_sane_numbers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 32)).astype(np.float32)
    index = SimilarityIndex.build(x, pd.DataFrame({"product_id": range(2000)}), kind="text", use_gpu=False)
    stats = query_latency(index, x[:50], k=10)
    assert {"p50_ms", "p99_ms", "qps_single", "qps_batch"} <= set(stats)
    assert 0 < stats["p50_ms"] <= stats["p99_ms"]
    assert stats["qps_single"] > 0 and stats["qps_batch"] > 0
    capped = query_latency(index.index, normalise_rows(x[:50]), k=10, max_single=5)
    assert capped["n_single"] == 5 and capped["n_batch"] == 50


def test_limited_threads_restores_the_previous_setting():
    from pipeline_steps.retrieval import limited_threads

    before = faiss.omp_get_max_threads()
    with limited_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before
    with limited_threads(None):
        assert faiss.omp_get_max_threads() == before


def test_benchmark_script_smoke(tmp_path):
    """The FAISS benchmark runs end to end on a tiny size and rewrites only its own BENCHMARKS.md section."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "faiss_benchmark.py"
    spec = importlib.util.spec_from_file_location("faiss_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## FAISS alone\nold\n\n## Service\nkeep me\n")
    out = tmp_path / "r.json"
    args = ["--sizes", "2000", "--dim", "16", "--queries", "30", "--single-budget-s", "0.05",
            "--points-per-cluster", "50", "--out", str(out), "--update-markdown", str(md)]
    assert module.main(args) == 0
    report = json.loads(out.read_text())
    methods = {r["method"] for r in report["results"]}
    assert methods == {"Flat", "NumPy", "IVF", "HNSW32"}
    assert all(r["recall_at_k"] > 0.8 for r in report["results"])
    text = md.read_text()
    assert "old" not in text and "## Service\nkeep me" in text and "| 2,000 | Flat |" in text
