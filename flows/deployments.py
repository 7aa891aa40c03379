"""Runs from the Prefect UI onto workers: a work pool, deployments created from code, a worker.

    python -m flows.deployments deploy            # work pool + deployments (pipeline and each stage)
    python -m flows.deployments worker            # `prefect worker start --pool <team.work_pool>`
    python -m flows.deployments run validate --raw-dir /path/to/export --set train.image.epochs=5

(`make deployments`, `make worker`, against the server `PREFECT_API_URL` names; `make services`
starts one.) Every deployment points at this checkout (`flow.from_source(<project root>, entrypoint)`),
so a run the worker picks up executes the same flow code as `dvc repro` / `python -m flows.<stage>`,
in a fresh process (`prefect.engine`) in the project folder. Its parameters are the flows' own:
``params`` (a params file), ``overrides`` (``key=value`` strings, as ``--set``) and, for the
pipeline and the validate stage, ``raw_dir``-style overrides (``data.raw_dir=…``).

Work pool types: ``process`` here (``team.work_pool_type``). With Docker or Kubernetes, create the
pool with that type (``prefect work-pool create … --type docker|kubernetes``, workers from
``prefect-docker`` / ``prefect-kubernetes``) and deploy with an image that holds this project
(``.deploy(image=…)``); the flows and parameters stay the same.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline_steps.config import PROJECT_ROOT, load_params

#: stage -> (entrypoint, flow function name) as `python -m flows.<stage>` runs it
ENTRYPOINTS: dict[str, str] = {
    "pipeline": "flows/pipeline.py:pipeline_flow",
    "validate": "flows/validate.py:validate_flow",
    "clean": "flows/clean.py:clean_flow",
    "train": "flows/train.py:train_flow",
    "evaluate": "flows/evaluate.py:evaluate_flow",
    "register": "flows/register.py:register_flow",
    "index": "flows/index.py:index_flow",
    "package": "flows/package.py:package_flow",
}
DEFAULT_DEPLOYMENT = "team"


def team_settings(params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    params = load_params() if params is None else params
    team = dict(params["team"])  # work_pool, work_pool_type, deployment_stages: params.yaml `team:`
    team.setdefault("deployment_name", DEFAULT_DEPLOYMENT)  # not a params.yaml knob: the deployments' name
    return team


def ensure_work_pool(name: str, pool_type: str = "process") -> None:
    """Create the work pool unless it exists (idempotent)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(work_pool=WorkPoolCreate(name=name, type=pool_type))
        except ObjectAlreadyExists:
            pass


def deploy(stages: Sequence[str], pool: str, name: str = DEFAULT_DEPLOYMENT, pool_type: str = "process",
           root: str | os.PathLike[str] = PROJECT_ROOT) -> list[str]:
    """Create/update one deployment per stage (`<flow name>/<name>`); return their ids."""
    from prefect import flow as prefect_flow

    ensure_work_pool(pool, pool_type)
    ids = []
    for stage in stages:
        if stage not in ENTRYPOINTS:
            raise SystemExit(f"unknown stage {stage!r}; choose from {', '.join(ENTRYPOINTS)}")
        loaded = prefect_flow.from_source(source=str(root), entrypoint=ENTRYPOINTS[stage])
        deployment_id = loaded.deploy(
            name=name,
            work_pool_name=pool,
            parameters={"params": None, "overrides": []},
            tags=["marketplace", f"stage:{stage}"],
            description=f"The {stage} stage of the marketplace pipeline (same code as `dvc repro`).",
            job_variables={"working_dir": str(root)},
            print_next_steps=False,
        )
        ids.append(str(deployment_id))
        print(f"deployment {loaded.name}/{name} ({deployment_id}) on work pool {pool}")
    return ids


def run(stage: str, overrides: Sequence[str], name: str = DEFAULT_DEPLOYMENT, timeout_s: float | None = None,
        params_file: str | None = None) -> Any:
    """Trigger a deployment run through the API and wait for it (a worker must be polling the pool)."""
    from prefect.deployments import run_deployment

    flow_name = ENTRYPOINTS[stage].rsplit(":", 1)[1]
    flow_name = {"pipeline_flow": "pipeline"}.get(flow_name, flow_name.removesuffix("_flow"))
    flow_run = run_deployment(f"{flow_name}/{name}", parameters={"params": params_file, "overrides": list(overrides)},
                              timeout=timeout_s)
    print(f"flow run {flow_run.name} ({flow_run.id}): {flow_run.state.type.value if flow_run.state else 'unknown'}")
    return flow_run


def worker_command(pool: str, pool_type: str = "process", extra: Sequence[str] = ()) -> list[str]:
    prefect_bin = os.path.join(os.path.dirname(sys.executable), "prefect")
    return [prefect_bin, "worker", "start", "--pool", pool, "--type", pool_type, *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p_deploy = sub.add_parser("deploy", help="create the work pool and the deployments")
    p_deploy.add_argument("--stages", nargs="+", default=None, help="default: pipeline + team.deployment_stages")
    p_worker = sub.add_parser("worker", help="start a worker polling the work pool")
    p_worker.add_argument("--run-once", action="store_true")
    p_run = sub.add_parser("run", help="trigger a deployment run and wait for it")
    p_run.add_argument("stage", choices=list(ENTRYPOINTS))
    p_run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p_run.add_argument("--raw-dir", default=None)
    p_run.add_argument("--params", default=None)
    args = parser.parse_args(argv)
    team = team_settings()
    if not os.environ.get("PREFECT_API_URL"):
        print("PREFECT_API_URL is not set: start the team servers (`make services`, then `source .team/env`)",
              file=sys.stderr)
        return 3
    if args.action == "deploy":
        stages = args.stages or ["pipeline", *team["deployment_stages"]]
        deploy(stages, team["work_pool"], team["deployment_name"], team["work_pool_type"])
    elif args.action == "worker":
        cmd = worker_command(team["work_pool"], team["work_pool_type"], ["--run-once"] if args.run_once else [])
        os.execv(cmd[0], cmd)
    else:
        overrides = list(args.overrides) + ([f"data.raw_dir={args.raw_dir}"] if args.raw_dir else [])
        flow_run = run(args.stage, overrides, team["deployment_name"], params_file=args.params)
        return 0 if flow_run.state and flow_run.state.is_completed() else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
