"""What each DVC stage's process imports before its flow starts, and what that costs.

Every stage is a fresh `python -m flows.<module>` process, so its imports are paid once
per stage per `dvc repro`. This runs ``python -X importtime -c "import flows.<module>"``
for each stage module in a fresh interpreter (several times, the median kept) and
reports the import time and which heavy libraries got imported.

    .venv/bin/python benchmarks/stage_imports.py                       # this checkout
    .venv/bin/python benchmarks/stage_imports.py --repo /tmp/old --label before
    .venv/bin/python benchmarks/stage_imports.py --markdown BENCHMARKS-imports.md

`--repo` points at another checkout of the project (e.g. `git worktree add /tmp/old HEAD~3`)
so a before/after table comes from the same interpreter and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: dvc.yaml stage -> the flows module its command runs.
STAGE_MODULES = {
    "sample": "flows.generate_sample",
    "validate": "flows.validate",
    "clean": "flows.clean",
    "train_baselines / train_price": "flows.train",
    "evaluate": "flows.evaluate",
    "register": "flows.register",
    "index": "flows.index",
    "package": "flows.package",
}
HEAVY = ("torch", "transformers", "torchvision", "bentoml", "great_expectations", "mlflow", "faiss", "sklearn", "prefect")
_LINE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)")


def import_profile(module: str, repo: Path) -> tuple[float, set[str]]:
    """Seconds to import `module` (sum of top-level cumulative times) and the heavy packages loaded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=repo, env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"importing {module} in {repo} failed:\n{proc.stderr[-2000:]}")
    total_us = 0
    loaded: set[str] = set()
    for line in proc.stderr.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        _, cumulative, indent, name = match.groups()
        if len(indent) == 1:  # a top-level import of the interpreter's own start
            total_us += int(cumulative)
        top = name.split(".")[0]
        if top in HEAVY:
            loaded.add(top)
    return total_us / 1e6, loaded


def measure(repo: Path, repeats: int) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    for stage, module in STAGE_MODULES.items():
        times = []
        loaded: set[str] = set()
        for _ in range(repeats):
            seconds, loaded = import_profile(module, repo)
            times.append(seconds)
        results[stage] = {"module": module, "seconds": round(statistics.median(times), 2), "heavy": sorted(loaded)}
        print(f"{stage:32s} {results[stage]['seconds']:6.2f} s  {', '.join(results[stage]['heavy'])}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose flows are imported")
    parser.add_argument("--label", default="after")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    results = measure(args.repo.resolve(), args.repeats)
    if args.json:
        args.json.write_text(json.dumps({"label": args.label, "stages": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
