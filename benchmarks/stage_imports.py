"""What each DVC stage's process imports before its flow starts, and what that costs.

Every stage is a fresh `python -m flows.<module>` process, so its imports are paid once
per stage per `dvc repro`. This runs ``python -X importtime -c "import flows.<module>"``
for each stage module in a fresh interpreter (several times, the median kept) and
reports the import time and which heavy libraries got imported.

    .venv/bin/python benchmarks/stage_imports.py                       # this checkout
    .venv/bin/python benchmarks/stage_imports.py --repo /tmp/old --label before
    .venv/bin/python benchmarks/stage_imports.py --json a.json --compare b.json --update-markdown BENCHMARKS.md

`--repo` points at another checkout of the project (e.g. `git worktree add /tmp/old HEAD~3`)
so a before/after table comes from the same interpreter and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    "train_sklearn (was train_baselines, train_price)": "flows.train",
    "train_image / train_text / train_multimodal": "flows.train, pipeline_steps.training",
    "evaluate": "flows.evaluate",
    "register": "flows.register",
    "index": "flows.index",
    "package": "flows.package",
}
SECTION_HEADING = "## Stage start-up: imports per stage"
COMMAND = ("git worktree add /tmp/before <commit>; python benchmarks/stage_imports.py --repo /tmp/before --label <commit> --json b.json; "
           "python benchmarks/stage_imports.py --json a.json --compare b.json --update-markdown BENCHMARKS.md")
HEAVY = ("torch", "transformers", "torchvision", "bentoml", "great_expectations", "mlflow", "faiss", "sklearn", "prefect")
_LINE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)")


def import_profile(module: str, repo: Path) -> tuple[float, float, set[str]]:
    """Import `module` in a fresh interpreter: (wall s of its imports, CPU s of the process, heavy packages).

    The CPU seconds (user + system, from the child's rusage) hardly change when other jobs
    share the machine; the wall seconds do.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=repo, env=env, capture_output=True, text=True, check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
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
    return total_us / 1e6, cpu, loaded


def measure(repo: Path, repeats: int) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    for stage, module in STAGE_MODULES.items():
        walls, cpus = [], []
        loaded: set[str] = set()
        for _ in range(repeats):
            wall, cpu, loaded = import_profile(module, repo)
            walls.append(wall)
            cpus.append(cpu)
        results[stage] = {"module": module, "seconds": round(statistics.median(walls), 2),
                          "cpu_seconds": round(statistics.median(cpus), 2), "heavy": sorted(loaded)}
        print(f"{stage:32s} wall {results[stage]['seconds']:6.2f} s  cpu {results[stage]['cpu_seconds']:6.2f} s  "
              f"{', '.join(results[stage]['heavy'])}", flush=True)
    return results


def to_markdown(before: dict, after: dict) -> str:
    """Before/after table for BENCHMARKS.md (stages matched by module)."""
    lines = [
        SECTION_HEADING,
        "",
        "What a stage's process imports before its flow starts (`python -X importtime -c 'import flows.<stage>'` in a fresh",
        f"interpreter, median of runs; CPU = user + system seconds of that process). Command: `{COMMAND}`.",
        f"Before = `{before['label']}`, after = `{after['label']}`.",
        "",
        "| stage | CPU s before | CPU s after | heavy libraries before | heavy libraries after |",
        "|---|---:|---:|---|---|",
    ]
    by_module = {v["module"]: v for v in before["stages"].values()}
    for stage, row in after["stages"].items():
        old = by_module.get(row["module"], {})
        lines.append(f"| {stage} | {old.get('cpu_seconds', float('nan')):.1f} | {row['cpu_seconds']:.1f} | "
                     f"{', '.join(old.get('heavy', []))} | {', '.join(row['heavy'])} |")
    lines += ["", "Each stage still imports prefect; the training, evaluate, register and index stages need torch for their own work."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose flows are imported")
    parser.add_argument("--label", default="after")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--compare", type=Path, default=None, help="a --json file of the 'before' checkout")
    parser.add_argument("--update-markdown", type=Path, default=None, help="with --compare: rewrite this file's section")
    args = parser.parse_args()
    report = {"label": args.label, "stages": measure(args.repo.resolve(), args.repeats)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.compare:
        section = to_markdown(json.loads(args.compare.read_text()), report)
        if args.update_markdown:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from markdown_report import replace_section

            replace_section(args.update_markdown, SECTION_HEADING, section)
        else:
            print(section)


if __name__ == "__main__":
    main()
