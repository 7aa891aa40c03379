"""The Clean layer's contract in code (docs/ARCHITECTURE.md, "Clean"): its files, columns and one reader.

The clean stage writes these tables (pipeline_steps/cleaning.py), its GX suites check them
(pipeline_steps/validation.py: validate_clean_tables) and the trainers read them back
(pipeline_steps/datasets.py for torch, pipeline_steps/baselines.py for scikit-learn). Each reader
says which columns it uses; `read_table` checks that they are there, so a stale or foreign clean
folder fails with the file and the column named instead of a KeyError deep inside a model.

pandas and the standard library only: the scikit-learn stage reads the layer without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline_steps.errors import DataValidationError
from pipeline_steps.io_utils import read_json

PRODUCTS_FILE = "products.parquet"
IMAGES_FILE = "images.parquet"
LISTINGS_FILE = "listings.parquet"
LABELS_FILE = "labels.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The values of the `split` column (one split per product; a photo has its product's)."""

PRODUCT_COLUMNS: tuple[str, ...] = (
    "product_id", "product_name", "product_description", "text", "category_path", "category", "label",
    "price", "price_is_outlier", "location", "town", "county", "n_images", "split",
)
"""products.parquet, one row per kept product, in this column order."""
IMAGE_COLUMNS: tuple[str, ...] = ("image_id", "product_id", "path", "split", "label")
"""images.parquet, one row per kept photo, in this column order."""

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {PRODUCTS_FILE: PRODUCT_COLUMNS, IMAGES_FILE: IMAGE_COLUMNS}


def require_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    """Fail with the table and column names rather than a KeyError deep inside a rule or a model.

    Args:
        frame: the table read.
        columns: the columns the caller uses.
        name: how to name the table in the message (a path or e.g. "clean products.parquet").

    Raises:
        DataValidationError: `<name> is missing column(s) 'a', 'b' required by the contract; found [...]`.
    """
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        listed = ", ".join(repr(column) for column in missing)
        raise DataValidationError(
            f"{name} is missing column(s) {listed} required by the contract "
            f"(docs/ARCHITECTURE.md); found {list(frame.columns)}"
        )


def load_classes(clean_dir: str | Path) -> list[str]:
    """The class names, in label-code order, from the clean layer's `labels.json`.

    Raises:
        DataValidationError: the file is missing (the clean stage has not run) or has no
            non-empty `classes` list.
    """
    path = Path(clean_dir) / LABELS_FILE
    if not path.is_file():
        raise DataValidationError(f"{path} not found: run the clean stage first")
    classes = read_json(path).get("classes")
    if not isinstance(classes, list) or not classes:
        raise DataValidationError(f"{path} has no non-empty 'classes' list")
    return [str(name) for name in classes]


def read_table(
    clean_dir: str | Path, file_name: str, columns: Sequence[str] | None = None, split: str | None = None
) -> pd.DataFrame:
    """Read one table of the clean layer, check the columns the caller uses, optionally keep one split.

    Args:
        clean_dir: `data.clean_dir`.
        file_name: `PRODUCTS_FILE` or `IMAGES_FILE`.
        columns: the columns the caller reads (default: the whole contract of that table).
        split: train, val or test; None keeps every row.

    Returns:
        The table with a fresh 0..n-1 index.

    Raises:
        DataValidationError: the file is missing or lacks one of `columns`.
    """
    path = Path(clean_dir) / file_name
    if not path.is_file():
        raise DataValidationError(f"{path} not found: run the clean stage first")
    frame = pd.read_parquet(path)
    require_columns(frame, TABLE_COLUMNS[file_name] if columns is None else columns, str(path))
    if split is not None:
        frame = frame[frame["split"] == split]
    return frame.reset_index(drop=True)
