"""Thin Prefect flows: one per pipeline stage plus the end-to-end `pipeline` flow.

Each module is runnable (`python -m flows.<stage>`); dvc.yaml calls exactly these.
"""
