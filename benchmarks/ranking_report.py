"""Ranking on real data: hybrid lexical + dense retrieval and category-aware re-ranking vs dense-only.

    nice -n 5 .venv/bin/python benchmarks/ranking_report.py --clean-dir /tmp/real11/clean \\
        --models-dir /tmp/real11/models --work-dir /tmp/real11/ranking --out reports/ranking_report.json

Runs the index stage's own ranking step (`pipeline_steps.ranking_eval.fit_and_report`: BM25 over the
listings, weights fitted on val, test reported once) on trained model directories (`<models-dir>/text`,
`image`, `multimodal`; the kinds present are used) and a clean folder, with Flat indexes of every
listing. Embeddings and probabilities are cached in --work-dir (keyed by model dir + clean dir). Writes
JSON and a Markdown table (.md) next to it. `--set index.ranking.KEY=VALUE` overrides params.yaml.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline_steps import runtime_env  # noqa: E402

runtime_env.apply()  # telemetry off, hubs offline, before any library reads them; exported values win

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from benchmarks.markdown_report import replace_block  # noqa: E402
from pipeline_steps import inference  # noqa: E402
from pipeline_steps.config import load_params, set_value  # noqa: E402
from pipeline_steps.index import SimilarityIndex  # noqa: E402
from pipeline_steps.ranking import RankingSettings  # noqa: E402
from pipeline_steps.ranking_eval import KindData, fit_and_report, headline  # noqa: E402

KINDS = ("text", "image", "multimodal")


def _key(model_dir: Path, clean_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*")) + [clean_dir / "products.parquet", clean_dir / "images.parquet"]:
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def predictions(kind: str, model_dir: Path, clean_dir: Path, work: Path, feature_cache: Path | None) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, list[str]]:
    cache = work / f"{kind}-{_key(model_dir, clean_dir)}.npz"
    classifier = inference.load_classifier(model_dir, device="cpu")
    if cache.is_file():
        data = np.load(cache, allow_pickle=True)
        ids = pd.read_parquet(cache.with_suffix(".parquet"))
        return data["vectors"], data["probs"], ids, list(classifier.classes)
    start = time.time()
    split = inference.predict_split(classifier, clean_dir, None, progress=True,
                                    feature_cache_dir=feature_cache if kind != "text" else None)
    print(f"{kind}: embedded {len(split.ids)} rows in {time.time() - start:.0f}s", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, vectors=split.embeddings, probs=split.proba)
    split.ids.to_parquet(cache.with_suffix(".parquet"), index=False)
    return split.embeddings, split.proba, split.ids, list(classifier.classes)


def markdown(report: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# Ranking report ({meta['generated_at']})", "", f"`{meta['command']}`", "",
             f"clean dir `{meta['clean_dir']}`, models `{meta['models_dir']}`; weights fitted on val "
             f"({meta['fit_metric']}), test reported once. precision@k = share of the top k in the query's "
             "root category; nDCG@10 with graded gains (same leaf 3 > same sub-category 2 > same root 1 > other 0).", ""]
    for query_type, entry in report.items():
        for split_key in ("val", "test", "test_with_photos", "text_with_photos"):
            table = entry.get(split_key)
            if not table:
                continue
            n = entry.get("queries", {}).get(split_key, entry.get("queries", {}).get("test_with_photos", ""))
            lines += [f"## {query_type} queries, {split_key} ({n} queries, index `{entry['index']}`)", "",
                      "| ranking | precision@1 | precision@10 | nDCG@10 |", "|---|---|---|---|"]
            for name, m in table.items():
                lines.append(f"| {name} | {m['precision@1']:.3f} | {m['precision@10']:.3f} | {m['ndcg@10']:.3f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _cells(table: dict[str, Any], base: str, chosen: str) -> list[str]:
    return [f"{table[base][m]:.3f} → **{table[chosen][m]:.3f}**" for m in ("precision@10", "ndcg@10", "precision@1")]


def readme_table(report: dict[str, Any], meta: dict[str, Any]) -> str:
    """The README's ranking table: every query type's chosen rule vs the dense-only baseline on test."""
    lines = ["| queries (index) | ranking chosen on val | test queries | p@10 dense → ranked | nDCG@10 dense → ranked | p@1 dense → ranked |",
             "|---|---|---:|---:|---:|---:|"]
    names = {"text": "text (text)", "image": "image (image, per photo)", "combined": "combined text + photos (multimodal)"}
    for query_type, entry in report.items():
        for split_key in ("test", "test_with_photos"):
            table = entry.get(split_key)
            if not table:
                continue
            chosen = next(k for k in table if k.startswith("chosen"))
            label = names.get(query_type, f"`{query_type}` by product id"
                              + (", listings with photos" if split_key == "test_with_photos" else ", all listings"))
            n = entry.get("queries", {}).get(split_key, "")
            lines.append(f"| {label} | {chosen.removeprefix('chosen: ')} | {n} | " + " | ".join(_cells(table, "dense (baseline)", chosen)) + " |")
            for ref in ("multimodal index only (combined rule)", "text ranking (text index only)"):
                if ref in table:
                    cells = [f"{table[ref][m]:.3f}" for m in ("precision@10", "ndcg@10", "precision@1")]
                    lines.append(f"| … the same listings, {ref} | | {n} | " + " | ".join(cells) + " |")
    lines += ["", f"Generated by `{meta['command']}` on {meta['generated_at']} (clean dir `{meta['clean_dir']}`, "
              f"models `{meta['models_dir']}`; dense → ranked = the dense-only baseline → the rule chosen on val)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean-dir", type=Path, default=None, help="required unless --render")
    parser.add_argument("--models-dir", type=Path, default=None, help="required unless --render")
    parser.add_argument("--feature-cache", type=Path, default=None, help="train.image.features_dir of the image model")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ranking_report"))
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "ranking_report.json")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--update-readme", type=Path, default=None,
                        help="replace the <!-- ranking_report:start/end --> block of this file with the headline table")
    parser.add_argument("--render", type=Path, default=None, help="only render this JSON report (with --update-readme)")
    parser.add_argument("--bundle-out", type=Path, default=None,
                        help="also save the indexes with their ranking files and assemble a serving bundle here "
                             "(the models of --models-dir; for benchmarks/ranking_latency.py)")
    args = parser.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        table = readme_table(saved["report"], saved["meta"])
        if args.update_readme is not None:
            replace_block(args.update_readme, "ranking_report", table)
        print(table)
        return 0
    if args.clean_dir is None or args.models_dir is None:
        parser.error("--clean-dir and --models-dir are required (unless --render)")

    params = load_params(None)
    for item in args.set:
        key, _, value = item.partition("=")
        set_value(params, key.strip(), yaml.safe_load(value))
    settings = RankingSettings.from_params(params["index"])
    products = pd.read_parquet(args.clean_dir / "products.parquet")
    kinds: dict[str, KindData] = {}
    for kind in args.kinds.split(","):
        model_dir = args.models_dir / kind
        if not (model_dir / "config.json").is_file():
            print(f"{kind}: no model at {model_dir}, skipped", flush=True)
            continue
        vectors, probs, ids, classes = predictions(kind, model_dir, args.clean_dir, args.work_dir, args.feature_cache)
        index = SimilarityIndex.build(vectors, ids, kind=kind, factory="Flat", use_gpu=False,
                                      model_name=f"local-{kind}", model_version="0")
        kinds[kind] = KindData(index, vectors, ids, probs, classes)
    index_dirs = None
    if args.bundle_out is not None:
        index_dirs = {kind: args.work_dir / "index" / kind for kind in kinds}
        for kind, data in kinds.items():
            data.index.save(index_dirs[kind])
    start = time.time()
    report = fit_and_report(kinds, products, settings, ks=params["index"]["eval_k"], index_dirs=index_dirs)
    if args.bundle_out is not None:
        from pipeline_steps.packaging import assemble_bundle

        assemble_bundle(args.bundle_out, {kind: (args.models_dir / kind, f"local-{kind}", "0") for kind in kinds},
                        index_dirs, args.clean_dir)
        print(f"bundle written to {args.bundle_out}", flush=True)
    print(f"ranking fitted and scored in {time.time() - start:.1f}s", flush=True)
    meta = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/ranking_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "clean_dir": str(args.clean_dir), "models_dir": str(args.models_dir), "fit_metric": settings.fit_metric,
        "products": int(len(products)), "splits": products["split"].value_counts().to_dict(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "headline": headline(report), "report": report}, indent=2, default=float) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report, meta))
    if args.update_readme is not None:
        replace_block(args.update_readme, "ranking_report", readme_table(report, meta))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
