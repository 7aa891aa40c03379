"""Which way the imports go, and one definition per concept (docs/ARCHITECTURE.md, "Rooms and import directions").

flows -> pipeline_steps; service -> pipeline_steps; pipeline_steps imports neither flows nor service;
service never imports flows; tests/support is imported only by tests and benchmarks. The model
kinds (pipeline_steps/model_kinds.py) and the Clean layer's columns (pipeline_steps/clean_schema.py)
are spelled out once. Checked on the source with `ast` (lazy imports inside functions included), so
nothing is imported to check it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("pipeline_steps", "flows", "service", "tests", "benchmarks", "tools")


def _imported_packages(tree: ast.Module) -> set[str]:
    """Top-level project packages a module imports (absolute imports; the project uses no relative ones)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in PROJECT_PACKAGES:
                found.add(parts[0])
            if parts[:2] == ["tests", "support"]:
                found.add("tests.support")
    return found


def _sources(folder: str) -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(encoding="utf-8")) for path in sorted((ROOT / folder).rglob("*.py"))}


def _offenders(folder: str, forbidden: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {sorted(_imported_packages(tree) & forbidden)}"
        for path, tree in _sources(folder).items()
        if _imported_packages(tree) & forbidden
    ]


def test_the_check_sees_imports() -> None:
    tree = ast.parse(
        "import flows.common\nfrom service import engine\nfrom tests.support.serving import served\n"
        "def lazy():\n    from pipeline_steps.index import SimilarityIndex\n"
    )
    assert _imported_packages(tree) == {"flows", "service", "tests", "tests.support", "pipeline_steps"}
    assert "pipeline_steps" in _imported_packages(ast.parse((ROOT / "flows" / "train.py").read_text(encoding="utf-8")))


def test_pipeline_steps_never_imports_flows_or_service() -> None:
    assert _offenders("pipeline_steps", {"flows", "service", "tests", "benchmarks"}) == []


def test_service_never_imports_flows() -> None:
    assert _offenders("service", {"flows", "tests", "benchmarks"}) == []


def test_flows_never_import_service_or_test_tooling() -> None:
    assert _offenders("flows", {"service", "tests", "benchmarks"}) == []


def test_tools_import_no_project_code() -> None:
    assert _offenders("tools", {"pipeline_steps", "flows", "service", "tests", "benchmarks"}) == []


@pytest.mark.parametrize("folder", ["pipeline_steps", "flows", "service", "tools"])
def test_only_tests_and_benchmarks_import_tests_support(folder: str) -> None:
    assert _offenders(folder, {"tests.support"}) == []


# --------------------------------------------------------------------------- one definition per concept

KIND_GROUPS = {
    frozenset({"image", "text", "multimodal"}),
    frozenset({"image", "text", "multimodal", "price"}),
    frozenset({"text-baseline", "pixel-baseline", "price"}),
    frozenset({"text-baseline", "pixel-baseline"}),
}
CLEAN_TABLES = {
    frozenset({"image_id", "product_id", "path", "split", "label"}),
    frozenset({"product_id", "product_name", "product_description", "text", "category_path", "category",
               "label", "price", "price_is_outlier", "location", "town", "county", "n_images", "split"}),
}


def _string_collections(tree: ast.Module) -> list[tuple[int, frozenset[str]]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(
            isinstance(elt, ast.Constant) and isinstance(elt.value, str) for elt in node.elts
        ):
            found.append((node.lineno, frozenset(elt.value for elt in node.elts)))
    return found


@pytest.mark.parametrize(
    ("groups", "home"),
    [(KIND_GROUPS, "pipeline_steps/model_kinds.py"), (CLEAN_TABLES, "pipeline_steps/clean_schema.py")],
    ids=["model-kinds", "clean-schema"],
)
def test_one_definition_per_concept(groups: set[frozenset[str]], home: str) -> None:
    """No module of the pipeline, the flows or the service spells out a model-kind group or a Clean
    table's column list again: it imports them from their home."""
    copies = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in ("pipeline_steps", "flows", "service")
        for path, tree in _sources(folder).items()
        if path.relative_to(ROOT).as_posix() != home
        for line, values in _string_collections(tree)
        if values in groups
    ]
    assert copies == [], f"define these in {home} and import them"


# --------------------------------------------------------------------------- tests in tiers

STARTS_PROCESS_OR_SERVER = re.compile(
    r"subprocess\.(run|Popen|check_output|check_call|call)\b|\bPopen\(|HTTPServer\(|LocalCluster\(|\bserved\(|"
    r"(?<![\w])[a-z]+_flow\("
)
# Unit tests that start a fresh interpreter only to import a module and look at os.environ
# (an import-time property can only be seen in a fresh process): no server, flow or pipeline.
FRESH_INTERPRETER_IMPORT_CHECKS = {
    ("test_registry.py", "test_importing_the_registry_modules_changes_no_environment_variable"),
    ("test_validation.py", "test_importing_validation_leaves_os_environ_unchanged"),
    ("test_runtime_env.py", "test_stage_modules_apply_prefect_settings_before_prefect_reads_them"),
    ("test_runtime_env.py", "test_a_setting_applied_after_import_prefect_is_ignored"),
    ("test_runtime_env.py", "test_user_exported_values_win"),
    ("test_runtime_env.py", "test_service_package_switches_bentoml_tracking_off_before_bentoml_is_imported"),
    ("test_runtime_env.py", "test_importing_pipeline_steps_changes_no_environment"),
    ("test_runtime_env.py", "test_a_stage_run_by_hand_builds_into_the_store_make_serve_reads"),
}


def _marks(decorators: list[ast.expr]) -> set[str]:
    return set(re.findall(r"pytest\.mark\.(\w+)", " ".join(ast.unparse(d) for d in decorators)))


def test_tests_that_start_a_server_a_flow_or_a_process_are_integration_tests() -> None:
    """`make test-fast` (no marker) stays the unit tier: a test (or a fixture of its module) that
    starts a server, runs a flow or starts a process is marked `integration`."""
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_marks: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
                module_marks |= set(re.findall(r"mark\.(\w+)", ast.unparse(node.value)))
        functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
        starting_fixtures = {
            node.name for node in functions
            if any("fixture" in ast.unparse(d) for d in node.decorator_list) and STARTS_PROCESS_OR_SERVER.search(ast.unparse(node))
        }
        starting_helpers = {  # e.g. a run_killed(...) that runs step functions in a subprocess
            node.name for node in functions
            if not node.name.startswith("test_") and node.name not in starting_fixtures
            and STARTS_PROCESS_OR_SERVER.search(ast.unparse(node))
        }
        calls_helper = re.compile(rf"(?<![\w.])({'|'.join(map(re.escape, starting_helpers))})\(") if starting_helpers else None
        for node in functions:
            if not node.name.startswith("test_") or "integration" in _marks(node.decorator_list) | module_marks:
                continue
            if (path.name, node.name) in FRESH_INTERPRETER_IMPORT_CHECKS:
                continue
            source = ast.unparse(node)
            if (STARTS_PROCESS_OR_SERVER.search(source) or (calls_helper and calls_helper.search(source))
                    or {a.arg for a in node.args.args} & starting_fixtures):
                unmarked.append(f"{path.name}::{node.name}")
    assert unmarked == [], f"mark these @pytest.mark.integration (they start a server, a flow or a process): {unmarked}"
