"""dvc.yaml re-runs every stage exactly when the project code its command can run changes (tools/stage_deps.py).

A stage whose deps miss a module it runs is not re-run by `dvc repro` when that module
changes, and leaves a stale output (the index stage once missed inference.py, registry.py,
mlflow_models.py and flows/tracking.py). The code is therefore computed from each stage's
import closure, and each stage depends on its closure's fingerprint, written by the `code` stage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tools import stage_deps

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = ROOT / "dvc.yaml"


# --------------------------------------------------------------------------- the rule, on a small fake project


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


@pytest.fixture
def fake_project(tmp_path: Path) -> Path:
    return write_tree(tmp_path, {
        "app/__init__.py": "from steps import env\n",
        "app/main.py": """
            from __future__ import annotations
            import json
            from typing import TYPE_CHECKING
            from app.common import helper
            from steps import cleaning
            if TYPE_CHECKING:
                from steps.heavy_types import Big
            else:
                from steps import runtime_only

            def run():
                from steps.lazy import go   # a lazy import inside a function still runs
                import numpy                # third party: not a project file
                return go()

            class Flow:
                def method(self):
                    import importlib
                    return importlib.import_module("steps.dynamic")
        """,
        "app/common.py": "from . import sibling\nfrom .deep.leaf import thing\n",
        "app/sibling.py": "",
        "app/deep/__init__.py": "",
        "app/deep/leaf.py": "thing = 1\n",
        "app/unused.py": "import steps.never\n",
        "steps/__init__.py": "",
        "steps/env.py": "",
        "steps/cleaning.py": "from steps.errors import DataError\n",
        "steps/errors.py": "class DataError(Exception): ...\n",
        "steps/lazy.py": "def go(): return 1\n",
        "steps/heavy_types.py": "",
        "steps/runtime_only.py": "",
        "steps/dynamic.py": "",
        "steps/never.py": "",
    })


def test_closure_follows_every_import_that_can_run(fake_project: Path) -> None:
    closure = stage_deps.import_closure(["app.main"], fake_project)
    assert closure == {
        "app/__init__.py", "app/main.py", "app/common.py", "app/sibling.py", "app/deep/__init__.py",
        "app/deep/leaf.py", "steps/__init__.py", "steps/env.py", "steps/cleaning.py", "steps/errors.py",
        "steps/lazy.py", "steps/runtime_only.py", "steps/dynamic.py",
    }
    # never imported, imported only for type checkers, third party: not deps
    assert not closure & {"app/unused.py", "steps/never.py", "steps/heavy_types.py"}


def test_stage_commands_name_their_entry_module(fake_project: Path) -> None:
    assert stage_deps.entry_modules("python -m app.main --model image", fake_project) == ["app.main"]
    assert stage_deps.entry_modules("python app/main.py", fake_project) == ["app.main"]
    assert stage_deps.entry_modules(["python -m app.main", "python -m app.unused"], fake_project) == ["app.main", "app.unused"]
    assert stage_deps.entry_modules("dvc exp show", fake_project) == []


FAKE_DVC_YAML = """\
stages:
  code:
    cmd: python -m tools.stage_deps --fingerprints fp app.main
    deps:
      - app
      - steps
      - tools
    outs:
      - fp:
          cache: false
  build:
    cmd: python -m app.main
    deps:
      - src.txt
      - fp/app.main.txt
    outs:
      - out.txt
"""


def copy_tool(project: Path) -> Path:
    """The fake project's own tools/stage_deps.py (the `code` stage runs it there, as here)."""
    (project / "tools").mkdir(exist_ok=True)
    shutil.copy(ROOT / "tools" / "__init__.py", project / "tools" / "__init__.py")
    shutil.copy(ROOT / "tools" / "stage_deps.py", project / "tools" / "stage_deps.py")
    return project


def test_a_fingerprint_changes_exactly_when_a_file_of_its_closure_does(fake_project: Path, tmp_path: Path) -> None:
    before = stage_deps.fingerprint_text("app.main", fake_project)
    assert "steps/lazy.py" in before and "app/unused.py" not in before and "steps/never.py" not in before
    (fake_project / "app" / "unused.py").write_text("import steps.never\nx = 2\n")
    (fake_project / "steps" / "never.py").write_text("y = 3\n")
    assert stage_deps.fingerprint_text("app.main", fake_project) == before  # not executed by app.main
    (fake_project / "steps" / "lazy.py").write_text("def go(): return 2\n")
    after = stage_deps.fingerprint_text("app.main", fake_project)
    assert after != before
    changed = set(after.splitlines()) - set(before.splitlines())
    assert [line.split()[1] for line in changed] == ["steps/lazy.py"]

    written = stage_deps.write_fingerprints(tmp_path / "fp", ["app.main"], fake_project)
    assert [path.name for path in written] == ["app.main.txt"] and written[0].read_text() == after
    assert sorted(path.name for path in (tmp_path / "fp").iterdir()) == ["app.main.txt"]  # no temporary left


def test_an_unknown_module_is_an_error_naming_it(fake_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert stage_deps.main(["--root", str(fake_project), "--fingerprints", "fp", "app.nope"]) == 2
    assert "'app.nope' is not a module of" in capsys.readouterr().err
    assert not (fake_project / "fp" / "app.nope.txt").exists()


def test_check_names_each_way_a_stage_would_miss_a_code_change(fake_project: Path) -> None:
    copy_tool(fake_project)
    good = yaml.safe_load(FAKE_DVC_YAML)
    assert stage_deps.problems(good, fake_project) == []

    bad = yaml.safe_load(FAKE_DVC_YAML)
    bad["stages"]["build"]["deps"] = ["src.txt", "app/main.py"]  # the old way: files, no fingerprint
    bad["stages"]["other"] = {"cmd": "python -m app.unused", "deps": ["fp/app.unused.txt"]}
    bad["stages"]["code"]["deps"] = ["app", "tools"]
    bad["stages"]["code"]["outs"] = []
    found = "\n".join(stage_deps.problems(bad, fake_project))
    assert "stage build: deps miss fp/app.main.txt" in found
    assert "stage build: deps list app/main.py; its fingerprint covers the code it runs" in found
    assert "stage code: does not fingerprint app.unused, which stage other runs" in found
    assert "stage code: outs miss fp" in found
    assert "stage code: deps miss steps/__init__.py, steps/cleaning.py" in found  # `steps` no longer listed

    del bad["stages"]["code"]
    assert stage_deps.problems(bad, fake_project) == [
        "no stage runs `python -m tools.stage_deps --fingerprints <folder> <module> ...`"
    ]
    assert stage_deps.problems({"stages": {"other": {"cmd": "echo no python here"}}}, fake_project) == []


def _dvc(project: Path, *args: str) -> str:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([str(bin_dir / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.integration
def test_dvc_reruns_a_stage_exactly_when_a_file_it_runs_changes(fake_project: Path) -> None:
    """Real git + dvc on the fake project wired as dvc.yaml is: edits outside the closure (or in
    __pycache__) re-run only the `code` stage; an edit inside it re-runs the stage."""
    project = copy_tool(fake_project)
    (project / "app" / "common.py").write_text((project / "app" / "common.py").read_text() + "helper = 1\n")
    (project / "app" / "main.py").write_text((project / "app" / "main.py").read_text() + textwrap.dedent("""
        if __name__ == "__main__":
            from pathlib import Path
            Path("out.txt").write_text(Path("src.txt").read_text() + str(run()))
    """))
    (project / "src.txt").write_text("data ")
    (project / "dvc.yaml").write_text(FAKE_DVC_YAML)
    (project / ".dvcignore").write_text((ROOT / ".dvcignore").read_text())
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    _dvc(project, "init", "-q")
    _dvc(project, "config", "core.analytics", "false")

    first = _dvc(project, "repro")
    assert "Running stage 'code'" in first and "Running stage 'build'" in first
    assert (project / "out.txt").read_text() == "data 1"
    assert "Running stage" not in _dvc(project, "repro")  # nothing changed

    (project / "app" / "__pycache__").mkdir(exist_ok=True)
    (project / "app" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"new bytecode")
    assert "Running stage" not in _dvc(project, "repro")  # .dvcignore: bytecode is not code

    (project / "app" / "unused.py").write_text("x = 1\n")  # in a code folder, not run by `build`
    second = _dvc(project, "repro")
    assert "Running stage 'code'" in second and "Running stage 'build'" not in second
    assert "Running stage" not in _dvc(project, "repro")

    (project / "steps" / "lazy.py").write_text("def go(): return 2\n")  # run by `build`, lazily
    third = _dvc(project, "repro")
    assert "Running stage 'build'" in third
    assert (project / "out.txt").read_text() == "data 2"


# --------------------------------------------------------------------------- the project's dvc.yaml


def test_every_stage_reruns_when_the_code_it_runs_changes() -> None:
    found = stage_deps.problems(stage_deps.load(DVC_YAML), ROOT)
    assert found == [], "dvc.yaml would miss a code change:\n" + "\n".join(found)


def test_the_closures_hold_the_modules_the_issue_found_missing() -> None:
    """The rule itself sees what the hand-kept lists missed (the index stage once lacked inference.py, ...)."""
    modules = stage_deps.stage_modules(stage_deps.load(DVC_YAML), ROOT)
    assert set(modules) >= {"validate", "clean", "train_sklearn", "train_image", "train_text", "train_multimodal",
                            "evaluate", "register", "index", "package"}
    closures = {name: stage_deps.import_closure(entries, ROOT) for name, entries in modules.items()}
    assert {"pipeline_steps/inference.py", "pipeline_steps/mlflow_models.py"} <= closures["index"]
    assert {"pipeline_steps/evaluation.py", "pipeline_steps/inference.py"} <= closures["register"]
    for name, closure in closures.items():
        assert {"flows/common.py", "flows/__init__.py", "pipeline_steps/runtime_env.py"} <= closure, name


def test_neural_train_stages_list_the_train_level_knobs_their_loop_reads() -> None:
    """`train.grad_clip` and `train.label_smoothing` (issue 10: once code defaults) change what is
    learned, so changing them must re-run every neural train stage."""

    from pipeline_steps.model_kinds import NEURAL_KINDS

    stages = yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))["stages"]
    for kind in NEURAL_KINDS:
        listed = set(stages[f"train_{kind}"]["params"])
        missing = {"train.seed", "train.lr_schedule", "train.grad_clip", "train.label_smoothing", f"train.{kind}"} - listed
        assert not missing, f"dvc.yaml stage train_{kind} does not list {sorted(missing)} in its params"
