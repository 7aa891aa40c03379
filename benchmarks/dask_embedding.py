"""Throughput of the photo-embedding stage on Dask: 1 and 2 LocalCluster workers vs one process.

Embeds the cleaned sample photos (``data/clean/images.parquet``; ``--n`` of them, repeated when
there are fewer) with the frozen image backbone of ``train.image`` (params.yaml), over shards of
``--shard-size`` photos, through ``flows.distributed_index`` (prefect-dask's DaskTaskRunner on a
LocalCluster of 1 or 2 single-threaded worker processes). The baseline is the same embedder in
this process with 1 torch thread. Photos/s counts the embedding tasks only (cluster start-up and
the index build are reported separately in the JSON).

    python benchmarks/dask_embedding.py --n 256 --out reports/dask_embedding.json --update-markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline_steps import runtime_env  # noqa: E402

runtime_env.apply()

import pandas as pd  # noqa: E402

SECTION_HEADING = "## Embedding on Dask"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts/dask_benchmark"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--update-markdown", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from flows.common import load_params
    from flows.distributed_index import photo_rows, run_on_dask
    from pipeline_steps import sharding

    base = load_params(None, ["train.num_threads=1"])
    rows = photo_rows(base)
    rows = pd.concat([rows] * (args.n // max(1, len(rows)) + 1), ignore_index=True).iloc[: args.n].reset_index(drop=True)
    results: list[dict[str, Any]] = []

    torch.set_num_threads(1)
    embed = sharding.image_embedder(base)
    t0 = time.perf_counter()
    embed(rows["path"].tolist())
    single_s = time.perf_counter() - t0
    results.append({"mode": "one process (no Dask)", "workers": 1, "embed_s": single_s, "photos_per_s": args.n / single_s})
    print(results[-1], flush=True)

    for workers in args.workers:
        settings = load_params(None, [
            "train.num_threads=1", f"distributed.n_workers={workers}", "distributed.threads_per_worker=1",
            f"distributed.shard_size={args.shard_size}", f"distributed.work_dir={args.work_dir / f'w{workers}'}",
        ])
        t0 = time.perf_counter()
        summary = run_on_dask(settings, rows)
        results.append({"mode": "Dask LocalCluster", "workers": workers, "embed_s": summary["embed_seconds"],
                        "photos_per_s": summary["photos_per_second"], "shards": summary["shards"],
                        "flow_s_incl_cluster_start": time.perf_counter() - t0})
        print(results[-1], flush=True)

    image = base["train"]["image"]
    load = os.getloadavg()
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/dask_embedding.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "photos": args.n, "shard_size": args.shard_size, "backbone": image["backbone"], "input_size": image["input_size"],
        "cores": os.cpu_count(), "loadavg_at_end": load, "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    lines = [
        SECTION_HEADING, "",
        f"Date: {report['date']}. {report['cores']} cores shared with other jobs (load average at the end "
        f"{load[0]:.1f}); {args.n} cleaned sample photos, backbone {image['backbone']} at {image['input_size']} px "
        f"(frozen features), shards of {args.shard_size} photos, 1 torch thread per process.", "",
        "```", report["command"], "```", "",
        "| mode | workers | embedding s | photos/s | flow s (incl. cluster start) |", "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['mode']} | {r['workers']} | {r['embed_s']:.1f} | {r['photos_per_s']:.1f} | "
                     f"{r.get('flow_s_incl_cluster_start', float('nan')):.1f} |")
    section = "\n".join(lines) + "\n"
    if args.update_markdown:
        from markdown_report import replace_section

        replace_section(args.update_markdown, SECTION_HEADING, section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
