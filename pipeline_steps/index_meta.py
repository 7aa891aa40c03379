"""Which model an index was built from: the one reading of `index.json` and the one comparison.

An index is only valid for the model version whose embeddings it holds (docs/ARCHITECTURE.md,
"Index"). Three places refuse a mismatch: `SimilarityIndex.load(expected_model=...)`, the package
stage (`packaging.assemble_bundle`) and the service's start-up (`service/bundle.py`); each says it in
its own words and error type, all through `model_mismatch`.

Standard library only (no FAISS): the service's pre-flight check runs before any model loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline_steps.io_utils import read_json

META_FILE = "index.json"


def built_from(info: Mapping[str, Any]) -> tuple[str, str]:
    """(model name, model version) an index's metadata (`index.json`) names, as strings."""
    return str(info.get("model_name")), str(info.get("model_version"))


def read_built_from(index_dir: str | Path) -> tuple[str, str]:
    """`built_from` of the `index.json` in `index_dir` (the caller checks that it exists)."""
    return built_from(read_json(Path(index_dir) / META_FILE))


def model_mismatch(built: Mapping[str, Any] | tuple[Any, Any], expected: tuple[Any, Any]) -> tuple[str, str] | None:
    """The (name, version) an index was built from when it is not the `expected` model, else None.

    Args:
        built: the index's metadata (`index.json` as a mapping) or a (name, version) pair.
        expected: the (name, version) of the model that would embed the queries; versions
            compare as strings (`3` equals `"3"`).

    Returns:
        None when the index may be used with `expected`; otherwise what it was built from.
    """
    pair = built_from(built) if isinstance(built, Mapping) else (str(built[0]), str(built[1]))
    return None if pair == (str(expected[0]), str(expected[1])) else pair
