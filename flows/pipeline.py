"""The end-to-end flow: validate → clean → train → evaluate → register → index → package.

Each step is the same subflow a DVC stage runs on its own, so a run triggered
from the Prefect UI and `dvc repro` execute the same code.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.clean import clean_flow
from flows.common import base_parser, run_cli
from flows.evaluate import evaluate_flow
from flows.index import index_flow
from flows.package import package_flow
from flows.register import register_flow
from flows.train import train_flow
from flows.validate import validate_flow
from pipeline_steps.config import require_choice

STAGES = ("validate", "clean", "train", "evaluate", "register", "index", "package")


@flow(name="pipeline", log_prints=True)
def pipeline_flow(
    params: str | None = None,
    overrides: list[str] | None = None,
    start: str = "validate",
    stop: str = "package",
) -> dict[str, Any]:
    """Run the stages from `start` to `stop` (inclusive) with the same params and overrides."""
    require_choice(start, "--from", STAGES)
    require_choice(stop, "--to", STAGES)
    selected = STAGES[STAGES.index(start) : STAGES.index(stop) + 1]
    common = {"params": params, "overrides": list(overrides or [])}
    steps = {
        "validate": validate_flow,
        "clean": clean_flow,
        "train": train_flow,
        "evaluate": evaluate_flow,
        "register": register_flow,
        "index": index_flow,
        "package": package_flow,
    }
    results: dict[str, Any] = {}
    for stage in selected:
        results[stage] = steps[stage](**common)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Run the whole marketplace pipeline as one Prefect flow run.")
    parser.add_argument("--from", dest="start", default="validate", choices=STAGES)
    parser.add_argument("--to", dest="stop", default="package", choices=STAGES)
    run_cli(pipeline_flow, parser, argv)


if __name__ == "__main__":
    main()
