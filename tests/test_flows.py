"""The real validate and clean Prefect flows, end to end, on a tiny generated export."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flows.clean import clean_flow
from flows.generate_sample import generate_sample_flow
from flows.validate import validate_flow
from pipeline_steps.errors import ConfigError, RejectThresholdExceeded
from tests.flow_helpers import path_overrides, tiny_raw_export

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def raw_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_raw_export(tmp_path_factory.mktemp("raw") / "export")


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory: pytest.TempPathFactory, raw_export: Path) -> tuple[Path, list[str], dict]:
    work = tmp_path_factory.mktemp("work")
    overrides = path_overrides(work, raw_export) + ["cleaning.min_products_per_class=3"]
    validate_flow(overrides=overrides)
    manifest = clean_flow(overrides=overrides)
    return work, overrides, manifest


def test_validation_quarantines_every_quirk_with_a_reason(cleaned: tuple[Path, list[str], dict]) -> None:
    work, _, _ = cleaned
    rejects = pd.read_csv(work / "validated" / "rejects.csv")
    assert set(rejects.columns) >= {"source_file", "source_row", "record_id", "column", "reason", "value"}
    assert rejects["reason"].notna().all() and (rejects["reason"].str.len() > 0).all()
    reasons = " ".join(rejects["reason"])
    assert "price" in reasons  # "Free" and "" prices
    files = set(rejects["source_file"])
    assert {"Products.csv", "Images.csv"} <= files or any("image" in f.lower() for f in files)
    metrics = json.loads((work / "metrics" / "validate.json").read_text())
    assert metrics["orphan_files"] == 1
    assert metrics["products_rejected"] >= 1 and metrics["images_rejected"] >= 3  # zero-byte, truncated, missing
    assert Path(metrics["data_docs_index"]).is_file()


def test_clean_layer_is_split_by_product_with_13_classes(cleaned: tuple[Path, list[str], dict]) -> None:
    work, _, manifest = cleaned
    clean = work / "clean"
    products = pd.read_parquet(clean / "products.parquet")
    images = pd.read_parquet(clean / "images.parquet")
    labels = json.loads((clean / "labels.json").read_text())
    assert len(labels["classes"]) == 13 == manifest["n_classes"]
    assert set(products["split"]) == {"train", "val", "test"}
    split_of = products.set_index("product_id")["split"]
    assert (images["split"] == images["product_id"].map(split_of)).all()  # no product on two sides
    assert products["price"].notna().all()
    assert not products["text"].str.contains("\r").any()
    assert not products["product_name"].str.contains("Gumtree").any()
    assert all((clean / path).is_file() for path in images["path"])
    assert (work / "metrics" / "clean.json").is_file()


def test_second_run_on_same_inputs_is_a_no_op(cleaned: tuple[Path, list[str], dict]) -> None:
    work, overrides, _ = cleaned
    targets = [work / "validated" / "products.parquet", work / "clean" / "products.parquet"]
    before = [path.stat().st_mtime_ns for path in targets]
    validate_flow(overrides=overrides)
    clean_flow(overrides=overrides)
    assert [path.stat().st_mtime_ns for path in targets] == before


def test_reject_threshold_stops_the_run_and_keeps_the_report(cleaned: tuple[Path, list[str], dict]) -> None:
    work, overrides, _ = cleaned
    strict = overrides + [f"data.validated_dir={work / 'strict'}", "validation.max_reject_fraction=0.001"]
    with pytest.raises(RejectThresholdExceeded, match="max_reject_fraction"):
        validate_flow(overrides=strict)
    assert (work / "strict" / "rejects.csv").is_file()
    assert json.loads((work / "metrics" / "validate.json").read_text())["rejected_fraction"] > 0.001


def test_missing_raw_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.raw_dir"):
        validate_flow(overrides=path_overrides(tmp_path, tmp_path / "does-not-exist"))


def test_generate_sample_refuses_to_overwrite_real_data(tmp_path: Path) -> None:
    export = tmp_path / "my-export"
    export.mkdir()
    (export / "Products.csv").write_text("id,price\n1,£1.00\n")
    with pytest.raises(ConfigError, match="not a generated sample"):
        generate_sample_flow(out=str(export))
    assert (export / "Products.csv").read_text() == "id,price\n1,£1.00\n"
