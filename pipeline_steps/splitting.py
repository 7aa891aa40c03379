"""Train/val/test split by product, stratified by category, deterministic.

Splitting by image would put two photos of the same sofa on both sides and
inflate test accuracy (the seeds' reference figures warn about exactly this),
so the unit of the split is the product and every image inherits its
product's split.

Each class is shuffled on its own, with a generator seeded from
(`split.seed`, the class name): the result does not depend on row order, and
adding or removing one class does not reshuffle the others.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline_steps.clean_schema import SPLITS  # noqa: F401  (re-exported: splitting.SPLITS)
from pipeline_steps.errors import ConfigError, DataValidationError


def split_settings(split_params: Mapping[str, Any] | None) -> tuple[float, float, int]:
    """(val_fraction, test_fraction, seed) from the `cleaning.split` section, checked."""
    params = split_params or {}
    for key in ("val_fraction", "test_fraction", "seed"):
        if key not in params:
            raise ConfigError(f"params.yaml key 'cleaning.split.{key}' is missing")
    val, test, seed = params["val_fraction"], params["test_fraction"], params["seed"]
    for key, value in (("val_fraction", val), ("test_fraction", test)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise ConfigError(f"params.yaml key 'cleaning.split.{key}' must be a number in [0, 1), got {value!r}")
    if val + test >= 1:
        raise ConfigError(f"params.yaml keys 'cleaning.split.val_fraction' + 'test_fraction' must be < 1, got {val + test}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"params.yaml key 'cleaning.split.seed' must be an integer, got {seed!r}")
    return float(val), float(test), seed


def allocate(n_products: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(n_train, n_val, n_test) for one class: rounded shares, but always at least one train product.

    A class the model never sees in training cannot be learnt, so when rounding would
    leave train empty the evaluation splits give products back (test first).
    """
    if n_products <= 0:
        return 0, 0, 0
    n_val = math.floor(n_products * val_fraction + 0.5)
    n_test = math.floor(n_products * test_fraction + 0.5)
    while n_val + n_test > n_products - 1:
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n_products - n_val - n_test, n_val, n_test


def class_generator(seed: int, class_name: str) -> np.random.Generator:
    """A generator per class, independent of the other classes (crc32 is stable across runs, unlike hash())."""
    return np.random.default_rng([seed, zlib.crc32(str(class_name).encode("utf-8"))])


def split_products(
    product_ids: Sequence[str] | pd.Series,
    labels: Sequence[Any] | pd.Series,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, str]:
    """Map each product id to 'train', 'val' or 'test', stratified by label."""
    frame = pd.DataFrame({"product_id": list(product_ids), "label": list(labels)})
    if frame["product_id"].duplicated().any():
        raise DataValidationError("split_products needs one row per product (duplicate product_id found)")
    assignment: dict[str, str] = {}
    for label, group in frame.groupby("label", sort=True):
        ids = sorted(group["product_id"])
        order = class_generator(seed, str(label)).permutation(len(ids))
        n_train, n_val, n_test = allocate(len(ids), val_fraction, test_fraction)
        names = ["test"] * n_test + ["val"] * n_val + ["train"] * n_train
        assignment.update({ids[position]: name for position, name in zip(order, names)})
    return assignment


def assign_splits(
    products: pd.DataFrame,
    images: pd.DataFrame,
    split_params: Mapping[str, Any] | None,
    label_column: str = "category",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write `split` into products and (through product_id) into images; images also get `label`."""
    val, test, seed = split_settings(split_params)
    assignment = split_products(products["product_id"], products[label_column], val, test, seed)
    products = products.assign(split=products["product_id"].map(assignment))
    per_product = products.set_index("product_id")
    images = images.assign(
        split=images["product_id"].map(per_product["split"]),
        label=images["product_id"].map(per_product["label"]) if "label" in per_product else pd.NA,
    )
    if images["split"].isna().any():
        unknown = images.loc[images["split"].isna(), "product_id"].unique()[:5].tolist()
        raise DataValidationError(f"images refer to products that are not in the products table: {unknown}")
    if "label" in per_product:
        images["label"] = images["label"].astype(products["label"].dtype)
    check_no_leakage(images)
    return products, images


def check_no_leakage(images: pd.DataFrame) -> None:
    """Fail loudly if any product's images sit in more than one split."""
    if images.empty:
        return
    spread = images.groupby("product_id")["split"].nunique()
    leaking = spread[spread > 1]
    if not leaking.empty:
        raise DataValidationError(f"{len(leaking)} products have images in several splits, e.g. {leaking.index[:3].tolist()}")
