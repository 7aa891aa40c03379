"""Text-search latency of the ranked service vs today's dense-only ranking, measured in one run.

    nice -n 5 .venv/bin/python benchmarks/ranking_latency.py --bundle /tmp/real11/bundle \\
        --out reports/ranking_latency.json -n 1500 -c 16 --rounds 2

Serves the bundle twice with benchmarks/load_test.py (`--serve-bundle`, text /search only, 16
concurrent clients): as packaged (hybrid BM25 + dense candidates, category re-ranking) and as a copy
without the `index/<kind>/ranking/` folders, which the service serves dense-only, i.e. the plain cosine
neighbours of one embedding as before this ranking existed. The two alternate `--rounds` times so both
see the same (shared, noisy) machine; the JSON holds every round and the ratio of the median p99s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def dense_only_copy(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    for ranking in target.glob("index/*/ranking"):
        shutil.rmtree(ranking)
    return target


def run(bundle: Path, out: Path, n: int, c: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--serve-bundle", str(bundle), "--bundle", str(bundle),
           "-n", str(n), "-c", str(c), "--mix", "search=1", "--in-process", "0", "--json-out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-1500:], proc.stderr[-1500:] if proc.returncode else "", flush=True)
    if proc.returncode:
        raise SystemExit(f"load_test failed ({proc.returncode})")
    return json.loads(out.read_text())


def ranking_step_latency(bundle: Path, dense: Path, n: int) -> dict:
    """The ranking step alone, in-process: the same (probabilities, embedding) of n text queries ranked by
    the packaged ranking and by the dense-only copy (no model call, no HTTP: what the ranking adds)."""
    import time

    import numpy as np

    from benchmarks.load_test import DEFAULT_QUERIES
    from service.engine import MarketplaceEngine

    engines = {"dense-only (before)": MarketplaceEngine(dense), "hybrid + category (now)": MarketplaceEngine(bundle)}
    first = engines["hybrid + category (now)"]
    queries = [DEFAULT_QUERIES[i % len(DEFAULT_QUERIES)] + ("" if i < len(DEFAULT_QUERIES) else f" {i}") for i in range(n)]
    inputs = first.predict_embed_batch("text", [(None, q) for q in queries])
    out = {}
    for name, engine in engines.items():
        times = []
        for (proba, vector), text in zip(inputs, queries):
            start = time.perf_counter()
            engine.search_vector("text", vector, 10, None, proba, text)
            times.append((time.perf_counter() - start) * 1000)
        out[name] = {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3),
                     "queries": n}
    return out


def markdown(payload: dict) -> str:
    """BENCHMARKS.md's table for one saved run (regenerated with --render, never typed)."""
    lines = [f"`{payload['command']}` ({payload.get('generated_at', '?')}; bundle: {payload.get('bundle', 'see command')})", "",
             "| ranking | p50 ms (rounds) | p99 ms (rounds) | median p99 ms | median req/s |", "|---|---|---|---:|---:|"]
    for name, entry in payload["summary"].items():
        p50 = " / ".join(f"{r['p50_ms']:,.0f}" for r in entry["rounds"])
        p99 = " / ".join(f"{r['p99_ms']:,.0f}" for r in entry["rounds"])
        lines.append(f"| {name} | {p50} | {p99} | {entry['median_p99_ms']:,.0f} | {entry['median_rps']:.1f} |")
    lines += ["", f"Median p99 ratio (now / before): **{payload['p99_ratio']}** (target ≤ 1.5)."]
    step = payload.get("ranking_step_in_process")
    if step:
        parts = [f"{name}: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms" for name, v in step.items() if isinstance(v, dict)]
        lines += ["", f"The ranking step alone, in-process on the same query embeddings (`{step['command']}`): " + "; ".join(parts) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "ranking_latency.json")
    parser.add_argument("-n", type=int, default=1500)
    parser.add_argument("-c", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--step-only", type=int, default=0, metavar="N",
                        help="only time the ranking step in-process on N queries and add it to --out")
    parser.add_argument("--render", action="store_true", help="only render --out as Markdown")
    parser.add_argument("--update-markdown", type=Path, default=None,
                        help="replace the <!-- ranking_latency:start/end --> block of this file with the table")
    args = parser.parse_args(argv)
    if args.render:
        text = markdown(json.loads(args.out.read_text()))
        if args.update_markdown is not None:
            from benchmarks.markdown_report import replace_block

            replace_block(args.update_markdown, "ranking_latency", text)
        print(text)
        return 0
    if args.step_only:
        with tempfile.TemporaryDirectory(prefix="ranking_latency_") as tmp:
            step = ranking_step_latency(args.bundle, dense_only_copy(args.bundle, Path(tmp) / "dense_bundle"), args.step_only)
        payload = json.loads(args.out.read_text()) if args.out.is_file() else {}
        payload["ranking_step_in_process"] = step | {"command": "python benchmarks/ranking_latency.py " + " ".join(
            argv if argv is not None else sys.argv[1:])}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(json.dumps(step, indent=1))
        return 0
    rounds: dict[str, list[dict]] = {"dense-only (before)": [], "hybrid + category (now)": []}
    with tempfile.TemporaryDirectory(prefix="ranking_latency_") as tmp:
        dense = dense_only_copy(args.bundle, Path(tmp) / "dense_bundle")
        for r in range(args.rounds):
            for name, bundle in (("dense-only (before)", dense), ("hybrid + category (now)", args.bundle)):
                result = run(bundle, Path(tmp) / f"{r}-{name[:5]}.json", args.n, args.c)
                overall = result["http"]["overall"]
                rounds[name].append({"p50_ms": overall["latency_2xx"]["p50_ms"], "p99_ms": overall["latency_2xx"]["p99_ms"],
                                     "rps": overall["rps"], "status_2xx": overall["status_2xx"],
                                     "requests": overall["requests"]})
    summary = {name: {"median_p50_ms": statistics.median(x["p50_ms"] for x in rs),
                      "median_p99_ms": statistics.median(x["p99_ms"] for x in rs),
                      "median_rps": statistics.median(x["rps"] for x in rs), "rounds": rs}
               for name, rs in rounds.items()}
    before, now = summary["dense-only (before)"], summary["hybrid + category (now)"]
    payload = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/ranking_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"requests": args.n, "concurrency": args.c, "rounds": args.rounds, "endpoint": "search (text)"},
        "summary": summary,
        "p99_ratio": round(now["median_p99_ms"] / before["median_p99_ms"], 3) if before["median_p99_ms"] else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({k: {kk: v[kk] for kk in ("median_p50_ms", "median_p99_ms", "median_rps")} for k, v in summary.items()}
                     | {"p99_ratio": payload["p99_ratio"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
