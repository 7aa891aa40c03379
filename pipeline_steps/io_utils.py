"""Atomic writes: a crash never leaves a half-written file that a later stage trusts.

Everything is written to a temporary sibling first and moved into place with
os.replace, which is atomic on one filesystem. Directories are swapped the same
way, so a reader sees either the old complete directory or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_steps.faults import crash_point


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; move it onto `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared files
        crash_point(f"replace:{target.name}")
        os.replace(tmp_path, target)
        crash_point(f"replaced:{target.name}")
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` as a whole on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=target.parent))
    try:
        yield tmp_dir
        os.chmod(tmp_dir, 0o777 & ~_UMASK)
        crash_point(f"swap:{target.name}")
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp_dir, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, target)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


TMP_SUFFIX = ".tmp"


def link_or_copy(src: str, dst: str) -> str:
    """`shutil.copytree`'s copy_function: a hard link where the filesystem allows one, else a copy.

    For trees written once and never edited in place (model files the serving bundle and
    the BentoML store repeat): no second copy of 200+ MB on disk, and DVC, which keys the
    hashes it has computed by inode, does not hash the same bytes again (BENCHMARKS.md,
    "Orchestration overhead"). Across filesystems, or where links are refused, it copies.

    Args:
        src: the file to repeat.
        dst: where it appears.

    Returns:
        dst, as copytree expects.
    """
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def sweep_stale(target: str | Path) -> list[Path]:
    """Remove what a killed writer of `target` left beside it; return what was removed.

    atomic_path/atomic_dir name their temporaries `.<name>.<pid>.<random>.tmp` (and the
    directory being replaced `.<name>.old-<pid>`). Those of a process that no longer runs are
    garbage from a crash (SIGKILL skips the cleanup); those of a live process are left alone,
    so concurrent writers never delete each other's work. Nothing ever reads them.
    """
    target = Path(target)
    removed = []
    try:
        siblings = list(target.parent.glob(f".{glob_escape(target.name)}.*"))
    except OSError:
        return removed
    for path in siblings:
        rest = path.name[len(target.name) + 2:]
        if rest.startswith("old-"):
            pid_text = rest[4:]
        elif rest.endswith(TMP_SUFFIX):
            pid_text = rest.split(".", 1)[0]
        else:
            continue
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{char}]" if char in "*?[" else char for char in name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | Path, payload: Any) -> Path:
    """Pretty, key-sorted JSON so DVC metrics and manifests diff cleanly in git."""
    return write_text(target, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    with Path(path).open(encoding="utf-8") as handle:
        return json.load(handle)


def write_parquet(frame: pd.DataFrame, target: str | Path) -> Path:
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(target)


def write_csv(frame: pd.DataFrame, target: str | Path) -> Path:
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(target)


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    """Make numpy scalars and paths JSON-serialisable without surprising the reader."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serialisable")
