"""No params.yaml knob has a default hidden in code (issue 10: "every knob is in params.yaml").

pipeline_steps/settings.py requires every key at load, so code reads `params["key"]` (or a typed
section); a `params.get("dropout", 0.2)` would only hide a missing key from a hand-built dict and
let the code and params.yaml disagree. This scans pipeline_steps/, flows/ and service/ with `ast`
for `<x>.get("<key>", <default>)`, `<x>.get("<key>") or <default>` and `<x>.setdefault("<key>", ...)`
where `<key>` is a params.yaml key (any field name of the schema), outside the allow-list below.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from pydantic import BaseModel

from pipeline_steps import settings

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pipeline_steps", "flows", "service")

#: (file, the expression `.get` is called on): reads of things that are NOT params.yaml, where a default
#: keeps what an earlier version wrote loadable. Every entry must still match something (see below).
ALLOWED = {
    # config.json's `architecture` of a trained model: older model directories lack newer keys
    ("pipeline_steps/inference.py", "architecture"): "saved model config",
    ("pipeline_steps/inference.py", "loaded.config.get('preprocessing', {})"): "saved model config",
    ("pipeline_steps/inference.py", "loaded.config.get('preprocessing', {}).get('text', {})"): "saved model config",
    ("pipeline_steps/inference.py", "self.config"): "saved model config (search_embedding)",
    # ImagePreprocessor.from_config: config.json's `preprocessing.image`
    ("pipeline_steps/models.py", "cfg"): "saved preprocessing config",
    # the pixel baseline's saved config.json
    ("pipeline_steps/baselines.py", "self.config"): "saved model config",
    # the multimodal model reads the trained image tower's config.json
    ("pipeline_steps/recipe_multimodal.py", "image_loaded.config['preprocessing']"): "saved model config",
    # bundle.json's entries (`dir` of a model/index inside a packaged bundle)
    ("service/bundle.py", "meta"): "bundle metadata",
}


def schema_keys() -> set[str]:
    """Every field name of params.yaml's schema, at any depth (section names included)."""
    keys: set[str] = set()

    def walk(model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            keys.add(name)
            for candidate in (field.annotation, *typing.get_args(field.annotation)):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    walk(candidate)

    walk(settings.Settings)
    return keys


def _key_call(node: ast.AST, keys: set[str], methods: tuple[str, ...], min_args: int) -> ast.Call | None:
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in methods
        and len(node.args) >= min_args
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value in keys
    ):
        return node
    return None


def fallbacks(source: str, keys: set[str]) -> list[tuple[int, str, str]]:
    """(line, receiver, key) of every params-key read with a default in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        call = _key_call(node, keys, ("get", "setdefault"), 2)
        if call is None and isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            call = _key_call(node.values[0], keys, ("get",), 1)  # x.get("key") or default
        if call is not None:
            found.append((node.lineno, ast.unparse(call.func.value), call.args[0].value))  # type: ignore[attr-defined]
    return found


def _scan() -> dict[tuple[str, str], list[str]]:
    keys = schema_keys()
    hits: dict[tuple[str, str], list[str]] = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for line, receiver, key in fallbacks(path.read_text(encoding="utf-8"), keys):
                hits.setdefault((relative, receiver), []).append(f"{relative}:{line}: {receiver}.get({key!r}, ...)")
    return hits


def test_the_scan_finds_each_form_of_fallback() -> None:
    keys = schema_keys()
    assert {"dropout", "grad_clip", "label_smoothing", "photo_calibration", "backbone", "artifact_root"} <= keys
    source = (
        'a = params.get("dropout", 0.2)\n'
        'b = params.get("features_dir") or "artifacts/features/image"\n'
        'team.setdefault("work_pool", "process")\n'
        'c = params["dropout"]\n'
        'd = state.get("cuda")\n'
        'e = row.get("not_a_params_key", 1)\n'
    )
    assert [(line, key) for line, _, key in fallbacks(source, keys)] == [(1, "dropout"), (2, "features_dir"), (3, "work_pool")]


def test_no_params_key_is_read_with_a_code_default() -> None:
    hits = _scan()
    unexpected = [line for place, lines in hits.items() if place not in ALLOWED for line in lines]
    assert not unexpected, (
        "params.yaml keys read with a default in code (read params['key'] or a typed section from "
        "pipeline_steps/settings.py; add to ALLOWED only what is not params.yaml, with a comment):\n  "
        + "\n  ".join(unexpected)
    )


def test_every_allowed_read_still_exists() -> None:
    """An allow-list entry that matches nothing any more is removed, so the list cannot hide a new fallback."""
    stale = sorted(set(ALLOWED) - set(_scan()))
    assert not stale, f"ALLOWED entries that match no code: {stale}"
