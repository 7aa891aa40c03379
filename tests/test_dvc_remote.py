"""The DVC remote round trip: push, clone fresh, pull, and `dvc repro` has nothing to do.

A small DVC project (a tracked raw folder + one stage) in a temporary git repository with a
local-folder remote, the same commands `make push` / `make pull` run. Plus: the project's own
.dvc/config names a default remote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_steps.config import PROJECT_ROOT

DVC = str(Path(sys.executable).with_name("dvc"))
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("git") is None or not Path(DVC).exists(), reason="git or dvc not installed"),
]

STAGE = {
    "stages": {
        "count": {
            "cmd": "python -c \"import pathlib; n=len(list(pathlib.Path('data/raw').iterdir())); "
                   "pathlib.Path('out').mkdir(exist_ok=True); pathlib.Path('out/count.txt').write_text(str(n))\"",
            "deps": ["data/raw"],
            "outs": ["out"],
        }
    }
}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout + result.stderr


def test_push_clone_pull_then_repro_is_a_no_op(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    origin, remote, clone = tmp_path / "origin", tmp_path / "remote", tmp_path / "clone"
    origin.mkdir()
    _run(["git", "init", "-q", "-b", "main"], origin, env)
    _run([DVC, "init", "-q"], origin, env)
    raw = origin / "data" / "raw"
    raw.mkdir(parents=True)
    for i in range(3):
        (raw / f"photo{i}.jpg").write_bytes(os.urandom(2048))
    (raw / "Products.csv").write_text("id,product_name\n1,chair\n")
    _run([DVC, "add", "data/raw"], origin, env)
    (origin / "dvc.yaml").write_text(yaml.safe_dump(STAGE))
    _run([DVC, "repro"], origin, env)
    _run([DVC, "remote", "add", "-d", "storage", str(remote)], origin, env)
    _run(["git", "add", "-A"], origin, env)
    _run(["git", "commit", "-q", "-m", "data + stage"], origin, env)
    _run([DVC, "push"], origin, env)
    assert any(remote.rglob("*")), "nothing was pushed"

    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    assert not (clone / "data" / "raw").exists()
    _run([DVC, "pull"], clone, env)
    assert sorted(p.name for p in (clone / "data" / "raw").iterdir()) == sorted(p.name for p in raw.iterdir())
    assert (clone / "data" / "raw" / "photo1.jpg").read_bytes() == (raw / "photo1.jpg").read_bytes()
    assert (clone / "out" / "count.txt").read_text() == "4"
    status = _run([DVC, "status"], clone, env)
    assert "up to date" in status
    repro = _run([DVC, "repro"], clone, env)
    assert "didn't change" in repro and "Running stage" not in repro


def test_project_names_a_default_remote():
    config = (PROJECT_ROOT / ".dvc" / "config").read_text()
    assert "remote = " in config and '[\'remote "' in config
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert "dvc push" in makefile and "dvc pull" in makefile
