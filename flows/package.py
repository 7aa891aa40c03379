"""Flow: package the champion models and their indexes as a BentoML model and build the Bento.

The bundle holds exactly what the service loads (docs/ARCHITECTURE.md,
"Bundle"); `bentoml build` then produces a Bento that `bentoml serve` runs
with nothing trained or built at start-up.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.champions import fetch_champion_task
from flows.common import ROOT, base_parser, load_params, path_of, run_cli
from pipeline_steps import packaging
from pipeline_steps.config import existing_dir
from pipeline_steps.io_utils import write_json
from pipeline_steps.model_kinds import SERVED_KINDS as MODEL_KINDS


@task(name="assemble-bundle")
def assemble_task(models: dict[str, tuple[str, str, str]], settings: dict[str, Any]) -> str:
    index_root = path_of(settings, "index.dir")
    bundle_dir = path_of(settings, "serve.bundle_dir")
    packaging.assemble_bundle(
        bundle_dir,
        models,
        {kind: index_root / kind for kind in settings["index"]["kinds"]},
        existing_dir(settings, "data.clean_dir"),
    )
    return str(bundle_dir)


@task(name="build-bento", retries=1, retry_delay_seconds=5)
def build_task(bundle_dir: str, settings: dict[str, Any]) -> dict[str, str]:
    """Retried once: `bentoml build` occasionally trips over a busy model store."""
    serve = settings["serve"]
    packaging.check_bentofile(ROOT / "bentofile.yaml", serve["bento_name"], serve["bundle_model"])
    model_tag = packaging.save_bundle_to_bentoml(bundle_dir, serve["bundle_model"])
    bento_tag = packaging.build_bento(ROOT, "bentofile.yaml")
    return {"bundle_model": model_tag, "bento": bento_tag}


@flow(name="package", log_prints=True)
def package_flow(params: str | None = None, overrides: list[str] | None = None, build: bool = True) -> dict[str, Any]:
    settings = load_params(params, overrides or [])
    models = {kind: fetch_champion_task(kind, settings) for kind in MODEL_KINDS}
    bundle_dir = assemble_task(models, settings)
    result: dict[str, Any] = {"bundle_dir": bundle_dir, "models": {k: f"{v[1]}:{v[2]}" for k, v in models.items()}}
    if build:
        result.update(build_task(bundle_dir, settings))
        print(f"built Bento {result['bento']} (bundle {result['bundle_model']}); serve it with `make serve`")
    write_json(path_of(settings, "serve.package_file"), result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Package the champion models and indexes and build the Bento.")
    parser.add_argument("--no-build", dest="build", action="store_false", help="assemble the bundle only")
    run_cli(package_flow, parser, argv)


if __name__ == "__main__":
    main()
