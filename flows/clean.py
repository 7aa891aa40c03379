"""Flow: clean the validated tables and photos and split them by product."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.common import STAGE_CACHE, base_parser, stage_task, fingerprint_paths, load_params, path_of, run_cli, write_stamp
from pipeline_steps import config
from pipeline_steps.cleaning import clean_dataset
from pipeline_steps.io_utils import write_json


@task(name="clean-and-split", cache_policy=STAGE_CACHE, persist_result=True)
def clean_task(inputs: list[str], outputs: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    validated_dir, raw_images = Path(inputs[0]), Path(inputs[1])
    out_dir = Path(outputs[0])
    manifest = clean_dataset(validated_dir, raw_images, out_dir, settings)
    write_stamp(out_dir, fingerprint_paths(inputs), settings)
    return manifest


@flow(name="clean", log_prints=True)
def clean_flow(params: str | None = None, overrides: list[str] | None = None, raw_dir: str | None = None) -> dict[str, Any]:
    settings = load_params(params, overrides or [])
    if raw_dir:
        config.set_value(settings, "data.raw_dir", raw_dir)
    raw = config.existing_dir(settings, "data.raw_dir", config.PROJECT_ROOT)
    validated = config.existing_dir(settings, "data.validated_dir", config.PROJECT_ROOT)
    out_dir = path_of(settings, "data.clean_dir")
    manifest = stage_task(clean_task, [str(validated), str(raw / "images")], [str(out_dir)], settings["cleaning"])
    write_json(path_of(settings, "evaluate.metrics_dir") / "clean.json", _headline(manifest))
    print(f"cleaned data in {out_dir}; manifest {out_dir / 'manifest.json'}")
    return manifest


def _headline(manifest: dict[str, Any]) -> dict[str, Any]:
    """The scalar counts of the manifest: what `dvc metrics show` should display."""
    return {key: value for key, value in manifest.items() if isinstance(value, (int, float))}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Clean validated data: prices, text, categories, photos; split by product.")
    parser.add_argument("--raw-dir", default=None, help="raw export folder (default: data.raw_dir)")
    run_cli(clean_flow, parser, argv)


if __name__ == "__main__":
    main()
