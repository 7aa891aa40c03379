"""validation: GX suites turn bad rows and bad photos into readable rejects, never silent drops.

One small messy export (built here in a temp dir, with every quirk we care about) is
validated once per module and inspected by many tests, because a GX run with Data Docs
costs a couple of seconds; the rest of the tests use tiny exports or call helpers directly.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from pipeline_steps.errors import ConfigError, DataValidationError, RejectThresholdExceeded
from pipeline_steps.validation import (
    REJECT_COLUMNS,
    inspect_image_file,
    pil_safety,
    product_checks,
    validate_clean_layer,
    validate_clean_tables,
    validate_raw,
)

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "marketplace"
#: validation.text: the values text_hygiene used to default to (the same as params.yaml's)
TEXT: dict[str, Any] = {
    "control_chars": "strip",
    "invalid_unicode": "reject",
    "invisible_in_names": "strip",
    "max_chars": {"id": 100, "product_name": 500, "product_description": 20000, "category": 500, "location": 200, "price": 50},
    "truncate": ["product_name", "product_description"],
}
PARAMS: dict[str, Any] = {
    "max_reject_fraction": 0.15,
    "min_image_side": 32,
    "max_image_side": 8000,
    "max_image_pixels": 40_000_000,
    "allowed_image_modes": ["RGB", "L", "RGBA", "P", "CMYK", "LA", "I;16"],
    "location_requires_county": False,
    "text": TEXT,
}


# --------------------------------------------------------------------------- fixture builders


def product(pid: str, price: str = "£10.00", **overrides: str) -> dict[str, str]:
    row = {
        "id": pid,
        "product_name": f"Item {pid}",
        "category": "Home & Garden / Dining, Living Room Furniture / Sofas",
        "product_description": f"A fine {pid}",
        "price": price,
        "location": "Leeds, West Yorkshire",
    }
    row.update(overrides)
    return row


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (40, 40), fmt: str = "JPEG") -> bytes:
    colour: Any = 128 if mode in ("L", "P") else tuple([90] * len(mode))
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write_export(root: Path, products: list[dict], images: list[dict], files: dict[str, bytes]) -> Path:
    """A raw export as users ship it: pandas-style unnamed index column, images/<id>.jpg."""
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(products).to_csv(root / "Products.csv")
    pd.DataFrame(images, columns=["id", "product_id"]).to_csv(root / "Images.csv")
    folder = root / "images"
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def messy_export(root: Path) -> Path:
    """35 products (3 bad prices, 2 warnings) and 51 image rows with one of each photo problem."""
    products = [product(f"p{i:02d}", price=f"£{i + 1}.00") for i in range(30)]
    products += [
        product("p30", price="Free"),
        product("p31", price=""),
        product("p32", price="12.50"),
        product("p33", location="London"),
        product("p34", product_description=""),
    ]
    images = [{"id": f"i{i:02d}", "product_id": f"p{i:02d}"} for i in range(10)]
    images += [{"id": "i10", "product_id": "nope"}, {"id": "i30", "product_id": "p30"}]
    images += [{"id": "../escape", "product_id": "p00"}]        # would point outside images/
    images += [{"id": f"i{i:02d}b", "product_id": f"p{i:02d}"} for i in range(11, 30)]
    images += [{"id": f"i{i:02d}c", "product_id": f"p{i:02d}"} for i in range(11, 30)]
    good = image_bytes()
    files = {f"{row['id']}.jpg": good for row in images if "/" not in row["id"]}
    files.update({
        "i01.jpg": b"",                                         # zero-byte
        "i02.jpg": good[: len(good) // 2],                      # truncated JPEG
        "i03.jpg": image_bytes("RGB", fmt="PNG"),               # PNG named .jpg: accepted, warned
        "i05.jpg": image_bytes("CMYK"),
        "i06.jpg": image_bytes("P", fmt="PNG"),
        "i07.jpg": image_bytes("L"),
        "i08.jpg": image_bytes("RGBA", fmt="PNG"),
        "i09.jpg": image_bytes("RGB", size=(16, 16)),           # too small
        "orphan.jpg": good,                                     # no Images.csv row
    })
    del files["i04.jpg"]                                        # missing file
    return write_export(root, products, images, files)


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("messy")
    raw = messy_export(base / "raw")
    before = snapshot(raw)
    started = time.perf_counter()
    metrics = validate_raw(raw, base / "validated", PARAMS, base / "docs")
    return {
        "metrics": metrics,
        "raw": raw,
        "raw_before": before,
        "out": base / "validated",
        "docs": base / "docs",
        "seconds": time.perf_counter() - started,
        "rejects": pd.read_csv(base / "validated" / "rejects.csv", dtype=str, keep_default_na=False),
    }


def reject_for(run: dict[str, Any], record_id: str) -> pd.Series:
    rejects = run["rejects"]
    rows = rejects[rejects["record_id"] == record_id]
    assert len(rows) == 1, f"expected exactly one reject for {record_id}, got {len(rows)}"
    return rows.iloc[0]


# --------------------------------------------------------------------------- messy export: products


def test_rejects_csv_follows_the_contract(messy_run: dict[str, Any]) -> None:
    rejects = messy_run["rejects"]
    assert list(rejects.columns) == REJECT_COLUMNS
    assert not rejects.duplicated(["source_file", "source_row"]).any(), "one row per rejected record"


def test_bad_prices_are_rejected_with_reasons(messy_run: dict[str, Any]) -> None:
    free = reject_for(messy_run, "p30")
    assert (free["source_file"], free["source_row"], free["column"], free["value"]) == (
        "Products.csv", "30", "price", "Free",
    )
    assert free["reason"] == "price 'Free' is not a £ amount like '£1,234.00'"
    assert reject_for(messy_run, "p31")["reason"] == "price is empty"
    assert reject_for(messy_run, "p32")["reason"] == "price '12.50' is not a £ amount like '£1,234.00'"


def test_warning_level_rows_are_kept(messy_run: dict[str, Any]) -> None:
    kept = pd.read_parquet(messy_run["out"] / "products.parquet")
    assert {"p33", "p34"} <= set(kept["id"])
    assert set(kept["id"]).isdisjoint({"p30", "p31", "p32"})
    counts = messy_run["metrics"]["warning_counts"]
    assert counts["products.location_without_county"] == 1
    assert counts["products.description_missing"] == 1
    assert any("location 'London' is not 'Town, County'" in w for w in messy_run["metrics"]["warnings"])


def test_location_without_county_can_be_made_a_reject() -> None:
    def severity(params: dict[str, Any]) -> str:
        return next(c.severity for c in product_checks(params) if c.check_id == "location_without_county")

    assert severity({**PARAMS, "location_requires_county": True}) == "critical"
    assert severity(PARAMS) == "warning"


def test_validated_products_keep_raw_strings_and_source_row(messy_run: dict[str, Any]) -> None:
    kept = pd.read_parquet(messy_run["out"] / "products.parquet")
    assert list(kept.columns) == [
        "source_row", "id", "product_name", "category", "product_description", "price", "location",
    ]
    row = kept.set_index("id").loc["p05"]
    assert row["price"] == "£6.00" and row["source_row"] == 5


# --------------------------------------------------------------------------- messy export: images


@pytest.mark.parametrize(
    ("image_id", "column", "reason_fragment"),
    [
        ("i01", "file", "image file images/i01.jpg is empty (0 bytes)"),
        ("i02", "file", "image file images/i02.jpg cannot be decoded: "),
        ("i04", "file", "image file images/i04.jpg is missing"),
        ("i09", "file_width", "image images/i09.jpg is 16x16 px; each side must be within [32, 8000]"),
        ("i10", "product_id", "product_id 'nope' is not an id in Products.csv"),
        ("i30", "product_id", "its product 'p30' was rejected (price 'Free' is not a £ amount"),
        ("../escape", "id", "id '../escape' cannot be used as a file name"),
    ],
)
def test_bad_image_rows_are_rejected_with_reasons(
    messy_run: dict[str, Any], image_id: str, column: str, reason_fragment: str
) -> None:
    reject = reject_for(messy_run, image_id)
    assert reject["source_file"] == "Images.csv"
    assert reject["column"] == column
    assert reason_fragment in reject["reason"]


def test_odd_modes_and_png_as_jpg_are_accepted(messy_run: dict[str, Any]) -> None:
    kept = pd.read_parquet(messy_run["out"] / "images.parquet").set_index("id")
    facts = kept.loc[["i03", "i05", "i06", "i07", "i08"], ["file_format", "file_mode"]]
    assert facts.to_dict("index") == {
        "i03": {"file_format": "PNG", "file_mode": "RGB"},
        "i05": {"file_format": "JPEG", "file_mode": "CMYK"},
        "i06": {"file_format": "PNG", "file_mode": "P"},
        "i07": {"file_format": "JPEG", "file_mode": "L"},
        "i08": {"file_format": "PNG", "file_mode": "RGBA"},
    }
    assert kept.loc["i00", ["file_width", "file_height"]].tolist() == [40, 40]
    assert messy_run["metrics"]["image_format_mismatches"] == 3
    assert any("is PNG, not JPEG, despite its .jpg name" in w for w in messy_run["metrics"]["warnings"])


def test_orphan_files_are_listed(messy_run: dict[str, Any]) -> None:
    orphans = pd.read_csv(messy_run["out"] / "orphans.csv")
    assert orphans["file_name"].tolist() == ["orphan.jpg"]
    assert messy_run["metrics"]["orphan_files"] == 1


def test_metrics_count_rows_and_reasons(messy_run: dict[str, Any]) -> None:
    metrics = messy_run["metrics"]
    assert (metrics["products_rows_in"], metrics["products_rows_out"], metrics["products_rejected"]) == (35, 32, 3)
    assert (metrics["images_rows_in"], metrics["images_rows_out"], metrics["images_rejected"]) == (51, 44, 7)
    assert metrics["products_rejected_fraction"] == pytest.approx(3 / 35, abs=1e-6)
    assert metrics["rejects_by_reason"] == {
        "products.price_missing": 1,
        "products.price_format": 2,
        "images.file_empty": 1,
        "images.file_undecodable": 1,
        "images.file_missing": 1,
        "images.file_width": 1,
        "images.product_id_unknown": 1,
        "images.product_rejected": 1,
        "images.id_not_file_name": 1,
    }
    assert metrics["n_warnings"] == len(metrics["warnings"])


def test_data_docs_index_is_written(messy_run: dict[str, Any]) -> None:
    index = messy_run["docs"] / "index.html"
    assert messy_run["metrics"]["data_docs_index"] == str(index)
    html = index.read_text(encoding="utf-8")
    for suite in ("products_csv", "images_csv", "image_files"):
        assert suite in html
    assert list((messy_run["docs"] / "validations").rglob("*.html"))


def test_raw_export_is_never_written(messy_run: dict[str, Any]) -> None:
    assert snapshot(messy_run["raw"]) == messy_run["raw_before"]


# --------------------------------------------------------------------------- structural failures


def test_images_folder_missing_stops_the_run(tmp_path: Path) -> None:
    raw = write_export(tmp_path / "raw", [product("p1")], [{"id": "i1", "product_id": "p1"}], {})
    (raw / "images").rmdir()
    with pytest.raises(DataValidationError, match=r"images folder .*images does not exist"):
        validate_raw(raw, tmp_path / "out", PARAMS, tmp_path / "docs")
    assert not (tmp_path / "out").exists()


def test_outputs_inside_raw_dir_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="never written to"):
        validate_raw(tmp_path, tmp_path / "validated", PARAMS, tmp_path.parent / "docs")


def test_missing_params_key_is_named(tmp_path: Path) -> None:
    params = {key: value for key, value in PARAMS.items() if key != "max_image_pixels"}
    with pytest.raises(ConfigError, match=r"validation\.max_image_pixels"):
        validate_raw(tmp_path / "raw", tmp_path / "out", params, tmp_path / "docs")


def test_reject_threshold_exceeded_after_writing_rejects_and_docs(tmp_path: Path) -> None:
    good = image_bytes()
    raw = write_export(
        tmp_path / "raw",
        [product("p1"), product("p2"), product("p3", price="Free")],
        [{"id": "i1", "product_id": "p1"}],
        {"i1.jpg": good},
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "products.parquet").write_bytes(b"stale")  # an older run's output must not survive
    with pytest.raises(RejectThresholdExceeded) as info:
        validate_raw(raw, out, PARAMS, tmp_path / "docs")
    message = str(info.value)
    assert "1 of 3 Products.csv rows (33.3%) were rejected" in message
    assert "validation.max_reject_fraction = 0.15" in message
    assert "products.price_format: 1" in message
    assert info.value.metrics["products_rejected"] == 1  # type: ignore[attr-defined]
    rejects = pd.read_csv(out / "rejects.csv")
    assert rejects["record_id"].tolist() == ["p3"]
    assert (tmp_path / "docs" / "index.html").is_file()
    assert not (out / "products.parquet").exists()


# --------------------------------------------------------------------------- image file facts


def test_decompression_bomb_is_never_decoded(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(image_bytes(size=(40, 40)))  # 1,600 pixels
    original_limit = Image.MAX_IMAGE_PIXELS
    for limit in (1000, 500):  # PIL warns above the limit and refuses above twice the limit
        with pil_safety(limit):
            facts = inspect_image_file(path, limit)
        assert facts["pixels"] == 1600
        assert facts["decodable"] is None
    assert Image.MAX_IMAGE_PIXELS == original_limit, "the global PIL limit is restored"


def test_truncated_jpeg_is_not_decodable(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    path.write_bytes(image_bytes(size=(64, 64))[:300])
    with pil_safety(PARAMS["max_image_pixels"]):
        facts = inspect_image_file(path, PARAMS["max_image_pixels"])
    assert facts["exists"] is True and facts["decodable"] is False
    assert facts["error"]


# --------------------------------------------------------------------------- clean tables


def clean_tables() -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    classes = ["Appliances", "Home & Garden", "Other Goods"]
    rows = []
    for i in range(9):
        category = classes[i % 3]
        rows.append({
            "product_id": f"p{i}", "product_name": f"Item {i}", "product_description": "desc",
            "text": f"Item {i}. desc", "category_path": f"{category} / Sub", "category": category,
            "label": i % 3, "price": float(i * 10), "price_is_outlier": i == 0, "location": "Leeds, Yorks",
            "town": "Leeds", "county": "Yorks", "n_images": 1, "split": ("train", "val", "test")[i // 3],
        })
    products = pd.DataFrame(rows)
    images = pd.DataFrame({
        "image_id": [f"i{i}" for i in range(9)],
        "product_id": products["product_id"],
        "path": [f"images/i{i}.jpg" for i in range(9)],
        "split": products["split"],
        "label": products["label"],
    })
    return products, images, classes


def test_clean_tables_that_follow_the_contract_pass(tmp_path: Path) -> None:
    products, images, classes = clean_tables()
    summary = validate_clean_tables(products, images, classes, data_docs_dir=tmp_path / "docs")
    assert summary["products"] == 9 and summary["n_classes"] == 3
    assert summary["splits"] == {"train": 3, "val": 3, "test": 3}
    assert (tmp_path / "docs" / "index.html").is_file()


def test_clean_tables_breaking_the_contract_fail_naming_each_check() -> None:
    products, images, classes = clean_tables()
    products.loc[1, "label"] = 7            # out of range (and not its category's index)
    products.loc[2, "split"] = "holdout"
    products.loc[3, "price"] = -5.0
    images.loc[4, "split"] = "train"        # product p4 is in val: a product in two splits
    with pytest.raises(DataValidationError) as info:
        validate_clean_tables(products, images, classes)
    message = str(info.value)
    for check in ("label_range", "label_matches_category", "split_value", "price_negative", "split_matches_product"):
        assert f"check '{check}' failed" in message
    assert "product_id 'p3': price -5.0 is negative" in message
    assert "'i4'" in message


def test_clean_tables_missing_column_is_named() -> None:
    products, images, classes = clean_tables()
    with pytest.raises(DataValidationError, match=r"clean products\.parquet is missing column\(s\) 'split'"):
        validate_clean_tables(products.drop(columns="split"), images, classes)


def test_clean_layer_on_disk_is_checked_with_its_labels_json(tmp_path: Path) -> None:
    products, images, classes = clean_tables()
    layer = tmp_path / "clean"
    layer.mkdir()
    products.to_parquet(layer / "products.parquet", index=False)
    images.to_parquet(layer / "images.parquet", index=False)
    (layer / "labels.json").write_text(json.dumps({"classes": classes}))
    summary = validate_clean_layer(layer, tmp_path / "docs")
    assert summary["products"] == 9 and summary["images"] == 9 and summary["n_classes"] == 3
    assert (tmp_path / "docs" / "index.html").is_file()

    # labels.json's order is the contract: labels that follow another order fail
    (layer / "labels.json").write_text(json.dumps({"classes": list(reversed(classes))}))
    with pytest.raises(DataValidationError, match="check 'label_matches_category' failed"):
        validate_clean_layer(layer)
    (layer / "labels.json").unlink()
    with pytest.raises(DataValidationError, match=r"lacks 'labels\.json'"):
        validate_clean_layer(layer)


def test_importing_validation_leaves_os_environ_unchanged() -> None:
    """pipeline_steps holds plain functions: importing one must not change the process environment
    (validation.py used to set GX_ANALYTICS_ENABLED at import, for every program that imported it)."""
    code = (
        "import json, os\n"
        "before = dict(os.environ)\n"
        "import pipeline_steps.validation\n"
        "after = dict(os.environ)\n"
        "print(json.dumps({k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))"
        " if before.get(k) != after.get(k)}))\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("GX_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    changed = json.loads(done.stdout.strip().splitlines()[-1])
    assert changed == {}, f"importing pipeline_steps.validation changed os.environ: {changed}"


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_export_validates_with_sane_reject_counts(tmp_path: Path) -> None:
    """The 4,300 real listings and 7,597 photos (about 15 s on 2 cores, mostly decoding photos)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    started = time.perf_counter()
    metrics = validate_raw(REAL_DATA, tmp_path / "validated", PARAMS, tmp_path / "docs")
    seconds = time.perf_counter() - started
    assert metrics["products_rows_in"] == 4300 and metrics["images_rows_in"] == 7597
    assert metrics["products_rejected_fraction"] < 0.02
    assert metrics["images_rejected_fraction"] < 0.02
    assert metrics["orphan_files"] == 64
    assert metrics["image_files_found"] == 7661
    assert (tmp_path / "docs" / "index.html").is_file()
    assert seconds < 90, f"validating the real export took {seconds:.0f} s"
