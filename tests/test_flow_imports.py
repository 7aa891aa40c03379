"""Flows are wiring: no module in flows/ imports a flow module, except the end-to-end flows/pipeline.py.

A flow module is one that defines a Prefect flow (`@flow`). Shared helpers that define none
(flows/common.py, flows/tracking.py, flows/champions.py) may be imported by any flow; logic a
second flow needs lives in pipeline_steps/ (e.g. scoring in pipeline_steps/evaluation.py, the
re-score of a champion in pipeline_steps/registry.py, retrieval metrics in index_quality.py).
Checked on the source with `ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

FLOWS = Path(__file__).resolve().parents[1] / "flows"
# May import flow modules: the end-to-end flow wires every stage; deploy.py serves that end-to-end
# flow as a deployment (it defines no flow of its own).
ALLOWED = {"pipeline", "deploy"}


def _defines_flow(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
                if name == "flow":
                    return True
    return False


def _flows_imported(tree: ast.Module) -> set[str]:
    """Names of flows/ modules a module imports (`from flows.x import ...`, `from flows import x`, `import flows.x`)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "flows":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("flows."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("flows."))
    return found


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(FLOWS.glob("*.py"))}


def test_the_check_sees_flow_modules_and_imports() -> None:
    modules = _modules()
    flow_modules = {name for name, tree in modules.items() if _defines_flow(tree)}
    assert {"validate", "clean", "train", "evaluate", "register", "index", "package", "pipeline"} <= flow_modules
    assert not {"common", "tracking", "champions"} & flow_modules
    assert {"evaluate", "register", "index", "package"} <= _flows_imported(modules["pipeline"])


def test_no_flow_module_is_imported_by_another_module_of_flows() -> None:
    modules = _modules()
    flow_modules = {name for name, tree in modules.items() if _defines_flow(tree)}
    offenders = {
        name: sorted((_flows_imported(tree) & flow_modules) - {name})
        for name, tree in modules.items()
        if name not in ALLOWED
    }
    assert {name: found for name, found in offenders.items() if found} == {}
