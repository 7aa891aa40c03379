"""The code each DVC stage runs, computed from its imports, and the fingerprints dvc.yaml uses for it.

`dvc repro` re-runs a stage only when one of its `deps` changed, so a stage must depend on
every module it can execute, or it keeps a stale output after that module changed. Hand-kept
lists drift (the index stage once missed inference.py, registry.py, mlflow_models.py and
flows/tracking.py), so the rule here is computed:

    a stage's code = the project modules its command can execute, i.e. the import closure
    of the module its `cmd` runs (`python -m flows.X`, or `python path/to/file.py`).

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

How dvc.yaml uses it: the `code` stage runs first and writes one *fingerprint* per entry
module, `artifacts/code/<module>.txt`: the md5 and path of every file of its closure. Each
stage depends on the fingerprint of the module it runs instead of listing its ~40 files:

- it re-runs exactly when a file of its closure changes (the fingerprint's content changes
  then, and only then), as if it listed them;
- a new, split or moved module needs no edit of dvc.yaml: the `code` stage depends on the
  `flows`, `pipeline_steps` and `tools` folders and recomputes the closures when anything
  there changes (`__pycache__` is in .dvcignore);
- dvc.lock holds one hash per stage for its code instead of one per file. dvc reads and
  rewrites dvc.lock with its pure-Python round-trip YAML loader after every stage, so its
  size is paid ten times per `dvc repro` (421 hashes, 58 KB, ~0.5 s per stage before).

    .venv/bin/python -m tools.stage_deps             # check dvc.yaml; exit 1 naming what is wrong
    .venv/bin/python -m tools.stage_deps --fingerprints artifacts/code flows.validate ...
                                                      # what the `code` stage runs

tests/test_dvc_deps.py fails when a stage does not depend on the fingerprint of the module it
runs, still lists `*.py` files itself, or the `code` stage misses a module or a folder.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import shlex
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DVC_FILE = "dvc.yaml"
#: The module the `code` stage runs, and the flag that makes it write fingerprints.
TOOL_MODULE = "tools.stage_deps"
FINGERPRINTS_FLAG = "--fingerprints"


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


#: The nodes that can hold statements (an `import` is a statement): enough to walk without calls.
_STATEMENT_HOLDERS = (ast.stmt, ast.excepthandler, ast.match_case)


def _runtime_nodes(tree: ast.AST, expressions: bool = True) -> Iterable[ast.AST]:
    """Every node of the tree except the bodies of `if TYPE_CHECKING:` blocks (they never run).

    With `expressions=False` only statements (and the handlers and cases holding them) are
    visited: imports are statements, and expressions are most of a tree's nodes.
    """
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        children = ast.iter_child_nodes(node)
        stack.extend(children if expressions else (child for child in children if isinstance(child, _STATEMENT_HOLDERS)))


def imported_names(module: str, path: Path) -> set[str]:
    """Absolute names a module imports anywhere (module level, functions, methods), as written.

    `from a.b import c` gives both `a.b` and `a.b.c` (c may be a submodule); which of them
    are project modules is decided by the caller.
    """
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    names: set[str] = set()
    # `importlib.import_module("x")` is a call, inside an expression: walk those only when one can be there
    for node in _runtime_nodes(tree, expressions="import_module" in source):
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


@dataclass
class ClosureCache:
    """What closures of several stages share (most of their files): each file parsed, each name looked up, once."""

    files: dict[str, Path | None] = field(default_factory=dict)
    names: dict[str, set[str]] = field(default_factory=dict)


def import_closure(entry_modules: Iterable[str], root: Path = ROOT, cache: ClosureCache | None = None) -> set[str]:
    """Repository-relative POSIX paths of every project file the entry modules can execute."""
    root = Path(root)
    cache = ClosureCache() if cache is None else cache
    seen: dict[str, Path] = {}
    todo = [parent for module in entry_modules for parent in _with_parents(module)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        if module not in cache.files:
            cache.files[module] = module_file(module, root)
        path = cache.files[module]
        if path is None:
            continue
        seen[module] = path
        if module not in cache.names:
            cache.names[module] = imported_names(module, path)
        for name in cache.names[module]:
            todo.extend(parent for parent in _with_parents(name) if parent not in seen)
    return {path.relative_to(root).as_posix() for path in seen.values()}


# --------------------------------------------------------------------------- fingerprints


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def fingerprint_path(directory: str, module: str) -> str:
    """Where the `code` stage writes a module's fingerprint (a repository-relative POSIX path)."""
    return f"{directory.rstrip('/')}/{module}.txt"


def fingerprint_text(module: str, root: Path = ROOT, cache: ClosureCache | None = None) -> str:
    """The md5 and path of every file `module` can execute, sorted: changes iff one of them does."""
    root = Path(root)
    if module_file(module, root) is None:
        raise ValueError(f"{module!r} is not a module of {root}")
    lines = [
        f"# The code `python -m {module}` can execute (its import closure, {TOOL_MODULE}).",
        "# A stage that depends on this file re-runs when one of these files changes.",
    ]
    lines += [f"{file_md5(root / path)}  {path}" for path in sorted(import_closure([module], root, cache))]
    return "\n".join(lines) + "\n"


def write_fingerprints(directory: Path, modules: Sequence[str], root: Path = ROOT) -> list[Path]:
    """Write each module's fingerprint into `directory`, atomically; return the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cache = ClosureCache()
    written = []
    for module in modules:
        target = directory / f"{module}.txt"
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{module}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(fingerprint_text(module, root, cache))
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        written.append(target)
    return written


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
    """A `deps`/`outs` entry is a plain string (a mapping form `{path: {...}}` names it as its only key)."""
    return next(iter(dep)) if isinstance(dep, Mapping) else str(dep)


def is_code_dep(name: str) -> bool:
    """A Python file of the repository listed as a dep (the fingerprints replace those)."""
    return name.endswith(".py") and "${" not in name


def _covered(path: str, names: Iterable[str]) -> bool:
    return any(path == name.rstrip("/") or path.startswith(name.rstrip("/") + "/") for name in names)


def code_stage(dvc_yaml: Mapping[str, Any]) -> tuple[str, str, list[str]] | None:
    """(name, fingerprint folder, modules) of the stage running `tools.stage_deps --fingerprints`, else None."""
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        cmd = stage.get("cmd", "")
        words = shlex.split(cmd if isinstance(cmd, str) else " ".join(cmd), posix=True)
        if TOOL_MODULE in words and FINGERPRINTS_FLAG in words:
            rest = words[words.index(FINGERPRINTS_FLAG) + 1:]
            if rest:
                return name, rest[0], rest[1:]
    return None


def stage_modules(dvc_yaml: Mapping[str, Any], root: Path = ROOT) -> dict[str, list[str]]:
    """The project modules each stage's command runs (stages running none, and the `code` stage, left out)."""
    found = code_stage(dvc_yaml)
    result: dict[str, list[str]] = {}
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        if "foreach" in stage or "matrix" in stage:
            raise ValueError(f"stage {name!r}: foreach/matrix stages are not supported by tools/stage_deps.py")
        modules = entry_modules(stage.get("cmd", ""), root)
        if modules and not (found and name == found[0]):
            result[name] = modules
    return result


def problems(dvc_yaml: Mapping[str, Any], root: Path = ROOT) -> list[str]:
    """One line per way dvc.yaml fails to re-run a stage when its code changes (empty: it is right)."""
    root = Path(root)
    stages = dvc_yaml.get("stages") or {}
    modules = stage_modules(dvc_yaml, root)
    found = code_stage(dvc_yaml)
    if found is None:
        return [f"no stage runs `python -m {TOOL_MODULE} {FINGERPRINTS_FLAG} <folder> <module> ...`"] if modules else []
    code_name, folder, fingerprinted = found
    lines = []
    for name, entries in modules.items():
        deps = [_dep_name(dep) for dep in stages[name].get("deps") or []]
        missing = [fingerprint_path(folder, module) for module in entries if fingerprint_path(folder, module) not in deps]
        if missing:
            lines.append(f"stage {name}: deps miss {', '.join(missing)} (the fingerprint of the code it runs)")
        listed = [dep for dep in deps if is_code_dep(dep)]
        if listed:
            lines.append(f"stage {name}: deps list {', '.join(listed)}; its fingerprint covers the code it runs")
        unknown = [module for module in entries if module not in fingerprinted]
        if unknown:
            lines.append(f"stage {code_name}: does not fingerprint {', '.join(unknown)}, which stage {name} runs")
    code = stages[code_name]
    outs = [_dep_name(out) for out in code.get("outs") or []]
    if folder.rstrip("/") not in [out.rstrip("/") for out in outs]:
        lines.append(f"stage {code_name}: outs miss {folder} (the folder it writes)")
    code_deps = [_dep_name(dep) for dep in code.get("deps") or []]
    sources = import_closure([*fingerprinted, TOOL_MODULE], root)
    uncovered = sorted(path for path in sources if not _covered(path, code_deps))
    if uncovered:
        lines.append(f"stage {code_name}: deps miss {', '.join(uncovered)} (list the file or its folder)")
    return lines


# --------------------------------------------------------------------------- dvc.yaml I/O


def load(path: Path) -> Any:
    import yaml

    with Path(path).open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check that dvc.yaml re-runs each stage when its code changes, or write the code fingerprints.")
    parser.add_argument(FINGERPRINTS_FLAG, nargs="+", metavar=("FOLDER", "MODULE"),
                        help="write FOLDER/<module>.txt for each MODULE (what the `code` stage runs)")
    parser.add_argument("--dvc-file", default=str(ROOT / DVC_FILE), help="dvc.yaml to check (default: the project's)")
    parser.add_argument("--root", default=str(ROOT), help="repository root the modules live in")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.fingerprints:
        folder, *modules = args.fingerprints
        try:
            written = write_fingerprints(root / folder, modules, root)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"{folder}: fingerprints of {', '.join(path.stem for path in written)}")
        return 0
    path = Path(args.dvc_file)
    found = problems(load(path), root)
    for line in found:
        print(line, file=sys.stderr)
    if found:
        return 1
    print(f"{path}: every stage re-runs when the code it runs changes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
