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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "ranking_latency.json")
    parser.add_argument("-n", type=int, default=1500)
    parser.add_argument("-c", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    rounds: dict[str, list[dict]] = {"dense-only (before)": [], "hybrid + category (now)": []}
    with tempfile.TemporaryDirectory(prefix="ranking_latency_") as tmp:
        dense = dense_only_copy(args.bundle, Path(tmp) / "dense_bundle")
        for r in range(args.rounds):
            for name, bundle in (("dense-only (before)", dense), ("hybrid + category (now)", args.bundle)):
                result = run(bundle, Path(tmp) / f"{r}-{name[:5]}.json", args.n, args.c)
                overall = result["http"]["overall"]
                rounds[name].append({"p50_ms": overall["latency"]["p50_ms"], "p99_ms": overall["latency"]["p99_ms"],
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
