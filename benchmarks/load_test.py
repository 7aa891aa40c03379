"""Load test of the marketplace service: N requests from C concurrent clients, then an in-process comparison.

    # against a running service
    python benchmarks/load_test.py --url http://127.0.0.1:3000 --bundle artifacts/bundle
    # or let the script serve a bundle itself (bentoml serve in a subprocess)
    python benchmarks/load_test.py --serve-bundle artifacts/bundle
    # or build the tiny test bundle (real tiny models, ~1 min) and serve that
    python benchmarks/load_test.py --serve-tiny

The HTTP phase sends `--requests` (default 10,000) requests from `--concurrency` (default 16)
clients (asyncio + aiohttp, one connection per client), a `--mix` of search and predict
calls (text queries; a share of them with a photo when `--photo-share` > 0), and stops early at
`--max-seconds`. It reports p50/p90/p99/max latency, RPS, 2xx/4xx/5xx counts and connection
errors, per endpoint and overall, plus the service's batching counters (/metadata).

The in-process phase loads the same bundle with service.engine.MarketplaceEngine (no HTTP, no
BentoML, no batching) and times the same queries one at a time, so the HTTP + serving overhead
can be read off: it needs the bundle directory (`--bundle`, implied by --serve-*).

`--json-out FILE` writes every number as JSON (for BENCHMARKS.md). Exit code 1 when any 5xx or
connection error happened.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_QUERIES = [
    "acoustic guitar", "oak dining table", "fridge freezer", "washing machine", "garden bench", "sofa bed",
    "digital piano", "lawn mower", "vinyl records", "microwave oven", "drum kit", "flower pots",
    "mountain bike", "baby stroller", "office chair", "kids toys", "leather jacket", "double bed frame",
]


@dataclass
class Sample:
    endpoint: str
    status: int  # 0 = connection error / timeout
    seconds: float
    error: str = ""


@dataclass
class Plan:
    """What each request sends: endpoint, text, optional photo, k."""

    endpoint: str
    text: str | None
    photo: bytes | None
    k: int = 10
    category: str | None = None


@dataclass
class Report:
    samples: list[Sample] = field(default_factory=list)
    wall_seconds: float = 0.0
    stopped_by: str = "count"


# --------------------------------------------------------------------------- workload


def parse_mix(spec: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in spec.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in ("search", "predict", "embed"):
            raise SystemExit(f"--mix: unknown endpoint {name!r} (use search, predict, embed)")
        mix[name] = float(weight or 1)
    if not mix or sum(mix.values()) <= 0:
        raise SystemExit("--mix needs at least one endpoint with a positive weight")
    return mix


def queries_from_bundle(bundle: Path | None, limit: int = 500) -> list[str]:
    if bundle is None or not (bundle / "listings.parquet").is_file():
        return list(DEFAULT_QUERIES)
    import pandas as pd

    names = pd.read_parquet(bundle / "listings.parquet", columns=["product_name"])["product_name"].dropna().astype(str)
    names = [n[:200] for n in names.drop_duplicates().tolist()[:limit]]
    return names or list(DEFAULT_QUERIES)


def photos_from_bundle(bundle: Path | None, limit: int = 50) -> list[bytes]:
    if bundle is None:
        from PIL import Image

        out = []
        for colour in ((200, 40, 40), (40, 160, 60), (40, 60, 200)):
            buffer = io.BytesIO()
            Image.new("RGB", (128, 128), colour).save(buffer, format="JPEG")
            out.append(buffer.getvalue())
        return out
    return [p.read_bytes() for p in sorted((bundle / "thumbnails").glob("*.jpg"))[:limit]]


def make_plans(n: int, mix: dict[str, float], queries: list[str], photos: list[bytes], photo_share: float,
               k: int, seed: int, photo_only: bool = False) -> list[Plan]:
    """`photo_only`: a request with a photo carries no text (a pure photo search / image predict)."""
    rng = random.Random(seed)
    names, weights = list(mix), list(mix.values())
    plans = []
    for _ in range(n):
        endpoint = rng.choices(names, weights)[0]
        with_photo = bool(photos) and rng.random() < photo_share
        text = rng.choice(queries) if (not with_photo or (not photo_only and rng.random() < 0.5)) else None
        plans.append(Plan(endpoint, text, rng.choice(photos) if with_photo else None, k))
    return plans


# --------------------------------------------------------------------------- HTTP phase


def _request_kwargs(plan: Plan) -> dict[str, Any]:
    import aiohttp

    if plan.photo is None:
        body: dict[str, Any] = {"text": plan.text}
        if plan.endpoint == "search":
            body["k"] = plan.k
        return {"json": body}
    form = aiohttp.FormData()
    form.add_field("image", plan.photo, filename="photo.jpg", content_type="image/jpeg")
    if plan.text is not None:
        form.add_field("text", json.dumps(plan.text))
    if plan.endpoint == "search":
        form.add_field("k", str(plan.k))
    return {"data": form}


async def run_http(url: str, plans: list[Plan], concurrency: int, max_seconds: float, timeout: float) -> Report:
    import aiohttp

    report = Report()
    next_index = 0
    deadline = time.perf_counter() + max_seconds
    stopped = {"time": False}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while True:
            if time.perf_counter() >= deadline:
                stopped["time"] = True
                return
            if next_index >= len(plans):
                return
            plan = plans[next_index]
            next_index += 1
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/{plan.endpoint}", **_request_kwargs(plan)) as response:
                    await response.read()
                    report.samples.append(Sample(plan.endpoint, response.status, time.perf_counter() - start))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                report.samples.append(Sample(plan.endpoint, 0, time.perf_counter() - start, type(exc).__name__))

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    report.wall_seconds = time.perf_counter() - started
    report.stopped_by = "time" if stopped["time"] else "count"
    return report


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def latency_stats(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else float("nan"),
        "mean_ms": round(statistics.fmean(ms), 2) if ms else float("nan"),
    }


def summarise_http(report: Report) -> dict[str, Any]:
    def block(samples: list[Sample]) -> dict[str, Any]:
        statuses = Counter(s.status for s in samples)
        ok = [s.seconds for s in samples if 200 <= s.status < 300]
        return {
            "requests": len(samples),
            "rps": round(len(samples) / report.wall_seconds, 2) if report.wall_seconds else 0.0,
            "status_2xx": sum(c for st, c in statuses.items() if 200 <= st < 300),
            "status_4xx": sum(c for st, c in statuses.items() if 400 <= st < 500),
            "status_5xx": sum(c for st, c in statuses.items() if st >= 500),
            "connection_errors": statuses.get(0, 0),
            "latency_2xx": latency_stats(ok),
            "latency_all": latency_stats([s.seconds for s in samples]),
        }

    by_endpoint: dict[str, list[Sample]] = defaultdict(list)
    for sample in report.samples:
        by_endpoint[sample.endpoint].append(sample)
    errors = Counter(s.error for s in report.samples if s.error)
    return {
        "wall_seconds": round(report.wall_seconds, 2),
        "stopped_by": report.stopped_by,
        "overall": block(report.samples),
        "by_endpoint": {name: block(samples) for name, samples in sorted(by_endpoint.items())},
        "connection_error_kinds": dict(errors),
    }


# --------------------------------------------------------------------------- in-process phase


def match_torch_threads(meta: dict[str, Any]) -> None:
    """Run the in-process phase with the service's torch thread count, so the comparison is fair."""
    threads = (meta.get("runtime") or {}).get("torch_threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def run_in_process(bundle: Path, plans: list[Plan], repeats: int) -> dict[str, Any]:
    """The same queries through MarketplaceEngine directly: no HTTP, no BentoML, one at a time."""
    from service.engine import MarketplaceEngine
    from service.request_validation import Limits, decode_image

    limits = Limits()
    started = time.perf_counter()
    engine = MarketplaceEngine(bundle, limits)
    load_seconds = time.perf_counter() - started
    engine.warm_up()
    timings: dict[str, list[float]] = defaultdict(list)
    chosen = plans[:repeats]
    t0 = time.perf_counter()
    for plan in chosen:
        start = time.perf_counter()
        image = decode_image(plan.photo, limits) if plan.photo is not None else None
        if plan.endpoint == "search":
            engine.search(image=image, text=plan.text, k=plan.k)
        elif plan.endpoint == "predict":
            engine.predict(image=image, text=plan.text)
        else:
            engine.embed(image=image, text=plan.text)
        timings[plan.endpoint].append(time.perf_counter() - start)
    total = time.perf_counter() - t0
    all_times = [t for values in timings.values() for t in values]
    return {
        "requests": len(chosen),
        "bundle_load_seconds": round(load_seconds, 2),
        "sequential_rps": round(len(chosen) / total, 2) if total else 0.0,
        "overall": latency_stats(all_times),
        "by_endpoint": {name: latency_stats(values) for name, values in sorted(timings.items())},
    }


def same_query_comparison(url: str, bundle: Path, text: str, k: int, repeats: int) -> dict[str, Any]:
    """One fixed search query: HTTP (sequential, one client) vs in-process, latency and identical results."""
    import requests

    from service.engine import MarketplaceEngine

    engine = MarketplaceEngine(bundle)
    engine.warm_up()
    local_times, http_times = [], []
    local = remote = None
    with requests.Session() as session:
        for _ in range(repeats):
            start = time.perf_counter()
            remote = session.post(f"{url}/search", json={"text": text, "k": k}, timeout=60).json()
            http_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            local = engine.search(text=text, k=k)
            local_times.append(time.perf_counter() - start)
    same = [r["product_id"] for r in local["results"]] == [r["product_id"] for r in remote["results"]]
    return {
        "query": text,
        "k": k,
        "repeats": repeats,
        "http": latency_stats(http_times),
        "in_process": latency_stats(local_times),
        "identical_results": same,
        "overhead_p50_ms": round((percentile(http_times, 50) - percentile(local_times, 50)) * 1000, 2),
    }


# --------------------------------------------------------------------------- main


def _print_table(summary: dict[str, Any]) -> None:
    header = f"{'endpoint':<10} {'n':>7} {'rps':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'2xx':>6} {'4xx':>5} {'5xx':>5} {'conn':>5}"
    print(header)
    print("-" * len(header))
    rows = list(summary["by_endpoint"].items()) + [("ALL", summary["overall"])]
    for name, block in rows:
        lat = block["latency_all"]
        print(f"{name:<10} {block['requests']:>7} {block['rps']:>8} {lat['p50_ms']:>8} {lat['p90_ms']:>8} "
              f"{lat['p99_ms']:>8} {lat['max_ms']:>8} {block['status_2xx']:>6} {block['status_4xx']:>5} "
              f"{block['status_5xx']:>5} {block['connection_errors']:>5}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", default=os.environ.get("SERVICE_URL", "http://127.0.0.1:3000"),
                        help="base URL of a running service")
    target.add_argument("--serve-bundle", type=Path, help="serve this bundle directory for the test (subprocess)")
    target.add_argument("--serve-tiny", action="store_true", help="build (or reuse) the tiny test bundle and serve it")
    parser.add_argument("--bundle", type=Path, help="bundle directory for queries, photos and the in-process phase")
    parser.add_argument("--requests", "-n", type=int, default=10_000, help="number of requests (default 10000)")
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop issuing requests after this long")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    parser.add_argument("--mix", default="search=0.7,predict=0.3", help="endpoint weights, e.g. search=0.7,predict=0.3")
    parser.add_argument("--photo-share", type=float, default=0.0, help="share of requests carrying a photo (0..1)")
    parser.add_argument("--photo-only", action="store_true",
                        help="requests with a photo carry no text (photo search: the image model and index)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", type=int, default=200,
                        help="requests for the in-process comparison (0 to skip; needs the bundle)")
    parser.add_argument("--json-out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1")

    from pipeline_steps import runtime_env

    runtime_env.apply()  # the project's defaults (telemetry off, hubs offline); exported values win

    server = None
    bundle = args.bundle
    url = args.url.rstrip("/")
    tmp = Path(tempfile.mkdtemp(prefix="marketplace-load-"))
    if args.serve_tiny or args.serve_bundle:
        from tests.support.serving import ServiceProcess
        from tests.support.tiny_bundle import cached_tiny_bundle

        bundle = args.serve_bundle or cached_tiny_bundle(ROOT / ".benchmarks" / "tiny_bundle")
        server = ServiceProcess(bundle, tmp / "bentoml_home", tmp / "serve.log").start(timeout=300)
        url = server.url
        print(f"serving {bundle} at {url} (log: {tmp / 'serve.log'})")

    try:
        import requests

        meta = requests.post(f"{url}/metadata", json={}, timeout=30).json()
        queries = queries_from_bundle(bundle)
        photos = photos_from_bundle(bundle) if args.photo_share > 0 else []
        plans = make_plans(args.requests, parse_mix(args.mix), queries, photos, args.photo_share, args.k, args.seed,
                           photo_only=args.photo_only)

        # a short warm-up so first-request costs do not land in the percentiles
        asyncio.run(run_http(url, plans[: min(32, len(plans))], min(4, args.concurrency), 60, args.timeout))

        print(f"HTTP: {len(plans)} requests, {args.concurrency} clients, mix {args.mix}, "
              f"photo share {args.photo_share}, limit {args.max_seconds:.0f}s -> {url}")
        report = asyncio.run(run_http(url, plans, args.concurrency, args.max_seconds, args.timeout))
        summary = summarise_http(report)
        _print_table(summary)
        print(f"wall {summary['wall_seconds']} s, stopped by {summary['stopped_by']}; "
              f"connection errors: {summary['connection_error_kinds'] or 'none'}")
        batching = requests.post(f"{url}/metadata", json={}, timeout=30).json().get("batching", {})
        active = {k: v for k, v in batching.items() if v.get("batches")}
        print("batching:", json.dumps(active))

        results: dict[str, Any] = {
            "url": url,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "settings": {"requests": args.requests, "concurrency": args.concurrency, "mix": args.mix,
                         "photo_share": args.photo_share, "photo_only": args.photo_only, "k": args.k,
                         "max_seconds": args.max_seconds},
            "bundle": {"models": meta.get("models"), "indexes": {k: v.get("size") for k, v in
                                                                 (meta.get("indexes") or {}).items()},
                       "built_at": meta.get("built_at")},
            "http": summary,
            "batching": active,
        }
        if args.in_process and bundle is not None:
            match_torch_threads(meta)
            print(f"in-process: {args.in_process} requests, one at a time, through MarketplaceEngine")
            results["in_process"] = run_in_process(bundle, plans, args.in_process)
            ip = results["in_process"]
            print(f"  p50 {ip['overall']['p50_ms']} ms, p99 {ip['overall']['p99_ms']} ms, "
                  f"{ip['sequential_rps']} req/s sequential; by endpoint {json.dumps(ip['by_endpoint'])}")
            comparison = same_query_comparison(url, bundle, queries[0], args.k, repeats=50)
            results["same_query"] = comparison
            print(f"  same query {comparison['query']!r}: HTTP p50 {comparison['http']['p50_ms']} ms vs in-process "
                  f"p50 {comparison['in_process']['p50_ms']} ms (overhead {comparison['overhead_p50_ms']} ms), "
                  f"identical results: {comparison['identical_results']}")
        elif args.in_process:
            print("in-process comparison skipped: pass --bundle (or --serve-bundle/--serve-tiny)")
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(results, indent=2))
            print(f"results written to {args.json_out}")
        failed = summary["overall"]["status_5xx"] + summary["overall"]["connection_errors"]
        return 1 if failed else 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
