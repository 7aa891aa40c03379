"""Thin Prefect flows: one per pipeline stage plus the end-to-end `pipeline` flow.

Each module is runnable (`python -m flows.<stage>`); dvc.yaml calls exactly these.

Importing this package applies the project's process environment (offline switches,
Prefect's home and start-up timeout) *before* any flow module imports Prefect, MLflow
or BentoML, which read their settings at import time (see pipeline_steps/runtime_env.py).

Then, when a stage runner is serving (MARKETPLACE_STAGE_RUNNER, set by flows.prefect_server),
`python -m flows.<stage>` hands itself over to it and exits with the stage's code, without
importing anything heavy here (flows/stage_client.py, flows/stage_runner.py).
"""

from flows import stage_client as _stage_client
from pipeline_steps import runtime_env as _runtime_env

_runtime_env.apply()
_stage_client.hand_over_if_served()
