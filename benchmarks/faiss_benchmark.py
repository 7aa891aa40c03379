"""FAISS alone: build time, speed, recall and memory of Flat / IVF / HNSW against a NumPy baseline.

Why synthetic data: the marketplace has ~8k photos, far too few to see how an
index scales; and uniform noise would make every approximate index look bad
(no neighbourhood structure). So the vectors come from a Gaussian mixture:
``n / --points-per-cluster`` centres and the noise around them both have a
per-dimension std decaying as ``(j + 1) ** -0.5`` (a power-law spectrum, i.e.
a lower intrinsic dimension, as learned embeddings have; neighbouring clusters
overlap), L2-normalised, searched by cosine like the pipeline's indexes.
Queries are fresh draws from the same mixture. With the defaults (spread 1.0)
a query's nearest neighbour has cosine ~0.70, its 10th ~0.62, a random pair ~0.

For every size: exact ground truth from the Flat index; per method the build
time (through ``pipeline_steps.index.build_index``, so including the
normalisation copy and, for IVF, k-means training), the serialised index size,
recall@k vs exact, batch QPS (all queries in one call) and single-query
latency (one call per query). The NumPy baseline is ``queries @ X.T`` +
``argpartition`` (in chunks of 64 queries to bound memory).

Single-query timing is time-boxed: a probe of 5 queries estimates the cost,
then at most ``--single-budget-s`` seconds are spent (at least 20 queries), so
1M-vector runs finish; the number of single queries timed is reported. Single
queries run with ``--single-threads`` OpenMP threads (default 1, what a service
answering one request per call should use: on a busy 2-core machine a 2-thread
Flat search of one query at 100k vectors took ~64 ms against ~7.5 ms with one
thread — OpenMP threads wait on each other); batches use all threads.

    python benchmarks/faiss_benchmark.py --sizes 10000 100000 1000000 --dim 256 --queries 1000 \\
        --out reports/faiss_benchmark.json --update-markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline_steps.index import build_index, normalise_rows  # noqa: E402
from pipeline_steps.retrieval import limited_threads, recall_from_rows  # noqa: E402

SECTION_HEADING = "## FAISS alone"
NUMPY_CHUNK = 64


# --------------------------------------------------------------------------- data


def power_law(dim: int) -> np.ndarray:
    """Per-dimension std ``(j + 1) ** -0.5``: most variance in few directions, like real embeddings."""
    return (np.arange(dim, dtype=np.float32) + 1.0) ** -0.5


def gaussian_mixture(
    n: int, dim: int, centres: np.ndarray, rng: np.random.Generator, spread: float, chunk: int = 100_000
) -> np.ndarray:
    """``n`` L2-normalised float32 points around random ``centres``, built in chunks to bound memory."""
    scales = (spread * power_law(dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        assign = rng.integers(0, len(centres), size=stop - start)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32) * scales
        block += centres[assign]
        out[start:stop] = block
    return normalise_rows(out)


# --------------------------------------------------------------------------- measuring


def numpy_search(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k by inner product with plain NumPy: matrix product + argpartition + sort of the k."""
    rows = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), NUMPY_CHUNK):
        scores = queries[start : start + NUMPY_CHUNK] @ data.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        rows[start : start + NUMPY_CHUNK] = np.take_along_axis(top, order, axis=1)
    return rows


def time_search(
    search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, single_budget_s: float, single_threads: int = 1
) -> tuple[np.ndarray, dict[str, float]]:
    """Batch QPS (one call, all queries, all threads) and time-boxed single-query latency of ``search``."""
    search(queries[:1])  # warm-up
    start = time.perf_counter()
    rows = search(queries)
    batch_s = time.perf_counter() - start

    with limited_threads(single_threads):
        single = _time_single(search, queries, single_budget_s)
    return rows, {"qps_batch": len(queries) / batch_s, **single}


def _time_single(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, budget_s: float) -> dict[str, float]:

    probe = [time.perf_counter()]
    for i in range(5):
        search(queries[i : i + 1])
        probe.append(time.perf_counter())
    per_query = max((probe[-1] - probe[0]) / 5, 1e-6)
    n_single = int(min(len(queries), max(20, budget_s / per_query)))
    times = np.empty(n_single)
    for i in range(n_single):
        t0 = time.perf_counter()
        search(queries[i : i + 1])
        times[i] = time.perf_counter() - t0
    return {
        "qps_single": n_single / times.sum(),
        "p50_ms": float(np.percentile(times, 50) * 1000),
        "p99_ms": float(np.percentile(times, 99) * 1000),
        "n_single": n_single,
    }


def index_bytes(index: faiss.Index) -> int:
    """Size of the serialised index: a close proxy for its RAM (vectors + graph/lists)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


# --------------------------------------------------------------------------- one size


def run_size(n: int, args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed + n)
    n_clusters = max(1, n // args.points_per_cluster)
    centres = rng.standard_normal((n_clusters, args.dim), dtype=np.float32) * power_law(args.dim)
    t0 = time.perf_counter()
    data = gaussian_mixture(n, args.dim, centres, rng, args.spread)
    queries = gaussian_mixture(args.queries, args.dim, centres, rng, args.spread)
    log(f"n={n}: data generated in {time.perf_counter() - t0:.1f}s")
    k = args.k
    results: list[dict[str, Any]] = []

    def record(method: str, params: str, build_s: float, size_b: int, rows: np.ndarray, timing: dict[str, float],
               truth: np.ndarray) -> None:
        row = {"n": n, "dim": args.dim, "method": method, "params": params, "build_s": build_s,
               "size_mb": size_b / 2**20, "recall_at_k": recall_from_rows(rows, truth), "k": k, **timing}
        results.append(row)
        log(f"  {method:<6} {params:<14} build {build_s:7.2f}s  size {row['size_mb']:8.1f}MB  "
            f"recall@{k} {row['recall_at_k']:.4f}  QPS batch {timing['qps_batch']:9.1f}  "
            f"single {timing['qps_single']:8.1f}  p50 {timing['p50_ms']:.3f}ms  p99 {timing['p99_ms']:.3f}ms  "
            f"(single n={timing['n_single']})")

    # Exact FAISS first: its answers are the ground truth for everything else.
    t0 = time.perf_counter()
    flat = build_index(data, "Flat", use_gpu=False)
    build_s = time.perf_counter() - t0
    truth, timing = time_search(lambda q: flat.search(q, k)[1], queries, args.single_budget_s, args.single_threads)
    record("Flat", "-", build_s, index_bytes(flat), truth, timing, truth)
    del flat
    gc.collect()

    if "NumPy" in args.methods:
        _numpy_baseline(data, queries, truth, args, record)
    if "IVF" in args.methods:
        _ivf(data, queries, truth, n, args, record)
    if "HNSW" in args.methods:
        _hnsw(data, queries, truth, args, record)
    del data, queries
    gc.collect()
    return results


def _numpy_baseline(data: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace,
                    record: Callable[..., None]) -> None:
    """Plain NumPy: "building" is the normalised copy the matrix product needs."""
    k = args.k
    t0 = time.perf_counter()
    matrix = normalise_rows(data)
    build_s = time.perf_counter() - t0
    rows, timing = time_search(lambda q: numpy_search(matrix, q, k), queries, args.single_budget_s, args.single_threads)
    record("NumPy", "matmul+argpart", build_s, matrix.nbytes, rows, timing, truth)
    del matrix
    gc.collect()


def _ivf(data: np.ndarray, queries: np.ndarray, truth: np.ndarray, n: int, args: argparse.Namespace,
         record: Callable[..., None]) -> None:
    k = args.k
    nlist = max(1, round(4 * math.sqrt(n)))
    factory = f"IVF{nlist},Flat"
    t0 = time.perf_counter()
    ivf = build_index(data, factory, use_gpu=False, max_train_points=args.ivf_train_per_list * nlist, seed=args.seed)
    build_s = time.perf_counter() - t0
    size_b = index_bytes(ivf)
    ivf_impl = faiss.extract_index_ivf(ivf)
    for nprobe in args.nprobe:
        ivf_impl.nprobe = min(nprobe, ivf_impl.nlist)
        rows, timing = time_search(lambda q: ivf.search(q, k)[1], queries, args.single_budget_s, args.single_threads)
        record("IVF", f"nlist={ivf_impl.nlist} nprobe={nprobe}", build_s, size_b, rows, timing, truth)
    del ivf, ivf_impl
    gc.collect()


def _hnsw(data: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace,
          record: Callable[..., None]) -> None:
    k = args.k
    factory = f"HNSW{args.hnsw_m}"
    t0 = time.perf_counter()
    hnsw = build_index(data, factory, use_gpu=False)
    build_s = time.perf_counter() - t0
    size_b = index_bytes(hnsw)
    hnsw_impl = faiss.downcast_index(hnsw)
    for ef in args.ef_search:
        hnsw_impl.hnsw.efSearch = ef
        rows, timing = time_search(lambda q: hnsw.search(q, k)[1], queries, args.single_budget_s, args.single_threads)
        record(factory, f"efSearch={ef}", build_s, size_b, rows, timing, truth)
    del hnsw, hnsw_impl
    gc.collect()


# --------------------------------------------------------------------------- reporting


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "gpus_seen_by_faiss": faiss.get_num_gpus(),
        "faiss_version": faiss.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
    }


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    a = report["args"]
    lines = [
        SECTION_HEADING,
        "",
        f"Date: {report['date']}. Machine: {m['cpu']}, {m['cores']} cores ({m['faiss_threads']} FAISS threads), "
        f"no GPU (faiss sees {m['gpus_seen_by_faiss']}); faiss {m['faiss_version']}, numpy {m['numpy_version']}, "
        f"Python {m['python']}.",
        "",
        "Command:",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"Data: {a['dim']}-d Gaussian mixture (n/{a['points_per_cluster']} centres; centres and noise with a "
        f"power-law spectrum, noise spread {a['spread']}), "
        f"L2-normalised, cosine/inner product; {a['queries']} fresh queries from the same mixture; k={a['k']}. "
        f"Recall@{a['k']} is against exact Flat search. Build time goes through `build_index` "
        f"(normalised copy + training + add); IVF k-means trains on at most {a['ivf_train_per_list']} points per list. "
        "Size = serialised index (NumPy: the matrix). QPS batch = all queries in one call; "
        f"single = one call per query with {a['single_threads']} thread(s) (time-boxed; `n single` "
        "queries timed). p50/p99 are single-query latencies.",
        "",
        f"| n | method | params | build s | size MB | recall@{a['k']} | QPS batch | QPS single | p50 ms | p99 ms | n single |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['n']:,} | {r['method']} | {r['params']} | {r['build_s']:.2f} | {r['size_mb']:.1f} | "
            f"{r['recall_at_k']:.3f} | {r['qps_batch']:,.0f} | {r['qps_single']:,.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['n_single']} |"
        )
    if report.get("notes"):
        lines += ["", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, section: str) -> None:
    """Replace the "## FAISS alone" section of ``path`` (up to the next ``## ``), or append it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from markdown_report import replace_section  # benchmarks/markdown_report.py

    replace_section(path, SECTION_HEADING, section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--points-per-cluster", type=int, default=100, help="n / this = Gaussian mixture centres")
    parser.add_argument("--spread", type=float, default=1.0, help="noise scale relative to the centres' spread")
    parser.add_argument("--methods", nargs="+", choices=["NumPy", "IVF", "HNSW"], default=["NumPy", "IVF", "HNSW"],
                        help="what to compare with Flat (Flat always runs: it is the ground truth)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ivf-train-per-list", type=int, default=64,
                        help="k-means training sample: at most this many points per IVF list")
    parser.add_argument("--single-budget-s", type=float, default=10.0,
                        help="seconds spent timing single queries per method/setting (at least 20 queries)")
    parser.add_argument("--single-threads", type=int, default=1, help="OpenMP threads for single-query timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="write the report here: .json -> JSON, anything else -> the markdown section")
    parser.add_argument("--update-markdown", type=Path, default=None,
                        help="replace/append the '## FAISS alone' section of this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--note", action="append", default=[], help="a line added under the table")
    parser.add_argument("--render", type=Path, default=None,
                        help="no benchmarking: render this JSON report (from --out x.json) as markdown "
                             "(to --update-markdown, else stdout); --note lines are added")
    args = parser.parse_args(argv)

    if args.render is not None:
        report = json.loads(args.render.read_text(encoding="utf-8"))
        report["notes"] = [*report.get("notes", []), *args.note]
        if args.update_markdown is not None:
            update_markdown(args.update_markdown, to_markdown(report))
        else:
            print(to_markdown(report))
        return 0

    logging.basicConfig(level=logging.WARNING)
    command = "python benchmarks/faiss_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine_description(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [],
        "notes": list(args.note),
    }

    def log(message: str) -> None:
        print(message, flush=True)

    def write() -> None:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            payload = json.dumps(report, indent=2) if args.out.suffix == ".json" else to_markdown(report)
            args.out.write_text(payload, encoding="utf-8")
        if args.update_markdown is not None:
            update_markdown(args.update_markdown, to_markdown(report))

    log(json.dumps(report["machine"]))
    for n in args.sizes:
        t0 = time.perf_counter()
        report["results"].extend(run_size(n, args, log))
        log(f"n={n}: done in {time.perf_counter() - t0:.0f}s")
        write()  # after every size, so a long 1M run that is stopped keeps the smaller sizes
    if args.out is None and args.update_markdown is None:
        print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
