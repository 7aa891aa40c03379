"""Flow: validate the raw export with great-expectations and quarantine bad rows.

Structural problems stop the run with a message naming file, column and
examples; row-level failures go to rejects.csv with one reason per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.common import STAGE_CACHE, base_parser, stage_task, fingerprint_paths, load_params, path_of, run_cli, write_stamp
from pipeline_steps import config
from pipeline_steps.errors import RejectThresholdExceeded
from pipeline_steps.io_utils import write_json
from pipeline_steps.raw_io import describe_format
from pipeline_steps.validation import validate_raw


@task(name="validate-raw-export", cache_policy=STAGE_CACHE, persist_result=True)
def validate_task(inputs: list[str], outputs: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    raw_dir, out_dir, docs_dir = (Path(p) for p in (inputs[0], outputs[0], outputs[1]))
    metrics = validate_raw(raw_dir, out_dir, settings, docs_dir)
    write_stamp(out_dir, fingerprint_paths(inputs), settings)
    return metrics


@flow(name="validate", log_prints=True)
def validate_flow(params: str | None = None, overrides: list[str] | None = None, raw_dir: str | None = None) -> dict[str, Any]:
    settings = load_params(params, overrides or [])
    if raw_dir:
        config.set_value(settings, "data.raw_dir", raw_dir)
    raw = config.existing_dir(settings, "data.raw_dir", config.PROJECT_ROOT)
    out_dir = path_of(settings, "data.validated_dir")
    docs_dir = path_of(settings, "validation.data_docs_dir")
    metrics_file = path_of(settings, "evaluate.metrics_dir") / "validate.json"
    try:
        metrics = stage_task(validate_task, [str(raw)], [str(out_dir), str(docs_dir)], settings["validation"])
    except RejectThresholdExceeded as error:
        write_json(metrics_file, getattr(error, "metrics", {}))  # what was rejected, for the post-mortem
        print(f"Data Docs: {docs_dir / 'index.html'}; rejects: {out_dir / 'rejects.csv'}")
        raise
    write_json(metrics_file, metrics)
    for name, encoding in (metrics.get("encodings") or {}).items():
        delimiter = (metrics.get("delimiters") or {}).get(name) or ","
        print(f"read {name} as {describe_format(encoding or 'utf-8', delimiter)}")
    print(f"validated {raw}: rejects in {out_dir / 'rejects.csv'}")
    print(f"Data Docs: {metrics.get('data_docs_index', docs_dir)}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Validate a raw marketplace export (Products.csv, Images.csv, images/).")
    parser.add_argument("--raw-dir", default=None, help="raw export folder (default: data.raw_dir)")
    run_cli(validate_flow, parser, argv)


if __name__ == "__main__":
    main()
