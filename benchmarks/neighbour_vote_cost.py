"""What the image model's neighbour vote adds to a photo's classification, on one CPU thread.

    python benchmarks/neighbour_vote_cost.py --model-dir /tmp/real_report/models/image \\
        --out benchmarks/results/neighbour_vote_cost.json
    python benchmarks/neighbour_vote_cost.py --render benchmarks/results/neighbour_vote_cost.json

Loads the stored train photos of a trained image model (`neighbours.npz`, via the model's config.json)
and times `NeighbourVote.blend` for batches of 1 and 16 query photos (random unit vectors of the stored
width), against the head alone (`embed_features` + `classify_embedding`) on the same features. The
backbone's own cost per photo (tens of milliseconds at 260 px, BENCHMARKS.md "photo search") is not
included: this is the increment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline_steps import runtime_env  # noqa: E402

runtime_env.apply()

import torch  # noqa: E402

from pipeline_steps import inference  # noqa: E402


def timed(fn, repeats: int) -> dict[str, float]:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {"p50_ms": round(statistics.median(samples), 3), "p99_ms": round(samples[int(0.99 * (len(samples) - 1))], 3)}


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--out", type=Path)
    p.add_argument("--render", type=Path, help="print the Markdown table of a saved JSON and exit")
    args = p.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text(encoding="utf-8"))))
        return
    if args.model_dir is None or args.out is None:
        p.error("--model-dir and --out are required to measure")
    torch.set_num_threads(1)
    classifier = inference.load_classifier(args.model_dir, device="cpu")
    vote = classifier.loaded.neighbours
    if vote is None:
        raise SystemExit(f"error: {args.model_dir} has no neighbour vote (config.json neighbours is null)")
    module = classifier.module
    rows = []
    for batch in (1, 16):
        features = torch.nn.functional.normalize(torch.randn(batch, vote.vectors.shape[1]), dim=1) * 10
        head = timed(lambda f=features: module.classify_embedding(module.embed_features(f)), args.repeats)
        logits = module.classify_embedding(module.embed_features(features))
        rows.append({"batch": batch, "head_alone": head, "vote_blend": timed(lambda f=features, lg=logits: vote.blend(lg, f), args.repeats)})
    report = {
        "command": "python benchmarks/neighbour_vote_cost.py " + " ".join(sys.argv[1:]),
        "stored_photos": int(len(vote.labels)), "dim": int(vote.vectors.shape[1]), "k": vote.k, "torch_threads": 1, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(render(report))


def render(report: dict) -> str:
    """The Markdown table of BENCHMARKS.md (also: `--render JSON` re-renders a saved run)."""
    lines = ["| query photos | head alone p50 / p99 ms | + neighbour vote p50 / p99 ms |", "|---:|---:|---:|"]
    for row in report["rows"]:
        head, vote = row["head_alone"], row["vote_blend"]
        lines.append(f"| {row['batch']} | {head['p50_ms']:.2f} / {head['p99_ms']:.2f} | {vote['p50_ms']:.1f} / {vote['p99_ms']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
