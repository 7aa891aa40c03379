"""dvc.yaml lists, for every stage, exactly the project code its command imports (tools/stage_deps.py).

A stage whose deps miss a module it runs is not re-run by `dvc repro` when that module
changes, and leaves a stale output (the index stage once missed inference.py, registry.py,
mlflow_models.py and flows/tracking.py). The deps are therefore computed from each stage's
import closure; these tests fail as soon as a new, split or moved module is not listed.
Fix: `.venv/bin/python -m tools.stage_deps --write`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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


def test_check_names_missing_and_stale_code_deps_and_write_fixes_them(fake_project: Path) -> None:
    (fake_project / "bentofile.yaml").write_text("service: x\n")
    (fake_project / "dvc.yaml").write_text(textwrap.dedent("""\
        # top comment kept
        stages:
          build:
            # stage comment kept
            cmd: python -m app.main
            deps:
              - ${data.dir}
              - app/main.py
              - app/unused.py
              - bentofile.yaml
              - steps
            params:
              - data
            outs:
              - ${out.dir}
          other:
            cmd: echo no python here
            deps:
              - whatever.py
    """))
    loaded = stage_deps.load(fake_project / "dvc.yaml")
    found = "\n".join(stage_deps.problems(loaded, fake_project))
    assert "stage build: deps miss app/__init__.py, app/common.py" in found
    assert "steps/" not in found.split("deps list")[0]  # the listed `steps` folder covers steps/*.py
    assert "stage build: deps list app/unused.py, which it does not import" in found
    assert "other" not in found  # a command running no project module is left alone

    assert stage_deps.main(["--dvc-file", str(fake_project / "dvc.yaml"), "--root", str(fake_project)]) == 1
    assert stage_deps.main(["--write", "--dvc-file", str(fake_project / "dvc.yaml"), "--root", str(fake_project)]) == 0
    text = (fake_project / "dvc.yaml").read_text()
    assert text.startswith("# top comment kept\n") and "    # stage comment kept\n" in text
    rewritten = stage_deps.load(fake_project / "dvc.yaml")
    assert stage_deps.problems(rewritten, fake_project) == []
    assert list(rewritten["stages"]["build"]["deps"]) == [
        "${data.dir}", "bentofile.yaml", "steps",
        "app/__init__.py", "app/common.py", "app/deep/__init__.py", "app/deep/leaf.py", "app/main.py", "app/sibling.py",
    ]
    assert list(rewritten["stages"]["build"]["params"]) == ["data"] and list(rewritten["stages"]["build"]["outs"]) == ["${out.dir}"]
    assert list(rewritten["stages"]["other"]["deps"]) == ["whatever.py"]
    before = text
    assert stage_deps.main(["--write", "--dvc-file", str(fake_project / "dvc.yaml"), "--root", str(fake_project)]) == 0
    assert (fake_project / "dvc.yaml").read_text() == before  # idempotent


# --------------------------------------------------------------------------- the project's dvc.yaml


def test_every_stage_lists_the_project_code_it_imports() -> None:
    """Fails on the dvc.yaml before issue 10 (index without inference.py, register without evaluation.py, ...)."""
    found = stage_deps.problems(stage_deps.load(DVC_YAML), ROOT)
    assert found == [], "dvc.yaml deps differ from the stages' imports:\n" + "\n".join(found) + (
        f"\nfix: {stage_deps.WRITE_COMMAND}"
    )


def test_the_closures_hold_the_modules_the_issue_found_missing() -> None:
    """The rule itself sees what the hand-kept lists missed (whatever dvc.yaml says)."""
    closures = {name: deps.closure for name, deps in stage_deps.stage_deps(stage_deps.load(DVC_YAML), ROOT).items()}
    assert set(closures) >= {"validate", "clean", "train_sklearn", "train_image", "train_text", "train_multimodal",
                             "evaluate", "register", "index", "package"}
    assert {"pipeline_steps/inference.py", "pipeline_steps/mlflow_models.py"} <= closures["index"]
    assert {"pipeline_steps/evaluation.py", "pipeline_steps/inference.py"} <= closures["register"]
    for name, closure in closures.items():
        assert {"flows/common.py", "flows/__init__.py", "pipeline_steps/runtime_env.py"} <= closure, name


@pytest.mark.integration
def test_write_on_a_copy_changes_only_code_deps(tmp_path: Path) -> None:
    """`--write` keeps cmd, params, outs, metrics, plots, data deps and comments of the real dvc.yaml."""
    copy = tmp_path / "dvc.yaml"
    shutil.copy(DVC_YAML, copy)
    original = stage_deps.load(copy)
    done = subprocess.run([sys.executable, "-m", "tools.stage_deps", "--write", "--dvc-file", str(copy)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rewritten = stage_deps.load(copy)
    assert stage_deps.problems(rewritten, ROOT) == []
    assert list(rewritten["stages"]) == list(original["stages"])
    for name, stage in original["stages"].items():
        new = rewritten["stages"][name]
        for key in set(stage) | set(new):
            if key != "deps":
                assert new.get(key) == stage.get(key), (name, key)
        kept = [dep for dep in stage.get("deps", []) if not stage_deps.is_code_dep(stage_deps._dep_name(dep))]
        assert [dep for dep in new.get("deps", []) if not stage_deps.is_code_dep(stage_deps._dep_name(dep))] == kept, name
    original_comments = [line.strip() for line in DVC_YAML.read_text().splitlines() if line.strip().startswith("#")]
    assert [line.strip() for line in copy.read_text().splitlines() if line.strip().startswith("#")] == original_comments


def test_neural_train_stages_list_the_train_level_knobs_their_loop_reads() -> None:
    """`train.grad_clip` and `train.label_smoothing` (issue 10: once code defaults) change what is
    learned, so changing them must re-run every neural train stage."""
    import yaml

    from pipeline_steps.model_kinds import NEURAL_KINDS

    stages = yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))["stages"]
    for kind in NEURAL_KINDS:
        listed = set(stages[f"train_{kind}"]["params"])
        missing = {"train.seed", "train.lr_schedule", "train.grad_clip", "train.label_smoothing", f"train.{kind}"} - listed
        assert not missing, f"dvc.yaml stage train_{kind} does not list {sorted(missing)} in its params"
