"""Thin Prefect flows: one per pipeline stage plus the end-to-end `pipeline` flow.

Each module is runnable (`python -m flows.<stage>`); dvc.yaml calls exactly these.

Importing this package applies the project's process environment (offline switches,
Prefect's home and start-up timeout) *before* any flow module imports Prefect, MLflow
or BentoML, which read their settings at import time (see pipeline_steps/runtime_env.py).
"""

from pipeline_steps import runtime_env as _runtime_env

_runtime_env.apply()
