"""FAISS at a million listings: index.factory choices for 1M+ vectors on 2 cores, and sharded indexes.

Same data, queries and timing as ``benchmarks/faiss_benchmark.py`` (a 256-d power-law Gaussian
mixture, L2-normalised, cosine = inner product, recall@k against exact Flat search, single-query
latency with one OpenMP thread, time-boxed), but for factory strings the pipeline can use as
``index.factory`` at 1M vectors, each with a grid of search settings:

- ``HNSW32`` (the baseline of the issue: efSearch=128 gave recall 0.929 at 979 QPS);
- ``PCA{d},HNSW{M},RFlat``: the HNSW graph is built and searched on a ``d``-dim PCA projection
  (``d``/256 of the distance cost; learned embeddings, like this data, have most of their variance
  in few directions), and the ``k_factor_rf`` x k candidates it returns are re-ranked exactly on the
  full vectors (``IndexRefineFlat``). The knobs: ``efSearch`` and ``k_factor_rf``
  (``params.yaml: index.ef_search``, ``index.k_factor``).
- ``IndexShards``: the same factory built as ``--shards`` independent indexes over disjoint slices
  of the vectors (what each machine would hold when one machine's memory is not enough), searched
  together by ``faiss.IndexShards`` (results merged by score); recall/QPS of the merged search.

The index is built with ``efConstruction`` = ``--ef-construction`` (FAISS default 40); the PCA is
trained on ``--train`` vectors. Build time (train + add) and the serialised size (≈ RAM) are
reported; peak RSS of the process is in the JSON.

    nice -n 5 python benchmarks/faiss_million.py --n 1000000 --out reports/faiss_million.json \\
        --update-markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from faiss_benchmark import gaussian_mixture, index_bytes, machine_description, power_law, time_search  # noqa: E402

from pipeline_steps.index import set_search_params  # noqa: E402
from pipeline_steps.retrieval import recall_from_rows  # noqa: E402

SECTION_HEADING = "## FAISS at a million vectors"
TARGET_QPS = 1000.0
TARGET_RECALL = 0.95


def build(data: np.ndarray, factory: str, ef_construction: int, n_train: int, seed: int) -> faiss.Index:
    """index_factory(dim, factory, IP); efConstruction on every HNSW inside; train on a sample; add."""
    index = faiss.index_factory(data.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    for sub in _walk(index):
        if isinstance(sub, faiss.IndexHNSW):
            sub.hnsw.efConstruction = ef_construction
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = data[np.sort(rng.choice(len(data), size=min(n_train, len(data)), replace=False))]
        index.train(sample)
    index.add(data)
    return index


def _walk(index: faiss.Index) -> list[faiss.Index]:
    """The index and the indexes it wraps (IndexRefine base, IndexPreTransform inner index)."""
    found = []
    current = faiss.downcast_index(index)
    while current is not None:
        found.append(current)
        inner = None
        if isinstance(current, faiss.IndexRefine):
            inner = current.base_index
        elif isinstance(current, faiss.IndexPreTransform):
            inner = current.index
        current = faiss.downcast_index(inner) if inner is not None else None
    return found


def set_params(index: faiss.Index, ef: int, k_factor: int | None) -> None:
    set_search_params(index, ef_search=ef)
    if k_factor is not None:
        faiss.ParameterSpace().set_index_parameter(index, "k_factor_rf", int(k_factor))


def run(args: argparse.Namespace, log: Any, report: dict[str, Any], write: Any) -> None:
    n = args.n
    rng = np.random.default_rng(args.seed + n)  # same data as faiss_benchmark.py for this n and seed
    n_clusters = max(1, n // args.points_per_cluster)
    centres = rng.standard_normal((n_clusters, args.dim), dtype=np.float32) * power_law(args.dim)
    data = gaussian_mixture(n, args.dim, centres, rng, args.spread)
    queries = gaussian_mixture(args.queries, args.dim, centres, rng, args.spread)
    k = args.k
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(data)
    t0 = time.perf_counter()
    truth = flat.search(queries, k)[1]
    log(f"n={n}: exact ground truth in {time.perf_counter() - t0:.1f}s")
    del flat
    gc.collect()

    def record(factory: str, params: str, build_s: float, size_b: int, rows: np.ndarray, timing: dict[str, float],
               shards: int = 1) -> None:
        row = {"n": n, "dim": args.dim, "factory": factory, "shards": shards, "params": params, "build_s": build_s,
               "size_mb": size_b / 2**20, "recall_at_k": recall_from_rows(rows, truth), "k": k,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **timing}
        row["meets_target"] = bool(row["recall_at_k"] >= TARGET_RECALL and row["qps_single"] >= TARGET_QPS)
        report["results"].append(row)
        log(f"  {factory:<24} x{shards} {params:<22} build {build_s:7.1f}s size {row['size_mb']:7.1f}MB "
            f"recall@{k} {row['recall_at_k']:.4f} QPS batch {timing['qps_batch']:8.0f} single {timing['qps_single']:7.0f} "
            f"p50 {timing['p50_ms']:.2f}ms p99 {timing['p99_ms']:.2f}ms {'TARGET MET' if row['meets_target'] else ''}")
        write()

    for factory in args.factories:
        cached = None
        if args.index_cache is not None:  # a built index is kept, so searches can be re-timed on a quieter machine
            name = re.sub(r"[^A-Za-z0-9]+", "_", factory)
            cached = args.index_cache / f"{name}-efc{args.ef_construction}-n{n}-d{args.dim}-seed{args.seed}.faiss"
        if cached is not None and cached.is_file():
            index = faiss.read_index(str(cached))
            build_s = float(json.loads(cached.with_suffix(".json").read_text())["build_s"])
            log(f"{factory}: read from {cached} (built in {build_s:.1f}s)")
        else:
            t0 = time.perf_counter()
            index = build(data, factory, args.ef_construction, args.train, args.seed)
            build_s = time.perf_counter() - t0
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                faiss.write_index(index, str(cached))
                cached.with_suffix(".json").write_text(json.dumps({"build_s": build_s}))
        size_b = index_bytes(index)
        log(f"{factory}: built in {build_s:.1f}s ({size_b / 2**20:.0f} MB)")
        refine = any(isinstance(sub, faiss.IndexRefine) for sub in _walk(index))
        for ef in args.ef_search:
            for k_factor in (args.k_factor if refine else [None]):
                if k_factor is not None and k * k_factor > ef:
                    continue  # HNSW returns at most efSearch candidates
                set_params(index, ef, k_factor)
                rows, timing = time_search(lambda q: index.search(q, k)[1], queries, args.single_budget_s, 1)
                label = f"efSearch={ef}" + (f" k_factor={k_factor}" if k_factor is not None else "")
                record(factory, label, build_s, size_b, rows, timing)
        del index
        gc.collect()

    if args.shards > 1 and args.shard_factory:
        factory = args.shard_factory
        t0 = time.perf_counter()
        shards = faiss.IndexShards(args.dim, True, True)  # threaded, successive ids
        parts = []
        for part in np.array_split(np.arange(n), args.shards):
            parts.append(build(data[part], factory, args.ef_construction, args.train // args.shards, args.seed))
            shards.add_shard(parts[-1])
        build_s = time.perf_counter() - t0
        size_b = sum(index_bytes(p) for p in parts)
        for ef in args.shard_ef_search:
            for p in parts:
                set_params(p, ef, args.shard_k_factor)
            rows, timing = time_search(lambda q: shards.search(q, k)[1], queries, args.single_budget_s, 1)
            record(factory, f"efSearch={ef} k_factor={args.shard_k_factor}", build_s, size_b, rows, timing,
                   shards=args.shards)


def to_markdown(report: dict[str, Any]) -> str:
    m, a = report["machine"], report["args"]
    lines = [
        SECTION_HEADING, "",
        f"Date: {report['date']}. Machine: {m['cpu']}, {m['cores']} cores ({m['faiss_threads']} FAISS threads), "
        f"faiss sees {m['gpus_seen_by_faiss']} GPU; faiss {m['faiss_version']}. Target: recall@{a['k']} ≥ {TARGET_RECALL} "
        f"at ≥ {TARGET_QPS:,.0f} single-query QPS (1 thread) on {a['n']:,} × {a['dim']} vectors.", "",
        "Command:", "", "```", report["command"], "```", "",
        f"Data and timing as in \"FAISS alone\" (same generator and seed; {a['queries']} queries, recall against exact "
        f"search). efConstruction={a['ef_construction']}; PCA trained on {a['train']:,} vectors. Build = train + add "
        "(both cores). Size = serialised index ≈ its RAM. `xN` = N shards in one `faiss.IndexShards`.", "",
        f"| factory | shards | params | build s | size MB | recall@{a['k']} | QPS batch | QPS single | p50 ms | p99 ms | target |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| `{r['factory']}` | {r['shards']} | {r['params']} | {r['build_s']:.0f} | {r['size_mb']:.0f} | "
            f"{r['recall_at_k']:.3f} | {r['qps_batch']:,.0f} | {r['qps_single']:,.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {'**met**' if r['meets_target'] else '-'} |"
        )
    if report.get("notes"):
        lines += ["", *[f"- {note}" for note in report["notes"]]]
    for earlier in report.get("earlier", []):
        table = to_markdown({**earlier, "notes": [], "earlier": []}).split("\n")
        start = next(i for i, line in enumerate(table) if line.startswith("| factory"))
        ea = earlier["args"]
        lines += ["", f"Run ({earlier['date']}, efConstruction={ea['ef_construction']}):", "", "```",
                  earlier["command"], "```", "", *[line for line in table[start:] if line]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--points-per-cluster", type=int, default=100)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--factories", nargs="+", default=["PCA64,HNSW32,RFlat"])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--k-factor", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--train", type=int, default=100_000, help="vectors the PCA (or IVF/PQ) trains on")
    parser.add_argument("--shards", type=int, default=0, help="also build --shard-factory as this many shards")
    parser.add_argument("--shard-factory", default="PCA64,HNSW32,RFlat")
    parser.add_argument("--shard-ef-search", type=int, nargs="+", default=[128])
    parser.add_argument("--shard-k-factor", type=int, default=4)
    parser.add_argument("--single-budget-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--index-cache", type=Path, default=None,
                        help="keep each built index here (keyed by factory, efConstruction, n, dim, seed) and reuse it")
    parser.add_argument("--update-markdown", type=Path, default=None)
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--render", type=Path, default=None, help="only render this JSON report as markdown")
    parser.add_argument("--also", type=Path, nargs="*", default=[],
                        help="with --render: earlier runs' JSON reports, added under 'Earlier runs' (command + table)")
    args = parser.parse_args(argv)

    def update(report: dict[str, Any]) -> None:
        if args.update_markdown is not None:
            from markdown_report import replace_section

            replace_section(args.update_markdown, SECTION_HEADING, to_markdown(report))

    if args.render is not None:
        report = json.loads(args.render.read_text(encoding="utf-8"))
        report["notes"] = [*report.get("notes", []), *args.note]
        report["earlier"] = [json.loads(path.read_text(encoding="utf-8")) for path in args.also]
        update(report) if args.update_markdown else print(to_markdown(report))
        return 0

    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/faiss_million.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_description(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [],
        "notes": list(args.note),
    }

    def write() -> None:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        update(report)

    def log(message: str) -> None:
        print(message, flush=True)

    log(json.dumps(report["machine"]))
    run(args, log, report, write)
    write()
    if args.out is None and args.update_markdown is None:
        print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
