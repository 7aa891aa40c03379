"""The real validate and clean Prefect flows, end to end, on a tiny generated export."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from flows.clean import clean_flow
from flows.generate_sample import generate_sample_flow
from flows.validate import validate_flow
from pipeline_steps.errors import ConfigError, DataValidationError, RejectThresholdExceeded
from tests.support.flow_helpers import path_overrides, tiny_raw_export

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


def test_validation_quarantines_every_quirk_with_a_reason(cleaned: tuple[Path, list[str], dict], raw_export: Path) -> None:
    work, _, _ = cleaned
    rejects = pd.read_csv(work / "validated" / "rejects.csv")
    assert set(rejects.columns) >= {"source_file", "source_row", "record_id", "column", "reason", "value"}
    assert rejects["reason"].notna().all() and (rejects["reason"].str.len() > 0).all()
    reasons = " ".join(rejects["reason"])
    assert "price" in reasons  # "Free" and "" prices
    files = set(rejects["source_file"])
    assert {"Products.csv", "Images.csv"} <= files
    # Exactly the quirks the generator planted (sample_manifest.json), each with its own reason:
    quirks = json.loads((raw_export / "sample_manifest.json").read_text())["quirks"]
    by_id = rejects.set_index("record_id")
    bad_prices = {pid: value for pid, value in quirks["bad_price"]["details"].items() if value in ("Free", "")}
    products = rejects[rejects["source_file"] == "Products.csv"]
    assert set(products["record_id"]) == set(bad_prices) and set(products["column"]) == {"price"}
    for pid, value in bad_prices.items():
        expected = "price is empty" if value == "" else f"price {value!r} is not a £ amount"
        assert by_id.loc[pid, "reason"].startswith(expected), by_id.loc[pid, "reason"]
    broken = {
        next(iter(quirks["zero_byte_image"]["details"])): "is empty (0 bytes)",
        next(iter(quirks["truncated_image"]["details"])): "cannot be decoded",
        next(iter(quirks["missing_image_file"]["details"])): "is missing",
    }
    images = rejects[rejects["source_file"] == "Images.csv"]
    assert set(images.loc[images["column"] == "file", "record_id"]) == set(broken)
    for image_id, why in broken.items():
        assert by_id.loc[image_id, "column"] == "file" and why in by_id.loc[image_id, "reason"], by_id.loc[image_id, "reason"]
    # the other image rejects are the photos of rejected products, and say so
    of_rejected = images[images["column"] != "file"]
    assert set(of_rejected["value"]) <= set(bad_prices) and len(of_rejected) >= 1
    assert of_rejected["reason"].str.startswith("its product ").all() and (of_rejected["column"] == "product_id").all()
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
    # the stage checked the layer against the Clean contract (great-expectations) and left Data Docs
    assert (work / "clean_data_docs" / "index.html").is_file()
    docs = " ".join(path.read_text(errors="replace") for path in (work / "clean_data_docs").rglob("*.html"))
    assert "clean_products" in docs and "clean_images" in docs


def test_a_clean_layer_breaking_the_contract_stops_the_stage_and_keeps_the_previous_layer(
    cleaned: tuple[Path, list[str], dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """validation.validate_clean_layer runs in the clean stage: a cleaning bug that puts a photo in
    another split than its product (a train/test leak) is stopped before the layer replaces the old one."""
    import flows.clean

    work, overrides, _ = cleaned
    previous = tmp_path / "clean"
    shutil.copytree(work / "clean", previous, ignore=shutil.ignore_patterns("_stage_stamp.json"))
    before = _digest(previous)
    real_clean_dataset = flows.clean.clean_dataset

    def leaky_clean_dataset(validated_dir: Path, raw_images: Path, out_dir: Path, settings: dict) -> dict:
        manifest = real_clean_dataset(validated_dir, raw_images, out_dir, settings)
        images = pd.read_parquet(Path(out_dir) / "images.parquet")
        first_test = images.index[images["split"] == "test"][0]
        images.loc[first_test, "split"] = "train"
        images.to_parquet(Path(out_dir) / "images.parquet", index=False)
        return manifest

    monkeypatch.setattr(flows.clean, "clean_dataset", leaky_clean_dataset)
    with pytest.raises(DataValidationError, match=r"check 'split_matches_product' failed for 1 row\(s\)"):
        clean_flow(overrides=overrides + [f"data.clean_dir={previous}"])
    assert _digest(previous) == before, "the layer that broke the contract replaced the previous one"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    assert (work / "clean_data_docs" / "index.html").is_file()  # the failing run's Data Docs are there to read


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


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
