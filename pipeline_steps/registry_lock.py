"""A promotion lock that holds across processes *and machines* sharing one model registry.

promote() reads the champion, compares and moves the alias: two pipelines doing that at once
against one MLflow server could both compare with the old champion and both "win". The
comparison and the alias move therefore run under `promotion_lock(name)`, chosen from where
the registry lives:

- **PostgreSQL advisory lock** (`pg_advisory_lock(key)` on a session of the tracking database)
  when ``params.yaml: team.lock_database_url`` or ``MLFLOW_REGISTRY_LOCK_DB`` names that database
  (``postgresql://…``), or when the tracking URI itself is one. PostgreSQL releases it when the
  session ends, so a crashed holder never blocks the others.
- **A lock entry in the registry itself** for an ``http(s)://`` MLflow server whose database the
  client cannot reach: ``create_registered_model("<name>.promotion-lock")`` succeeds for exactly
  one caller (the registry's unique name constraint, enforced by the server's database, is the
  compare-and-set); the others wait and retry. The entry records its holder and lease; one older
  than ``lock_lease_s`` (its holder died) is broken. Released by deleting it.
- **A file lock** beside an SQLite store (one machine), as before.

After the alias move the caller re-reads it (`verify_alias`) and logs what it found.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

logger = logging.getLogger(__name__)

LOCK_DB_ENV = "MLFLOW_REGISTRY_LOCK_DB"
LOCK_SUFFIX = ".promotion-lock"
LOCK_KEYS = ("lock_database_url", "lock_timeout_s", "lock_lease_s")  # params.yaml `team.lock_*`


class PromotionLockTimeout(RuntimeError):
    """The promotion lock was not obtained within the timeout."""


def lock_settings(params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`team.lock_*` from params.yaml (the project's file when `params` is None; the schema requires them)."""
    if params is None:
        from pipeline_steps.config import load_params

        params = load_params()
    team = params["team"]
    return {key: team[key] for key in LOCK_KEYS}


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a registered model name."""
    digest = hashlib.sha256(f"mlflow-promotion:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_kind(tracking_uri: str, database_url: str | None) -> str:
    if database_url or tracking_uri.startswith(("postgresql", "postgres:")):
        return "postgres"
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return "registry"
    return "file"


@contextlib.contextmanager
def promotion_lock(name: str, tracking_uri: str | None = None, database_url: str | None = None,
                   timeout_s: float | None = None, lease_s: float | None = None,
                   params: Mapping[str, Any] | None = None) -> Iterator[str]:
    """Hold the promotion lock of registered model `name`; yields the kind of lock used."""
    import mlflow

    settings = lock_settings(params)
    uri = tracking_uri or mlflow.get_tracking_uri()
    database_url = database_url or os.environ.get(LOCK_DB_ENV) or settings["lock_database_url"]
    if not database_url and uri.startswith(("postgresql", "postgres:")):
        database_url = uri
    timeout_s = float(timeout_s if timeout_s is not None else settings["lock_timeout_s"])
    lease_s = float(lease_s if lease_s is not None else settings["lock_lease_s"])
    kind = lock_kind(uri, database_url)
    started = time.monotonic()
    if kind == "postgres":
        manager = _advisory_lock(str(database_url), name, timeout_s)
    elif kind == "registry":
        manager = _registry_lock(name, uri, timeout_s, lease_s)
    else:
        manager = _file_lock(uri)
    with manager:
        logger.info("promotion lock on %s taken (%s) after %.2fs", name, kind, time.monotonic() - started)
        yield kind


def _plain_postgres_url(url: str) -> str:
    """SQLAlchemy-style `postgresql+driver://` -> libpq's `postgresql://`."""
    scheme, sep, rest = url.partition("://")
    return "postgresql" + sep + rest if scheme.startswith("postgres") else url


@contextlib.contextmanager
def _advisory_lock(database_url: str, name: str, timeout_s: float) -> Iterator[None]:
    import psycopg2

    connection = psycopg2.connect(_plain_postgres_url(database_url), connect_timeout=10,
                                  application_name="marketplace-promotion-lock")
    connection.autocommit = True
    key = lock_key(name)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = %s", (f"{int(timeout_s * 1000)}ms",))
            try:
                cursor.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg2.errors.LockNotAvailable as exc:
                raise PromotionLockTimeout(f"promotion lock of {name} not obtained within {timeout_s:.0f}s") from exc
        try:
            yield
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        connection.close()  # ends the session: PostgreSQL drops any lock it still held


@contextlib.contextmanager
def _registry_lock(name: str, tracking_uri: str, timeout_s: float, lease_s: float) -> Iterator[None]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    lock_name = name + LOCK_SUFFIX
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            client.create_registered_model(
                lock_name,
                tags={"lock_holder": holder, "lock_expires": repr(time.time() + lease_s)},
                description=f"promotion lock of {name} (pipeline_steps/registry_lock.py); deleted when released",
            )
            break
        except MlflowException as exc:
            if not lock_is_taken(exc):
                raise
        _break_if_stale(client, lock_name)
        if time.monotonic() >= deadline:
            raise PromotionLockTimeout(f"promotion lock of {name} ({lock_name}) not obtained within {timeout_s:.0f}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    try:
        yield
    finally:
        try:
            current = client.get_registered_model(lock_name)
            if (current.tags or {}).get("lock_holder") == holder:
                client.delete_registered_model(lock_name)
            else:
                logger.warning("promotion lock %s was broken while held by %s", lock_name, holder)
        except MlflowException:
            logger.warning("promotion lock %s vanished while held by %s", lock_name, holder)


def lock_is_taken(error: Exception) -> bool:
    """Whether creating the lock entry failed because another holder has it (or had it a moment ago).

    The plain answer is RESOURCE_ALREADY_EXISTS. But MLflow's SQL store, on the unique-name
    violation, reads the existing model back to word its message; when the holder deletes its
    entry in between (it just released the lock), that read fails with RESOURCE_DOES_NOT_EXIST
    (seen with two concurrent registers on PostgreSQL). Either way the lock was taken: try again.
    """
    code = str(getattr(error, "error_code", ""))
    return "RESOURCE_ALREADY_EXISTS" in code or "RESOURCE_DOES_NOT_EXIST" in code or "already exists" in str(error).lower()


def _break_if_stale(client: Any, lock_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_registered_model(lock_name)
    except MlflowException:
        return  # released meanwhile
    try:
        expires = float((current.tags or {}).get("lock_expires", "inf"))
    except ValueError:
        expires = float("inf")
    if time.time() > expires:
        logger.warning("breaking stale promotion lock %s (holder %s)", lock_name, (current.tags or {}).get("lock_holder"))
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock_name)


def _file_lock(tracking_uri: str) -> contextlib.AbstractContextManager[None]:
    """The local SQLite store's own lock file (pipeline_steps/tracking.py: store_lock): one lock, not two."""
    from pipeline_steps.tracking import store_lock

    return store_lock(tracking_uri)


def verify_alias(client: Any, name: str, alias: str, expected_version: str) -> bool:
    """Re-read `alias` after moving it: True when it still points at `expected_version`."""
    from mlflow.exceptions import MlflowException

    try:
        current = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        current = None
    if current != str(expected_version):
        logger.warning("re-check: %s@%s is version %s, expected %s (another writer moved it without the lock)",
                       name, alias, current, expected_version)
        return False
    return True
