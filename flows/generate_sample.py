"""Flow: write the embedded demo dataset (deterministic) into data.raw_dir.

It refuses to write over a folder that is not a previously generated sample,
so a user's real export in data.raw_dir is never touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.common import base_parser, load_params, path_of, run_cli
from pipeline_steps.errors import ConfigError
from pipeline_steps.io_utils import read_json
from pipeline_steps.sample_data import generate_sample

MANIFEST = "sample_manifest.json"


@task(name="generate-sample-data")
def generate_task(out_dir: str, sample_params: dict[str, Any]) -> dict[str, Any]:
    return generate_sample(Path(out_dir), sample_params)


@flow(name="generate-sample", log_prints=True)
def generate_sample_flow(
    params: str | None = None, overrides: list[str] | None = None, out: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Generate the sample unless an identical one is already in place."""
    settings = load_params(params, overrides or [])
    out_dir = Path(out) if out else path_of(settings, "data.raw_dir")
    sample_params = settings["sample"]
    manifest_path = out_dir / MANIFEST
    if out_dir.exists() and any(out_dir.iterdir()) and not manifest_path.is_file():
        raise ConfigError(
            f"{out_dir} holds data that is not a generated sample; refusing to overwrite it "
            "(point data.raw_dir elsewhere or pass --out)"
        )
    if manifest_path.is_file() and not force and read_json(manifest_path).get("params") == sample_params:
        print(f"sample in {out_dir} is up to date; nothing to do")
        return read_json(manifest_path)
    manifest = generate_task(str(out_dir), sample_params)
    print(f"sample written to {out_dir}: {manifest.get('n_products')} products, {manifest.get('n_images')} images")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Generate the embedded sample marketplace export.")
    parser.add_argument("--out", default=None, help="target folder (default: data.raw_dir)")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    run_cli(generate_sample_flow, parser, argv)


if __name__ == "__main__":
    main()
