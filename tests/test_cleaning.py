"""Cleaning rules on small frames, then the whole clean stage on a hand-made validated layer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline_steps import cleaning
from pipeline_steps.cleaning import (
    build_text,
    clean_dataset,
    clean_products,
    drop_duplicates,
    flag_price_outliers,
    link_images,
    normalise_whitespace,
    parse_price,
    reject_rare_classes,
    root_category,
    split_location,
    strip_gumtree_suffix,
)
from pipeline_steps.errors import ConfigError, DataValidationError

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "marketplace"

PARAMS = {
    "image_size": 24,
    "pad_colour": [0, 0, 0],
    "min_products_per_class": 2,
    "dedupe_subset": ["product_name", "location", "product_description", "price", "create_time"],
    "price_outlier": {"max_price": 100000.0, "min_price": 0.0},
    "text": {"strip_gumtree_suffix": True},
    "split": {"seed": 13, "val_fraction": 0.25, "test_fraction": 0.25},
    "num_workers": 1,
}


# --------------------------------------------------------------------------- cell rules


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("£5.00", 5.0),
        ("£1,234.00", 1234.0),
        ("£1,234,567.00", 1234567.0),
        ("£10,000,000.00", 10_000_000.0),
        ("£0.00", 0.0),
        (" £20 ", 20.0),
        ("35", 35.0),
        ("Â£12.50", 12.5),
        ("Free", None),
        ("", None),
        ("abc", None),
        ("£", None),
        ("1,23", None),
        ("£-5.00", None),
        ("nan", None),
        (None, None),
        (float("nan"), None),
        (pd.NA, None),
    ],
)
def test_parse_price(text: str | None, expected: float | None) -> None:
    assert parse_price(text) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Mirror wall art | in Wokingham, Berkshire | Gumtree", "Mirror wall art"),
        ("Sun loungers | in Skegness, Lincolnshire | Gumtree", "Sun loungers"),
        ("Sofa | in London | Gumtree", "Sofa"),
        ("Digital Piano (Gear4Music) | 88 Weighted Keys | Pedal | in Leeds, West Yorkshire | Gumtree",
         "Digital Piano (Gear4Music) | 88 Weighted Keys | Pedal"),
        ("PLUSH VELVET || VERONA CORNER SOFA | in Bolton, Manchester | Gumtree", "PLUSH VELVET || VERONA CORNER SOFA"),
        ("Bike | Gumtree", "Bike"),
        ("Plain name", "Plain name"),
        ("Gumtree | Gumtree fan mug", "Gumtree | Gumtree fan mug"),
    ],
)
def test_strip_gumtree_suffix(name: str, expected: str) -> None:
    assert strip_gumtree_suffix(name) == expected


def test_suffix_is_kept_when_stripping_is_off() -> None:
    frame = _products_frame([_row("p1", "Chair | in Leeds, West Yorkshire | Gumtree")])
    assert clean_products(frame, {**PARAMS, "min_products_per_class": 1, "text": {"strip_gumtree_suffix": False}}).products[
        "product_name"
    ].tolist() == ["Chair | in Leeds, West Yorkshire | Gumtree"]


def test_whitespace_and_carriage_returns_are_normalised() -> None:
    assert normalise_whitespace("  coffee table\rOriginal  text\r\n\tdetail ") == "coffee table Original text detail"
    assert normalise_whitespace(None) == ""
    assert normalise_whitespace(pd.NA) == ""


def test_non_ascii_text_is_kept_intact() -> None:
    text = "💥DIVAN BED💥 Morphy Richard’s “crème brûlée” set — naïve café £20"
    assert normalise_whitespace(text) == text
    assert strip_gumtree_suffix(text + " | in Bath, Somerset | Gumtree") == text


def test_text_puts_the_name_first() -> None:
    assert build_text("Sofa", "Grey, 3 seater") == "Sofa. Grey, 3 seater"
    assert build_text("Sofa", "") == "Sofa"


@pytest.mark.parametrize(
    ("category", "root"),
    [
        ("Home & Garden / Dining, Living Room Furniture / Mirrors, Clocks & Ornaments", "Home & Garden"),
        ("Appliances / Kitchen Appliances", "Appliances"),
        ("Other Goods", "Other Goods"),
        ("  Music, Films, Books & Games  /  Music ", "Music, Films, Books & Games"),
        ("Home & Garden/Furniture", "Home & Garden/Furniture"),  # only " / " separates levels
    ],
)
def test_root_category(category: str, root: str) -> None:
    assert root_category(category) == root


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("Wokingham, Berkshire", ("Wokingham", "Berkshire")),
        ("Stratford-upon-Avon, Warwickshire", ("Stratford-upon-Avon", "Warwickshire")),
        ("Newport, Isle of Wight, Hampshire", ("Newport, Isle of Wight", "Hampshire")),
        ("London", ("London", "")),
        ("", ("", "")),
    ],
)
def test_split_location(location: str, expected: tuple[str, str]) -> None:
    assert split_location(location) == expected


def test_price_outliers_are_flagged_by_the_configured_rule() -> None:
    prices = pd.Series([0.0, 0.01, 50.0, 100000.0, 100000.01, 10_000_000.0])
    assert flag_price_outliers(prices, 0.0, 100000.0).tolist() == [True, False, False, False, True, True]
    assert flag_price_outliers(prices, None, None).tolist() == [False] * 6


# --------------------------------------------------------------------------- table rules


def _row(pid: str, name: str = "Chair", category: str = "Home & Garden / Chairs", price: str = "£5.00",
         description: str = "Solid oak", location: str = "Leeds, West Yorkshire", source_row: int = 0) -> dict:
    return {"id": pid, "product_name": name, "category": category, "product_description": description,
            "price": price, "location": location, "source_row": source_row}


def _products_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows).astype(str)
    if "source_row" not in frame:
        frame["source_row"] = [str(i) for i in range(len(frame))]
    return frame


def test_duplicates_keep_the_first_listing_and_skip_absent_columns() -> None:
    frame = pd.DataFrame(
        {"product_id": ["b", "a", "c"], "product_name": ["Sofa"] * 3, "location": ["Leeds"] * 3,
         "product_description": ["Grey", "Grey", "Blue"], "price": [10.0, 10.0, 10.0]}
    )
    kept, rejects = drop_duplicates(frame, PARAMS["dedupe_subset"])  # no create_time column here

    assert kept["product_id"].tolist() == ["b", "c"]
    assert rejects[["record_id", "reason", "value"]].values.tolist() == [["a", cleaning.DUPLICATE, "b"]]
    assert rejects["column"].iloc[0] == "product_name,location,product_description,price"


def test_create_time_is_part_of_the_duplicate_key_when_present() -> None:
    frame = pd.DataFrame({"product_id": ["a", "b"], "product_name": ["Sofa"] * 2, "create_time": ["2022-01-01", "2022-02-01"]})
    kept, rejects = drop_duplicates(frame, ["product_name", "create_time"])
    assert len(kept) == 2 and rejects.empty


def test_duplicates_compare_cleaned_values() -> None:
    frame = _products_frame([
        _row("p2", name="Sofa | in Leeds, West Yorkshire | Gumtree", description="Grey\r3 seater", price="£1,000.00"),
        _row("p1", name="Sofa", description="Grey 3 seater ", price="1000", source_row=5),
        _row("p3", name="Table"),
    ])
    frame.loc[0, "source_row"] = "1"
    result = clean_products(frame, {**PARAMS, "min_products_per_class": 1})
    assert result.products["product_id"].tolist() == ["p2", "p3"]  # p2 comes first in the file
    assert result.stats["duplicates_removed"] == 1
    assert result.stats["dedupe_columns"] == ["product_name", "location", "product_description", "price"]


def test_rare_classes_are_rejected_with_a_reason() -> None:
    frame = pd.DataFrame({"product_id": ["a", "b", "c"], "category": ["X", "X", "Y"], "source_row": [0, 1, 2]})
    kept, rejects = reject_rare_classes(frame, 2)
    assert kept["product_id"].tolist() == ["a", "b"]
    assert rejects[["record_id", "column", "reason", "value"]].values.tolist() == [["c", "category", "rare_category", "Y"]]


def test_clean_products_applies_every_rule() -> None:
    frame = _products_frame([
        _row("p3", name="Kettle | in Bath, Somerset | Gumtree", category="Appliances / Kitchen", price="£1,234,567.00",
             description="", location="Bath, Somerset"),
        _row("p1", name="Toaster", category="Appliances / Kitchen", price="Free"),
        _row("p2", name="Fridge", category="Appliances", price="£0.00", location="London"),
        _row("p4", name="Oven", category="Appliances / Ovens", price=""),
        _row("p5", name="Lamp", category="Home & Garden / Lighting", price="£12.00"),
        _row("p6", name="Wok", category="Appliances / Kitchen", price="£7.50", description="Great\r\rwok  😀"),
    ])
    result = clean_products(frame, PARAMS)
    products = result.products.set_index("product_id")

    assert products.index.tolist() == ["p2", "p3", "p6"]  # sorted; p1/p4 bad price, p5 rare class
    assert result.labels == {"classes": ["Appliances"], "label_to_index": {"Appliances": 0}}
    assert products["label"].tolist() == [0, 0, 0]
    assert products.loc["p3", "product_name"] == "Kettle"
    assert products.loc["p3", "text"] == "Kettle"
    assert products.loc["p6", "text"] == "Wok. Great wok 😀"
    assert products.loc["p3", "price"] == 1234567.0
    assert products["price_is_outlier"].tolist() == [True, True, False]  # £0.00 and £1.2m flagged, kept
    assert products.loc["p2", ["town", "county"]].tolist() == ["London", ""]
    assert products.loc["p3", "category_path"] == "Appliances / Kitchen"
    assert result.stats == {"duplicates_removed": 0, "outliers_flagged": 2, "locations_without_county": 1,
                            "dedupe_columns": ["product_name", "location", "product_description", "price"]}
    reasons = dict(zip(result.rejects["record_id"], result.rejects["reason"]))
    assert reasons == {"p1": "price_unparseable", "p4": "price_unparseable", "p5": "rare_category"}
    assert result.rejects.loc[result.rejects["record_id"] == "p1", "value"].item() == "Free"
    assert list(result.rejects.columns) == cleaning.REJECT_COLUMNS


def test_missing_product_column_is_named() -> None:
    frame = _products_frame([_row("p1")]).drop(columns="price")
    with pytest.raises(DataValidationError, match="price"):
        clean_products(frame, PARAMS)


def test_repeated_ids_are_refused() -> None:
    with pytest.raises(DataValidationError, match="repeated 'product_id'"):
        clean_products(_products_frame([_row("p1"), _row("p1", name="Other")]), PARAMS)
    images = pd.DataFrame({"id": ["i1", "i1"], "product_id": ["p1", "p1"]})
    with pytest.raises(DataValidationError, match="repeated 'image_id'"):
        link_images(images, pd.DataFrame({"product_id": ["p1"]}), cleaning.empty_rejects())


def test_nothing_left_is_an_error_not_an_empty_dataset() -> None:
    with pytest.raises(DataValidationError, match="min_products_per_class"):
        clean_products(_products_frame([_row("p1")]), {**PARAMS, "min_products_per_class": 5})


def test_images_follow_their_products_fate() -> None:
    products = pd.DataFrame({"product_id": ["keep"]})
    product_rejects = pd.DataFrame({"record_id": ["dup", "bad"], "reason": [cleaning.DUPLICATE, cleaning.PRICE_UNPARSEABLE]})
    images = pd.DataFrame({
        "id": ["i4", "i1", "i2", "i3", "../evil"],
        "product_id": ["keep", "keep", "dup", "bad", "keep"],
        "source_row": [0, 1, 2, 3, 4],
    })
    linked, rejects = link_images(images, products, product_rejects)

    assert linked["image_id"].tolist() == ["i1", "i4"]
    got = {r: (reason, value) for r, reason, value in zip(rejects["record_id"], rejects["reason"], rejects["value"])}
    assert got == {
        "i2": ("duplicate_product", "dup"),
        "i3": ("product_rejected", "price_unparseable"),
        "../evil": ("invalid_image_id", "../evil"),
    }
    orphan = pd.DataFrame({"id": ["i9"], "product_id": ["ghost"], "source_row": [0]})
    assert link_images(orphan, products, product_rejects)[1]["reason"].tolist() == ["unknown_product"]


# --------------------------------------------------------------------------- the whole stage


def _validated_layer(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny validated layer: 2 classes (+1 rare), a duplicate, a bad price, odd photo modes, a broken photo."""
    validated, raw_images = tmp_path / "validated", tmp_path / "raw_images"
    validated.mkdir()
    raw_images.mkdir()
    rows = [
        _row(f"a{i}", name=f"Kettle {i} | in Bath, Somerset | Gumtree", category="Appliances / Kitchen",
             price=f"£{i + 1},000.00", description=f"Kettle number {i}\rboils", location="Bath, Somerset", source_row=i)
        for i in range(6)
    ] + [
        _row(f"h{i}", name=f"Lamp “{i}” 💡", category="Home & Garden", price="£5.00", location="London", source_row=10 + i)
        for i in range(5)
    ] + [
        _row("h-dup", name="Lamp “0” 💡", category="Home & Garden", price="£5.00", location="London", source_row=20),
        _row("bad-price", name="Freebie", category="Home & Garden", price="Free", source_row=21),
        _row("rare", name="Guitar", category="Music, Films, Books & Games / Guitars", source_row=22),
    ]
    products = _products_frame(rows)
    products["source_row"] = products["source_row"].astype("int64")
    products.to_parquet(validated / "products.parquet", index=False)

    photos = {
        "img-a0-1": ("a0", Image.new("RGB", (60, 30), (200, 10, 10)), "JPEG"),
        "img-a0-2": ("a0", Image.new("L", (10, 80), 90), "JPEG"),
        "img-a1-1": ("a1", Image.new("RGBA", (40, 40), (0, 0, 255, 100)), "PNG"),
        "img-a2-1": ("a2", Image.new("CMYK", (500, 4), (0, 255, 0, 0)), "JPEG"),
        "img-h0-1": ("h0", Image.new("P", (33, 33), 3), "PNG"),
        "img-h1-1": ("h1", Image.fromarray(__import__("numpy").full((20, 20), 40000, dtype="uint16")), "PNG"),
        "img-dup-1": ("h-dup", Image.new("RGB", (30, 30)), "JPEG"),
        "img-bad-1": ("bad-price", Image.new("RGB", (30, 30)), "JPEG"),
        "img-rare-1": ("rare", Image.new("RGB", (30, 30)), "JPEG"),
        "img-broken": ("h2", None, None),
        "img-missing": ("h3", None, None),
    }
    image_rows = []
    for index, (image_id, (product_id, image, fmt)) in enumerate(sorted(photos.items())):
        if image is not None:
            image.save(raw_images / f"{image_id}.jpg", format=fmt)
        elif image_id == "img-broken":
            (raw_images / f"{image_id}.jpg").write_bytes(b"\xff\xd8\xff truncated")
        image_rows.append({"id": image_id, "product_id": product_id, "source_row": index,
                           "file_format": fmt or "JPEG", "file_mode": image.mode if image else "RGB",
                           "file_width": 1, "file_height": 1})
    pd.DataFrame(image_rows).to_parquet(validated / "images.parquet", index=False)
    return validated, raw_images


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_clean_dataset_end_to_end(tmp_path: Path) -> None:
    validated, raw_images = _validated_layer(tmp_path)
    out = tmp_path / "clean"

    manifest = clean_dataset(validated, raw_images, out, PARAMS, progress=False)

    products = pd.read_parquet(out / "products.parquet")
    images = pd.read_parquet(out / "images.parquet")
    listings = pd.read_parquet(out / "listings.parquet")
    rejects = pd.read_csv(out / "rejects.csv", dtype=str, keep_default_na=False)
    assert list(products.columns) == cleaning.PRODUCT_COLUMNS
    assert list(images.columns) == cleaning.IMAGE_COLUMNS
    assert list(rejects.columns) == cleaning.REJECT_COLUMNS

    assert products["product_id"].tolist() == sorted([f"a{i}" for i in range(6)] + [f"h{i}" for i in range(5)])
    assert images["image_id"].tolist() == ["img-a0-1", "img-a0-2", "img-a1-1", "img-a2-1", "img-h0-1", "img-h1-1"]
    labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    assert labels == {"classes": ["Appliances", "Home & Garden"], "label_to_index": {"Appliances": 0, "Home & Garden": 1}}
    assert set(products["split"]) <= {"train", "val", "test"} and products["split"].notna().all()

    by_id = products.set_index("product_id")
    assert by_id.loc["a0", "n_images"] == 2 and by_id.loc["h2", "n_images"] == 0 and by_id.loc["a5", "n_images"] == 0
    assert by_id.loc["h0", "product_name"] == "Lamp “0” 💡"
    assert by_id.loc["a0", "text"] == "Kettle 0. Kettle number 0 boils"
    image_split = images.set_index("image_id")
    assert image_split.loc["img-a0-2", "split"] == by_id.loc["a0", "split"]
    assert image_split.loc["img-h0-1", "label"] == 1

    for path in images["path"]:
        with Image.open(out / path) as photo:
            assert (photo.format, photo.mode, photo.size) == ("JPEG", "RGB", (24, 24))
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i}.jpg" for i in images["image_id"]]

    assert len(listings) == len(images) + int((products["n_images"] == 0).sum())
    assert listings.loc[listings["product_id"] == "a5", "image_id"].isna().all()

    reasons = dict(zip(rejects["record_id"], rejects["reason"]))
    assert reasons == {
        "h-dup": "duplicate_product", "bad-price": "price_unparseable", "rare": "rare_category",
        "img-dup-1": "duplicate_product", "img-bad-1": "product_rejected", "img-rare-1": "product_rejected",
        "img-broken": "image_unreadable", "img-missing": "image_missing",
    }

    assert manifest == json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert {key: value for key, value in manifest.items() if isinstance(value, int)} == {
        "n_products": 11, "n_images": 6, "n_listings": len(listings), "n_classes": 2,
        "n_products_without_images": 6, "n_rejects": 8, "duplicates_removed": 1, "duplicate_images_removed": 1,
        "outliers_flagged": 0, "locations_without_county": 5, "image_size": 24,
    }
    assert manifest["inputs"] == {"products": 14, "images": 11}
    assert manifest["classes"] == labels["classes"]
    assert manifest["images_converted_by_mode"] == {"CMYK": 1, "I;16": 1, "L": 1, "P": 1, "RGB": 1, "RGBA": 1}
    assert manifest["rejects"]["by_file"]["Products.csv"] == {
        "duplicate_product": 1, "price_unparseable": 1, "rare_category": 1,
    }
    assert sum(manifest["rejects"]["by_reason"].values()) == 8
    assert manifest["dedupe_columns"] == ["product_name", "location", "product_description", "price"]
    assert sum(manifest["split_totals"]["products"].values()) == 11
    assert sum(manifest["split_totals"]["images"].values()) == 6
    counts = manifest["counts"]["products"]
    assert set(counts) == {"train", "val", "test"} and set(counts["train"]) == set(labels["classes"])
    assert sum(counts[s][c] for s in counts for c in labels["classes"]) == 11
    assert all(counts["train"][c] >= 1 for c in labels["classes"])


def test_rerun_gives_identical_files_and_replaces_stale_photos(tmp_path: Path) -> None:
    validated, raw_images = _validated_layer(tmp_path)
    out = tmp_path / "clean"
    clean_dataset(validated, raw_images, out, PARAMS, progress=False)
    first = _digest(out)
    (out / "images" / "stale.jpg").write_bytes(b"left over from an older run")

    clean_dataset(validated, raw_images, out, {**PARAMS, "num_workers": 2}, progress=False)  # threads: same bytes

    assert _digest(out) == first
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_a_failing_run_leaves_the_previous_clean_layer_untouched(tmp_path: Path) -> None:
    validated, raw_images = _validated_layer(tmp_path)
    out = tmp_path / "clean"
    clean_dataset(validated, raw_images, out, PARAMS, progress=False)
    before = _digest(out)

    with pytest.raises(DataValidationError):
        clean_dataset(validated, raw_images, out, {**PARAMS, "min_products_per_class": 1000}, progress=False)

    assert _digest(out) == before


def test_bad_image_params_fail_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cleaning.image_size"):
        clean_dataset(tmp_path, tmp_path, tmp_path / "out", {**PARAMS, "image_size": 0}, progress=False)
    with pytest.raises(ConfigError, match="cleaning.pad_colour"):
        clean_dataset(tmp_path, tmp_path, tmp_path / "out", {**PARAMS, "pad_colour": [0, 0]}, progress=False)
    with pytest.raises(ConfigError, match="cleaning.num_workers"):
        clean_dataset(tmp_path, tmp_path, tmp_path / "out", {**PARAMS, "num_workers": 0}, progress=False)
    with pytest.raises(ConfigError, match="cleaning.split.val_fraction"):
        clean_dataset(tmp_path, tmp_path, tmp_path / "out", {**PARAMS, "split": {**PARAMS["split"], "val_fraction": 2}}, progress=False)
    with pytest.raises(DataValidationError, match="validate stage"):
        clean_dataset(tmp_path, tmp_path, tmp_path / "out", PARAMS, progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- real export


@pytest.mark.realdata
def test_real_products_clean_into_13_classes() -> None:
    if not (REAL_DATA / "Products.csv").is_file():
        pytest.skip(f"real data not present at {REAL_DATA}")
    raw = pd.read_csv(REAL_DATA / "Products.csv", lineterminator="\n", dtype=str, keep_default_na=False)
    raw["source_row"] = range(len(raw))
    params = {**PARAMS, "min_products_per_class": 5}

    result = clean_products(raw, params)
    products = result.products

    assert len(result.labels["classes"]) == 13
    assert products["product_id"].is_unique and products["product_id"].is_monotonic_increasing
    assert not products["product_name"].str.contains(r"\| Gumtree$").any()
    assert not products["text"].str.contains("\r").any()
    assert products["price"].notna().all()
    assert products["product_name"].str.contains("[^\x00-\x7f]").any()  # emoji and curly quotes survive
    assert result.stats["duplicates_removed"] >= 1
    assert result.stats["outliers_flagged"] > 0
    assert len(products) + len(result.rejects) == len(raw)
