"""The code each DVC stage runs, computed from its imports, and a check that dvc.yaml lists it.

`dvc repro` re-runs a stage only when one of its `deps` changed, so a stage whose `deps`
miss a module it imports keeps a stale output after that module changed. Hand-kept lists
drift (the index stage once missed inference.py, registry.py, mlflow_models.py and
flows/tracking.py), so the rule here is computed:

    a stage's code deps = the project modules its command can execute, i.e. the import
    closure of the module its `cmd` runs (`python -m flows.X`, or `python path/to/file.py`).

The closure is found statically with `ast`, so nothing is imported (no torch, no Prefect):

- every `import` / `from ... import` anywhere in a module counts, including the lazy ones
  inside functions (a stage imports torch or MLflow only on the path that needs it, but a
  change to that code changes its output all the same);
- `importlib.import_module("literal")` counts too;
- imports under `if TYPE_CHECKING:` do not (they never run);
- importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so those count;
- only files of this repository count (third-party packages are pinned by the lock file).

The closure over-approximates on purpose: all four `flows.train` stages get the modules of
every `--model`, because which branch a flag takes is not visible statically. A needless
re-run costs time; a missing dep gives a stale model.

Only `*.py` entries of a stage's `deps` are "code deps". Data deps (`${data.clean_dir}`, ...),
other files (`bentofile.yaml`) and directories (`service`, which also covers every module
under it) are left as they are.

    .venv/bin/python -m tools.stage_deps            # check dvc.yaml; exit 1 naming what is missing/extra
    .venv/bin/python -m tools.stage_deps --write    # rewrite the code deps of dvc.yaml from the closures

`--write` keeps everything else of dvc.yaml (comments, order, params, outs, cmd) as it is
(ruamel.yaml round-trip); the code deps follow the other deps, sorted. tests/test_dvc_deps.py
fails whenever a stage's deps miss a module of its closure or list one it no longer runs, and
says to run `--write`.
"""

from __future__ import annotations

import argparse
import ast
import io
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DVC_FILE = "dvc.yaml"
WRITE_COMMAND = ".venv/bin/python -m tools.stage_deps --write"


# --------------------------------------------------------------------------- modules and imports


def module_file(module: str, root: Path) -> Path | None:
    """The file of a project module (`a.b` -> root/a/b.py or root/a/b/__init__.py), else None."""
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute module of `from <level dots><name> import ...` written in `module` (at `path`)."""
    package = module if _is_package(path) else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return ".".join(part for part in (package, name) if part)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterable[ast.AST]:
    """Every node of the tree except the bodies of `if TYPE_CHECKING:` blocks (they never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(module: str, path: Path) -> set[str]:
    """Absolute names a module imports anywhere (module level, functions, methods), as written.

    `from a.b import c` gives both `a.b` and `a.b.c` (c may be a submodule); which of them
    are project modules is decided by the caller.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, path, node.level, node.module) if node.level else (node.module or "")
            if base:
                names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and _is_import_module_call(node):
            names.add(node.args[0].value)  # type: ignore[attr-defined]
    return names


def _is_import_module_call(node: ast.Call) -> bool:
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return (
        called == "import_module"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def _with_parents(module: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`, `a.b.c`]: importing a module runs its packages' __init__ first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(entry_modules: Iterable[str], root: Path = ROOT) -> set[str]:
    """Repository-relative POSIX paths of every project file the entry modules can execute."""
    root = Path(root)
    seen: dict[str, Path] = {}
    todo = [parent for module in entry_modules for parent in _with_parents(module)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = module_file(module, root)
        if path is None:
            continue
        seen[module] = path
        for name in imported_names(module, path):
            todo.extend(parent for parent in _with_parents(name) if parent not in seen)
    return {path.relative_to(root).as_posix() for path in seen.values()}


# --------------------------------------------------------------------------- stages


def entry_modules(cmd: str | Sequence[str], root: Path = ROOT) -> list[str]:
    """The project modules a stage command runs: `python -m pkg.mod ...` or `python path/file.py ...`.

    A command can be a list of commands (dvc allows it) or hold several joined with `&&`.
    """
    commands = [cmd] if isinstance(cmd, str) else list(cmd)
    modules: list[str] = []
    for command in commands:
        words = shlex.split(command, posix=True)
        for i, word in enumerate(words):
            if word == "-m" and i + 1 < len(words):
                modules.append(words[i + 1])
            elif word.endswith(".py") and (root / word).is_file():
                modules.append(".".join(Path(word).with_suffix("").parts))
    return [module for module in modules if module_file(module, root) is not None]


def _dep_name(dep: Any) -> str:
    """A `deps` entry is a plain string (a mapping form `{path: {...}}` names it as its only key)."""
    return next(iter(dep)) if isinstance(dep, Mapping) else str(dep)


def is_code_dep(name: str) -> bool:
    """A dep this tool owns: a Python file of the repository (not interpolated)."""
    return name.endswith(".py") and "${" not in name


def _covered(path: str, directories: Sequence[str]) -> bool:
    return any(path.startswith(directory.rstrip("/") + "/") for directory in directories)


@dataclass
class StageDeps:
    """What one stage runs and what dvc.yaml lists for it."""

    name: str
    closure: set[str]
    listed: list[str]
    directories: list[str] = field(default_factory=list)

    @property
    def wanted(self) -> list[str]:
        """The code deps the stage should list: its closure less what a listed directory covers."""
        return sorted(path for path in self.closure if not _covered(path, self.directories))

    @property
    def missing(self) -> list[str]:
        listed = set(self.listed)
        return [path for path in self.wanted if path not in listed]

    @property
    def extra(self) -> list[str]:
        wanted = set(self.wanted)
        return sorted(path for path in self.listed if is_code_dep(path) and path not in wanted)


def stage_deps(dvc_yaml: Mapping[str, Any], root: Path = ROOT) -> dict[str, StageDeps]:
    """StageDeps of every stage of a loaded dvc.yaml whose command runs a project module."""
    result: dict[str, StageDeps] = {}
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        if "foreach" in stage or "matrix" in stage:
            raise ValueError(f"stage {name!r}: foreach/matrix stages are not supported by tools/stage_deps.py")
        modules = entry_modules(stage.get("cmd", ""), root)
        if not modules:
            continue
        names = [_dep_name(dep) for dep in stage.get("deps") or []]
        directories = [n for n in names if "${" not in n and (root / n).is_dir()]
        result[name] = StageDeps(name, import_closure(modules, root), names, directories)
    return result


def problems(dvc_yaml: Mapping[str, Any], root: Path = ROOT) -> list[str]:
    """One line per stage whose code deps differ from its import closure (empty: dvc.yaml is right)."""
    lines = []
    for name, deps in stage_deps(dvc_yaml, root).items():
        if deps.missing:
            lines.append(f"stage {name}: deps miss {', '.join(deps.missing)} (imported when it runs)")
        if deps.extra:
            lines.append(f"stage {name}: deps list {', '.join(deps.extra)}, which it does not import")
    return lines


# --------------------------------------------------------------------------- dvc.yaml I/O


def _yaml() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments, order and quoting stay as written
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    return yaml


def load(path: Path) -> Any:
    with Path(path).open(encoding="utf-8") as handle:
        return _yaml().load(handle)


def rewrite(dvc_yaml: Any, root: Path = ROOT) -> list[str]:
    """Set every stage's code deps to its closure, in place; return the names of the stages changed.

    Non-code deps keep their order and come first; the code deps follow, sorted.
    """
    changed = []
    for name, deps in stage_deps(dvc_yaml, root).items():
        if not deps.missing and not deps.extra and [d for d in deps.listed if is_code_dep(d)] == deps.wanted:
            continue
        sequence = dvc_yaml["stages"][name]["deps"]
        for index in reversed(range(len(sequence))):
            if is_code_dep(_dep_name(sequence[index])):
                del sequence[index]
        sequence.extend(deps.wanted)
        changed.append(name)
    return changed


def dump(dvc_yaml: Any) -> str:
    buffer = io.StringIO()
    _yaml().dump(dvc_yaml, buffer)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check (or --write) the code deps of dvc.yaml from each stage's imports.")
    parser.add_argument("--write", action="store_true", help="rewrite the code deps of dvc.yaml in place")
    parser.add_argument("--dvc-file", default=str(ROOT / DVC_FILE), help="dvc.yaml to check (default: the project's)")
    parser.add_argument("--root", default=str(ROOT), help="repository root the modules live in")
    args = parser.parse_args(argv)
    path, root = Path(args.dvc_file), Path(args.root)
    dvc_yaml = load(path)
    if args.write:
        changed = rewrite(dvc_yaml, root)
        if changed:
            path.write_text(dump(dvc_yaml), encoding="utf-8")
        print(f"{path}: code deps rewritten for {', '.join(changed)}" if changed else f"{path}: code deps already match")
        return 0
    found = problems(dvc_yaml, root)
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(f"fix: {WRITE_COMMAND}", file=sys.stderr)
        return 1
    print(f"{path}: every stage lists the code it imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
