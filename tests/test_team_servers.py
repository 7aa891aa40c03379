"""Team servers for real, on loopback: PostgreSQL (a throw-away cluster), an MLflow server on it with
proxied artifacts, and the registry's promotion under concurrent writers against that server.

The servers are started and stopped by this module (pipeline_steps/team_servers.py, the code
`make services` runs), on free ports in a temporary folder. Skipped only when PostgreSQL's server
binaries are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from pipeline_steps import team_servers
from pipeline_steps.config import PROJECT_ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(team_servers.pg_bin("initdb") is None or team_servers.pg_bin("pg_ctl") is None,
                       reason="PostgreSQL server binaries (initdb, pg_ctl) are not installed"),
]


@pytest.fixture(scope="module")
def postgres():
    base = Path(tempfile.mkdtemp(prefix="team-pg-"))
    pg = team_servers.start_postgres(base, databases=["mlflow", "prefect"])
    yield pg
    pg.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    process, url = team_servers.start_mlflow(postgres.url("mlflow", "psycopg2"), str(folder / "artifacts"), None,
                                             folder / "mlflow.log")
    yield url
    team_servers.stop_pid(process.pid)


def test_postgres_advisory_lock_excludes_a_second_session(postgres):
    """The lock promote() takes through the tracking database: a second session must wait."""
    from pipeline_steps.registry_lock import PromotionLockTimeout, promotion_lock

    url = postgres.url("mlflow")
    with promotion_lock("m", tracking_uri="http://unused", database_url=url, timeout_s=5) as kind:
        assert kind == "postgres"
        code = textwrap.dedent(f"""
            from pipeline_steps.registry_lock import PromotionLockTimeout, promotion_lock
            try:
                with promotion_lock("m", tracking_uri="http://unused", database_url={url!r}, timeout_s=1):
                    print("GOT")
            except PromotionLockTimeout:
                print("TIMEOUT")
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
        assert out.stdout.strip() == "TIMEOUT", out.stderr[-2000:]
    with promotion_lock("m", tracking_uri="http://unused", database_url=url, timeout_s=5):
        pass  # released: obtainable again
    with pytest.raises(PromotionLockTimeout), promotion_lock("x", "http://unused", url, timeout_s=5):
        raise PromotionLockTimeout("propagates")


REGISTER_SCRIPT = textwrap.dedent("""
    import json, logging, os, sys, time
    logging.basicConfig(level=logging.WARNING)
    for logger_name in ("pipeline_steps.registry", "pipeline_steps.registry_lock"):
        logging.getLogger(logger_name).setLevel(logging.INFO)
    from pathlib import Path
    import numpy as np, mlflow
    from sklearn.linear_model import LogisticRegression
    from pipeline_steps import registry

    name, accuracy, barrier = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
    params = {"tracking_uri": os.environ["MLFLOW_TRACKING_URI"], "experiment": "team-concurrent"}
    registry.configure_tracking(params)
    x = np.random.default_rng(0).normal(size=(20, 3)); y = (x[:, 0] > 0).astype(int)
    with mlflow.start_run() as run:
        info = mlflow.sklearn.log_model(LogisticRegression().fit(x, y), name="model",
                                        pip_requirements=["scikit-learn"], input_example=x[:2])
    barrier.touch(); deadline = time.time() + 120          # both pipelines reach promotion together
    while len(list(barrier.parent.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    version = registry.register_model_version(info.model_uri, name, run.info.run_id, {"accuracy": accuracy},
                                              promotion_metric="accuracy", test_split_hash="split-1")
    decision = registry.promote(name, version.version, "accuracy")
    print("DECISION " + json.dumps(decision.to_dict()))
""")


@pytest.mark.parametrize("lock", ["registry", "postgres"])
def test_two_concurrent_registers_end_with_one_champion_the_better(mlflow_server, postgres, tmp_path, lock):
    import mlflow
    from mlflow import MlflowClient

    name = f"team-model-{lock}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop(__import__("pipeline_steps.registry_lock", fromlist=["x"]).LOCK_DB_ENV, None)
    if lock == "postgres":
        env["MLFLOW_REGISTRY_LOCK_DB"] = postgres.url("mlflow")
    procs = [
        subprocess.Popen([sys.executable, "-c", REGISTER_SCRIPT, name, str(acc), str(tmp_path / f"ready-{i}")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        for i, acc in enumerate((0.71, 0.83))
    ]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    decisions = [json.loads(line.split(" ", 1)[1]) for out, _ in outputs for line in out.splitlines()
                 if line.startswith("DECISION ")]
    assert len(decisions) == 2  # both decisions made and logged
    for _, err in outputs:
        assert f"promotion lock on {name} taken ({lock})" in err, err[-3000:]
        assert f"promotion of {name} version" in err  # the decision is logged with both values

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]  # none lost, none duplicated
    by_accuracy = {float(v.tags["metric.accuracy"]): str(v.version) for v in versions}
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == by_accuracy[0.83]
    champions = [v for v in versions if "champion" in (client.get_model_version(name, v.version).aliases or [])]
    assert len(champions) == 1
    worse = by_accuracy[0.71]
    assert "champion" not in (client.get_model_version(name, worse).aliases or [])
    # the lock entry is gone once released
    assert not client.search_registered_models(f"name = '{name}.promotion-lock'")

    # the champion loads from the server (artifacts through the server's proxy)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    import numpy as np

    assert model.predict(np.zeros((2, 3))).shape == (2,)


def test_make_services_targets_exist():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    for target in ("services:", "services-down:", "worker:", "deployments:", "push:", "pull:"):
        assert target in makefile


@pytest.fixture(scope="module")
def prefect_server(postgres, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefect-server")
    process, api = team_servers.start_prefect(postgres.url("prefect", "asyncpg"), None, folder / "home",
                                              folder / "prefect.log")
    yield api
    team_servers.stop_pid(process.pid)


def test_deployment_run_from_the_api_is_executed_by_a_process_worker(prefect_server, tmp_path):
    """Work pool + a stage's deployment created from code; a run triggered through the API is picked
    up by `prefect worker start` (process type) and runs the validate stage's real code."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import deployments
    from tests.support.flow_helpers import path_overrides, tiny_raw_export

    pool = "test-process-pool"
    raw = tiny_raw_export(tmp_path / "raw")
    overrides = path_overrides(tmp_path / "work", raw)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PYTHONPATH": str(PROJECT_ROOT)}
    worker = subprocess.Popen(deployments.worker_command(pool, "process"), cwd=PROJECT_ROOT, env=env,
                              stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            (deployment_id,) = deployments.deploy(["validate"], pool, name="test")
            flow_run = deployments.run("validate", overrides, name="test", timeout_s=600)
            assert flow_run.state.is_completed(), (flow_run.state, (tmp_path / "worker.log").read_text()[-3000:])
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
                assert [str(r.id) for r in runs] == [str(flow_run.id)]
                assert runs[0].state.is_completed()
                pool_info = client.read_work_pool(pool)
                assert pool_info.type == "process"
        # the stage's real outputs, written by the worker's flow-run process
        assert (tmp_path / "work" / "validated" / "products.parquet").is_file()
        assert (tmp_path / "work" / "metrics" / "validate.json").is_file()
    finally:
        team_servers.stop_pid(worker.pid)
