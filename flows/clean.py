"""Flow: clean the validated tables and photos, split them by product, check the result.

The layer is built in a temporary folder and checked against the Clean contract with
great-expectations (`validation.validate_clean_layer`: labels match categories, one split
per product, images belong to known products, ...) before it replaces the previous layer:
a layer that breaks the contract stops the stage (exit 65, the failed checks named) and
never reaches the training stages. Data Docs of those checks go to `clean_docs_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.common import STAGE_CACHE, base_parser, stage_task, fingerprint_paths, load_params, path_of, run_cli, write_stamp
from pipeline_steps import config
from pipeline_steps.cleaning import clean_dataset
from pipeline_steps.io_utils import atomic_dir, write_json


@task(name="clean-and-split", cache_policy=STAGE_CACHE, persist_result=True)
def clean_task(inputs: list[str], outputs: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    # Imported here: a re-run whose outputs are up to date (a cache hit) does not pay for great-expectations.
    from pipeline_steps.validation import validate_clean_layer

    validated_dir, raw_images = Path(inputs[0]), Path(inputs[1])
    out_dir, docs_dir = Path(outputs[0]), Path(outputs[1])
    # Built and checked in a temporary sibling that replaces out_dir only when the contract holds.
    with atomic_dir(out_dir) as staging:
        manifest = clean_dataset(validated_dir, raw_images, staging, settings)
        contract = validate_clean_layer(staging, docs_dir)
    print(f"clean layer passes the Clean contract ({contract['products']} products, {contract['images']} images); "
          f"Data Docs: {contract['data_docs_index']}")
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
    outputs = [str(out_dir), str(clean_docs_dir(settings))]
    manifest = stage_task(clean_task, [str(validated), str(raw / "images")], outputs, settings["cleaning"])
    write_json(path_of(settings, "evaluate.metrics_dir") / "clean.json", _headline(manifest))
    print(f"cleaned data in {out_dir}; manifest {out_dir / 'manifest.json'}")
    return manifest


def clean_docs_dir(settings: dict[str, Any]) -> Path:
    """Data Docs of the clean-layer checks (`validation.clean_data_docs_dir`, a DVC output of the stage).

    Not inside data.clean_dir: the HTML carries run times, and the clean layer must stay
    byte-identical for identical inputs (DVC then skips the training stages).
    """
    return path_of(settings, "validation.clean_data_docs_dir")


def _headline(manifest: dict[str, Any]) -> dict[str, Any]:
    """The scalar counts of the manifest: what `dvc metrics show` should display."""
    return {key: value for key, value in manifest.items() if isinstance(value, (int, float))}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Clean validated data: prices, text, categories, photos; split by product.")
    parser.add_argument("--raw-dir", default=None, help="raw export folder (default: data.raw_dir)")
    run_cli(clean_flow, parser, argv)


if __name__ == "__main__":
    main()
