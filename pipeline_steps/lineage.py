"""Lineage: which code and which data a run came from, as MLflow run tags.

`run_tags` gives the git commit (and whether the checkout had uncommitted changes) and the
version of the raw export: the md5 DVC recorded for it (`data/raw.dvc`, else `dvc.lock`),
else a content hash, so a run trained on an export that was never `dvc add`ed still says
which data it saw. Plain functions: no MLflow here, the tracking module sets the tags.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline_steps.config import resolve_path

logger = logging.getLogger(__name__)


def run_tags(root: str | Path, raw_dir: str | Path) -> dict[str, str]:
    """Tags that tie a run to its code and data: git commit/dirty state and the raw data version."""
    root = Path(root)
    raw_path = resolve_path(raw_dir, root)
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain") if commit is not None else None
    version, source = data_version(root, raw_path)
    return {
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status.strip())).lower(),
        "dvc_data_version": version,
        "dvc_data_version_source": source,
        "raw_dir": _display_path(raw_path, root),
    }


def data_version(root: str | Path, raw_path: str | Path) -> tuple[str, str]:
    """(version, source): the md5 DVC recorded for the raw directory, else a cheap content hash."""
    root = Path(root)
    raw_path = resolve_path(raw_path, root)
    md5 = _md5_from_dvc_file(raw_path)
    if md5:
        return md5, "dvc-file"
    md5 = _md5_from_dvc_lock(root, raw_path)
    if md5:
        return md5, "dvc.lock"
    if not raw_path.is_dir():
        return "unknown", "missing"
    return "content-sha256:" + raw_content_hash(raw_path), "content-hash"


def raw_content_hash(raw_path: str | Path) -> str:
    """sha256 of the top-level CSV files' bytes plus the image files' names and sizes."""
    raw_path = Path(raw_path)
    digest = hashlib.sha256()
    for csv_path in sorted(raw_path.glob("*.csv")):
        digest.update(f"csv:{csv_path.name}\n".encode())
        with csv_path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    images_dir = raw_path / "images"
    if images_dir.is_dir():
        listing = []
        for dirpath, _dirnames, filenames in os.walk(images_dir):
            for filename in filenames:
                full = Path(dirpath) / filename
                listing.append(f"{full.relative_to(images_dir).as_posix()}\t{full.stat().st_size}")
        for line in sorted(listing):
            digest.update(f"img:{line}\n".encode())
    return digest.hexdigest()


def _md5_from_dvc_file(raw_path: Path) -> str | None:
    dvc_file = raw_path.with_name(raw_path.name + ".dvc")
    if not dvc_file.is_file():
        return None
    data = _read_yaml(dvc_file)
    for out in (data or {}).get("outs") or []:
        if isinstance(out, Mapping) and _same_path(dvc_file.parent / str(out.get("path", "")), raw_path):
            return _md5_of(out)
    return None


def _md5_from_dvc_lock(root: Path, raw_path: Path) -> str | None:
    lock_file = root / "dvc.lock"
    if not lock_file.is_file():
        return None
    data = _read_yaml(lock_file) or {}
    stages = data.get("stages") if isinstance(data, Mapping) else None
    for stage in (stages or {}).values():
        if not isinstance(stage, Mapping):
            continue
        for entry in list(stage.get("outs") or []) + list(stage.get("deps") or []):
            if isinstance(entry, Mapping) and _same_path(root / str(entry.get("path", "")), raw_path):
                md5 = _md5_of(entry)
                if md5:
                    return md5
    return None


def _md5_of(entry: Mapping[str, Any]) -> str | None:
    value = entry.get("md5") or entry.get("etag") or entry.get("checksum")
    return str(value) if value else None


def _read_yaml(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as error:
        logger.warning("could not read %s: %s", path, error)
        return None


def _same_path(a: Path, b: Path) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def _display_path(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
