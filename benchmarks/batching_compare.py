"""The service's micro-batcher vs BentoML's own adaptive batching on the text search benchmark.

Serves the same bundle two ways, alternating, each round: `service.service:MarketplaceSearch`
(service.batching.MicroBatcher in front of the model) and `benchmarks.batchable_variant:BatchableSearch`
(the model behind a `@bentoml.api(batchable=True)` service reached through `bentoml.depends`), and
runs benchmarks/load_test.py on each with 1 and 16 clients (text /search only). Prints a Markdown
table (median of the rounds) and writes every run's numbers as JSON.

    python benchmarks/batching_compare.py --bundle artifacts/bundle --out benchmarks/results/batching_compare.json
    python benchmarks/batching_compare.py --tiny ...     # the tests' tiny bundle (built once, cached)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = {
    "micro-batcher (service/batching.py)": "service.service:MarketplaceSearch",
    "BentoML batchable + depends": "benchmarks.batchable_variant:BatchableSearch",
}


def run_one(url: str, bundle: Path, requests: int, clients: int, out: Path) -> dict[str, Any]:
    from benchmarks import load_test

    load_test.main(["--url", url, "--bundle", str(bundle), "-n", str(requests), "-c", str(clients),
                    "--mix", "search=1", "--in-process", "0", "--json-out", str(out)])
    result = json.loads(out.read_text())
    overall = result["http"]["overall"]
    rank = result.get("batching", {}).get("rank-text", {})  # the counters since the server started
    return {
        "requests": overall["requests"], "rps": overall["rps"],
        "p50_ms": overall["latency_2xx"]["p50_ms"], "p99_ms": overall["latency_2xx"]["p99_ms"],
        "status_5xx": overall["status_5xx"], "connection_errors": overall["connection_errors"],
        "mean_batch": rank.get("mean_batch_size"), "max_batch": rank.get("max_batch_size_seen"),
        "retries": rank.get("retries"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path)
    source.add_argument("--tiny", action="store_true", help="the tests' tiny bundle (tests/support/tiny_bundle.py)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests-1", type=int, default=200, help="requests of the 1-client run")
    parser.add_argument("--requests-16", type=int, default=800, help="requests of the 16-client run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from tests.support.serving import ServiceProcess

    if args.tiny:
        from tests.support.tiny_bundle import cached_tiny_bundle

        bundle = cached_tiny_bundle(ROOT / ".benchmarks" / "tiny_bundle")
    else:
        bundle = args.bundle
    tmp = Path(tempfile.mkdtemp(prefix="batching-compare-"))
    runs: list[dict[str, Any]] = []
    for round_no in range(1, args.rounds + 1):
        for name, target in VARIANTS.items():
            slug = "batchable" if "batchable" in target else "microbatcher"
            server = ServiceProcess(bundle, tmp / f"home-{slug}", tmp / f"{slug}-{round_no}.log", target=target)
            server.start(timeout=600)
            try:
                for clients, n in ((1, args.requests_1), (16, args.requests_16)):
                    started = time.strftime("%H:%M:%S", time.gmtime())
                    numbers = run_one(server.url, bundle, n, clients, tmp / f"{slug}-{round_no}-c{clients}.json")
                    runs.append({"round": round_no, "variant": name, "clients": clients, "utc": started, **numbers})
                    print(json.dumps(runs[-1]), flush=True)
            finally:
                server.stop()
    summary = []
    for name in VARIANTS:
        for clients in (1, 16):
            these = [r for r in runs if r["variant"] == name and r["clients"] == clients]
            summary.append({
                "variant": name, "clients": clients,
                "p50_ms": [r["p50_ms"] for r in these], "p99_ms": [r["p99_ms"] for r in these],
                "median_p50_ms": statistics.median(r["p50_ms"] for r in these),
                "median_p99_ms": statistics.median(r["p99_ms"] for r in these),
                "median_rps": statistics.median(r["rps"] for r in these),
                "status_5xx": sum(r["status_5xx"] + r["connection_errors"] for r in these),
                "mean_batch": [r["mean_batch"] for r in these],
            })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bundle": str(bundle), "runs": runs, "summary": summary}, indent=2))
    print("| batching | clients | p50 ms (rounds) | p99 ms (rounds) | median req/s | 5xx + conn. errors | mean batch |")
    print("|---|---:|---|---|---:|---:|---|")
    for row in summary:
        print(f"| {row['variant']} | {row['clients']} | {' / '.join(f'{v:.1f}' for v in row['p50_ms'])} | "
              f"{' / '.join(f'{v:.1f}' for v in row['p99_ms'])} | {row['median_rps']:.1f} | {row['status_5xx']} | "
              f"{' / '.join(str(v) for v in row['mean_batch'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
