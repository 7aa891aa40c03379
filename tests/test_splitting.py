"""Splitting by product: no leakage, stratified, deterministic, every class trainable."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline_steps.errors import ConfigError, DataValidationError
from pipeline_steps.splitting import allocate, assign_splits, check_no_leakage, split_products, split_settings

PARAMS = {"seed": 13, "val_fraction": 0.15, "test_fraction": 0.15}


def _products(sizes: dict[str, int]) -> pd.DataFrame:
    rows = [
        {"product_id": f"{name[:3]}-{index:04d}", "category": name, "label": code}
        for code, (name, n) in enumerate(sorted(sizes.items()))
        for index in range(n)
    ]
    return pd.DataFrame(rows)


def _images(products: pd.DataFrame, per_product: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        [{"image_id": f"{pid}-img{k}", "product_id": pid} for pid in products["product_id"] for k in range(per_product)]
    )


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, (0, 0, 0)), (1, (1, 0, 0)), (2, (2, 0, 0)), (3, (3, 0, 0)), (4, (2, 1, 1)), (5, (3, 1, 1)), (100, (70, 15, 15))],
)
def test_allocate_rounds_and_keeps_a_train_product(n: int, expected: tuple[int, int, int]) -> None:
    assert allocate(n, 0.15, 0.15) == expected


def test_allocate_gives_back_to_train_when_evaluation_would_take_everything() -> None:
    assert allocate(2, 0.5, 0.45) == (1, 1, 0)
    assert allocate(1, 0.5, 0.45) == (1, 0, 0)


def test_all_images_of_a_product_share_its_split() -> None:
    products = _products({"Appliances": 40, "Home & Garden": 60})
    products, images = assign_splits(products, _images(products), PARAMS)

    merged = images.merge(products[["product_id", "split"]], on="product_id", suffixes=("", "_product"))
    assert (merged["split"] == merged["split_product"]).all()
    assert images.groupby("product_id")["split"].nunique().max() == 1
    assert (images["label"] == images["product_id"].map(products.set_index("product_id")["label"])).all()


def test_split_is_stratified_per_class() -> None:
    sizes = {"A": 200, "B": 100, "C": 20}
    assignment = split_products(*_columns(_products(sizes)), 0.15, 0.15, 13)
    products = _products(sizes).assign(split=lambda f: f["product_id"].map(assignment))

    shares = pd.crosstab(products["category"], products["split"], normalize="index")
    assert ((shares["val"] - 0.15).abs() <= 0.03).all()
    assert ((shares["test"] - 0.15).abs() <= 0.03).all()


def _columns(products: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    return products["product_id"], products["category"]


def test_split_is_deterministic_and_ignores_row_order() -> None:
    products = _products({"A": 50, "B": 30})
    first = split_products(*_columns(products), 0.15, 0.15, 13)
    shuffled = products.sample(frac=1.0, random_state=0)
    assert split_products(*_columns(shuffled), 0.15, 0.15, 13) == first
    assert split_products(*_columns(products), 0.15, 0.15, 14) != first  # the seed matters


def test_adding_a_class_leaves_the_other_classes_alone() -> None:
    before = split_products(*_columns(_products({"A": 50, "B": 30})), 0.15, 0.15, 13)
    after = split_products(*_columns(_products({"A": 50, "B": 30, "Z": 12})), 0.15, 0.15, 13)
    assert {pid: after[pid] for pid in before} == before


def test_tiny_classes_still_get_a_training_example() -> None:
    assignment = split_products(["x1", "y1", "y2"], ["X", "Y", "Y"], 0.4, 0.4, 13)
    assert assignment["x1"] == "train"
    assert "train" in {assignment["y1"], assignment["y2"]}


def test_duplicate_products_are_refused() -> None:
    with pytest.raises(DataValidationError, match="one row per product"):
        split_products(["a", "a"], ["X", "X"], 0.15, 0.15, 13)


@pytest.mark.parametrize(
    "params",
    [{"val_fraction": 0.6, "test_fraction": 0.5}, {"val_fraction": -0.1}, {"test_fraction": "0.2"}, {"seed": 1.5}],
)
def test_bad_split_params_name_the_key(params: dict) -> None:
    with pytest.raises(ConfigError, match="cleaning.split") as error:
        split_settings({**PARAMS, **params})
    assert "missing" not in str(error.value)


@pytest.mark.parametrize("key", ["val_fraction", "test_fraction", "seed"])
def test_a_missing_split_key_is_named_not_defaulted(key: str) -> None:
    with pytest.raises(ConfigError, match=f"cleaning.split.{key}' is missing"):
        split_settings({k: v for k, v in PARAMS.items() if k != key})


def test_images_of_unknown_products_are_an_error() -> None:
    products = _products({"A": 5})
    images = pd.DataFrame({"image_id": ["i1"], "product_id": ["nope"]})
    with pytest.raises(DataValidationError, match="not in the products table"):
        assign_splits(products, images, PARAMS)


def test_leakage_check_catches_a_product_on_two_sides() -> None:
    images = pd.DataFrame({"image_id": ["1", "2"], "product_id": ["p", "p"], "split": ["train", "test"]})
    with pytest.raises(DataValidationError, match="several splits"):
        check_no_leakage(images)
