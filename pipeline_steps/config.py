"""Reading params.yaml: the one source of truth for every path and knob.

Helpers here turn a mistyped key or an unknown choice into a ConfigError that
names the key and the accepted values, before any expensive work starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline_steps.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = PROJECT_ROOT / "params.yaml"


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """Load params.yaml (or another file of the same shape), checked against its schema.

    Args:
        path: the file (default: the project's params.yaml).

    Returns:
        The parsed mapping, once pipeline_steps.settings has accepted every key, type and range.

    Raises:
        ConfigError: the file is missing, not a mapping, or breaks the schema (every bad key named).
    """
    params, _ = _load_checked(path)
    return params


def load_settings(path: str | Path | None = None) -> Any:
    """params.yaml as typed settings (pipeline_steps.settings.Settings): attributes, not dict keys."""
    _, typed = _load_checked(path)
    return typed


def _load_checked(path: str | Path | None) -> tuple[dict[str, Any], Any]:
    """(the parsed mapping, its typed settings): read and validated once."""
    from pipeline_steps import settings

    params_path = Path(path) if path is not None else DEFAULT_PARAMS
    if not params_path.is_file():
        raise ConfigError(f"params file not found: {params_path}")
    with params_path.open(encoding="utf-8") as handle:
        params = yaml.safe_load(handle) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{params_path} must hold a mapping at the top level")
    return params, settings.validate(params, source=str(params_path))


def get(params: Mapping[str, Any], dotted_key: str) -> Any:
    """Return params['a']['b'] for 'a.b', with an error that names the missing key."""
    node: Any = params
    walked: list[str] = []
    for part in dotted_key.split("."):
        walked.append(part)
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"params.yaml has no key '{'.'.join(walked)}' (needed: '{dotted_key}')")
        node = node[part]
    return node


def set_value(params: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Override one key in place, e.g. from a flow's --raw-dir argument."""
    parts = dotted_key.split(".")
    node = params
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def require_choice(value: Any, key: str, accepted: Iterable[Any]) -> Any:
    """Fail early, naming the key and what it accepts, when a choice is unknown."""
    accepted_list = list(accepted)
    if value not in accepted_list:
        choices = ", ".join(repr(choice) for choice in accepted_list)
        raise ConfigError(f"params.yaml key '{key}' is {value!r}; accepted values: {choices}")
    return value


def resolve_path(path: str | Path, root: Path = PROJECT_ROOT) -> Path:
    """Resolve a params.yaml path against the repository root (absolute paths pass through)."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (root / candidate)


def existing_dir(params: Mapping[str, Any], key: str, root: Path = PROJECT_ROOT) -> Path:
    """Resolve a directory key and fail with the key's name when it does not exist."""
    directory = resolve_path(get(params, key), root)
    if not directory.is_dir():
        raise ConfigError(f"params.yaml key '{key}' points to '{directory}', which is not an existing directory")
    return directory
