"""Markdown table of the photo-search runs of benchmarks/load_test.py (--photo-only) for BENCHMARKS.md.

    python benchmarks/photo_search_table.py reports/service_benchmark/photo_search_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    print("| bundle (image model) | clients | requests | req/s | p50 ms | p99 ms | 5xx | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in sorted(paths):
        run = json.loads(Path(path).read_text())
        overall, settings = run["http"]["overall"], run["settings"]
        batches = [b["mean_batch_size"] for b in run.get("batching", {}).values() if b.get("batches")]
        label = Path(path).stem.replace("photo_search_", "")
        print(
            f"| {label} | {settings['concurrency']} | {overall['requests']} | {overall['rps']:.1f} | "
            f"{overall['latency_2xx']['p50_ms']:.1f} | {overall['latency_2xx']['p99_ms']:.1f} | {overall['status_5xx']} | "
            f"{', '.join(f'{b:.1f}' for b in batches) or '-'} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
