"""The generated sample must look like the real export to every later stage.

These tests pin the contract the validation and cleaning code rely on: the raw
layout and columns, byte-for-byte determinism, and every quirk present in its
counted amount, where the manifest says it is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline_steps.errors import ConfigError
from pipeline_steps.sample_data import (
    BAD_PRICES,
    CATEGORIES,
    MANIFEST_NAME,
    ODD_MODE_FORMATS,
    class_names,
    format_price,
    generate_sample,
    parse_params,
    quirk_count,
    render_photo,
)

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "marketplace"
N = 60
PARAMS: dict[str, Any] = {
    "seed": 42,
    "n_products": N,
    "max_images_per_product": 3,
    "image_size_min": 48,
    "image_size_max": 96,
    "quirks": {
        "duplicate_listing": 0.02,
        "empty_description": 0.03,
        "bad_price": 0.05,
        "carriage_return": 0.03,
        "category_without_separator": 0.01,
        "no_image": 0.04,
        "odd_image_mode": 0.08,
    },
    "label_noise": 0.06,
}
PRODUCT_COLUMNS = ["Unnamed: 0", "id", "product_name", "category", "product_description", "price", "location"]
IMAGE_COLUMNS = ["Unnamed: 0", "id", "product_id", "bucket_link", "image_ref", "create_time"]
OPTIONAL_PRODUCT_COLUMNS = {"url", "page_id", "create_time"}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("sample") / "raw"
    return out, generate_sample(out, PARAMS)


@pytest.fixture(scope="module")
def products(sample: tuple[Path, dict[str, Any]]) -> pd.DataFrame:
    return pd.read_csv(sample[0] / "Products.csv", lineterminator="\n", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def images(sample: tuple[Path, dict[str, Any]]) -> pd.DataFrame:
    return pd.read_csv(sample[0] / "Images.csv", dtype=str, keep_default_na=False)


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _price_value(price: str) -> float:
    return float(price.lstrip("£").replace(",", ""))


# ---------------------------------------------------------------- layout


def test_layout_and_columns(sample, products, images):
    out, manifest = sample
    assert {p.name for p in out.iterdir()} == {"Products.csv", "Images.csv", "images", MANIFEST_NAME}
    assert list(products.columns[:7]) == PRODUCT_COLUMNS
    assert set(products.columns[7:]) <= OPTIONAL_PRODUCT_COLUMNS
    assert list(images.columns) == IMAGE_COLUMNS
    assert len(products) == N == manifest["counts"]["products"] == manifest["n_products"]
    assert manifest["params"] == PARAMS  # the generate flow compares these to skip up-to-date samples
    assert len(images) == manifest["counts"]["image_rows"]
    assert products["id"].is_unique and images["id"].is_unique
    assert set(images["product_id"]) <= set(products["id"])
    assert json.loads((out / MANIFEST_NAME).read_text()) == json.loads(json.dumps(manifest))


@pytest.mark.skipif(not (REAL_DIR / "Products.csv").is_file(), reason="real data not available")
def test_columns_match_real_export(products, images):
    real_products = pd.read_csv(REAL_DIR / "Products.csv", lineterminator="\n", nrows=5)
    real_images = pd.read_csv(REAL_DIR / "Images.csv", nrows=5)
    assert list(products.columns[: len(real_products.columns)]) == list(real_products.columns)
    assert set(products.columns) - set(real_products.columns) <= OPTIONAL_PRODUCT_COLUMNS
    assert list(images.columns) == list(real_images.columns)


@pytest.mark.skipif(not (REAL_DIR / "Products.csv").is_file(), reason="real data not available")
def test_roots_are_the_real_ones():
    real = pd.read_csv(REAL_DIR / "Products.csv", lineterminator="\n", usecols=["category"])
    assert sorted(real["category"].str.split(" / ").str[0].unique()) == class_names()


@pytest.mark.skipif(not (REAL_DIR / "Products.csv").is_file(), reason="real data not available")
def test_line_endings_match_real_export(sample):
    for name in ("Products.csv", "Images.csv"):
        real_crlf = (REAL_DIR / name).read_bytes()[:4096].count(b"\r\n") > 0
        ours = (sample[0] / name).read_bytes()
        assert ours.endswith(b"\r\n") == real_crlf, name


def test_ids_are_uuid4_shaped(products, images):
    pattern = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
    assert products["id"].str.match(pattern).all()
    assert images["id"].str.match(pattern).all()


def test_listing_fields_look_like_gumtree(products, images):
    suffixes = " | in " + products["location"] + " | Gumtree"
    assert all(name.endswith(suffix) for name, suffix in zip(products["product_name"], suffixes))
    assert products["create_time"].str.match(r"^\d{4}-\d{2}-\d{2}$").all()
    assert all(link.endswith(f"/{image_id}.jpg") for link, image_id in zip(images["bucket_link"], images["id"]))
    assert images["image_ref"].str.len().eq(16).all()
    assert products["location"].str.contains(", ").mean() > 0.8


def test_all_thirteen_roots_present(products, sample):
    roots = products["category"].str.split(" / ").str[0]
    assert sorted(roots.unique()) == class_names() == sample[1]["classes"]
    assert len(class_names()) == 13
    assert sum(sample[1]["counts"]["products_per_root"].values()) == N


def test_prices_parse(products, sample):
    bad = set(sample[1]["quirks"]["bad_price"]["ids"])
    good = products.loc[~products["id"].isin(bad), "price"]
    assert good.str.match(r"^£\d{1,3}(,\d{3})*\.\d{2}$").all()
    assert (good.map(_price_value) > 0).all()


@pytest.mark.parametrize(("value", "text"), [(5, "£5.00"), (1234, "£1,234.00"), (10_000_000, "£10,000,000.00"),
                                           (12.5, "£12.50")])
def test_price_format_matches_export(value, text):
    assert format_price(value) == text
    assert _price_value(text) == value


# ---------------------------------------------------------------- determinism


def test_same_params_give_identical_bytes(sample, tmp_path):
    out, manifest = sample
    again = generate_sample(tmp_path / "again", PARAMS)
    assert _tree_hashes(out) == _tree_hashes(tmp_path / "again")
    assert again == manifest


def test_other_seed_gives_other_data(sample, tmp_path):
    other = generate_sample(tmp_path / "other", {**PARAMS, "seed": 7})
    assert other["sha256"]["Products.csv"] != sample[1]["sha256"]["Products.csv"]


def test_regenerating_replaces_the_folder(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    generate_sample(out, {**PARAMS, "n_products": 30})
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temporary leftovers


# ---------------------------------------------------------------- quirks


@pytest.mark.parametrize("name", ["duplicate_listing", "empty_description", "bad_price",
                                  "category_without_separator", "no_image", "odd_image_mode"])
def test_quirk_counts_follow_fractions(sample, name):
    record = sample[1]["quirks"][name]
    assert record["count"] == len(record["ids"]) == quirk_count(PARAMS["quirks"][name], N) >= 1
    assert len(set(record["ids"])) == record["count"]


def test_label_noise_is_counted(sample, products):
    record = sample[1]["quirks"]["label_noise"]
    assert record["count"] == quirk_count(PARAMS["label_noise"], N)
    roots = dict(zip(products["id"], products["category"].str.split(" / ").str[0]))
    assert all(roots[pid] != content for pid, content in record["details"].items())


def test_duplicates_repeat_listing_under_new_id(sample, products):
    by_id = products.set_index("id")
    columns = ["product_name", "category", "product_description", "price", "location", "create_time"]
    for duplicate, source in sample[1]["quirks"]["duplicate_listing"]["details"].items():
        assert duplicate != source
        assert by_id.loc[duplicate, columns].tolist() == by_id.loc[source, columns].tolist()
        assert by_id.index.get_loc(duplicate) > by_id.index.get_loc(source)


def test_empty_descriptions(sample, products):
    ids = set(sample[1]["quirks"]["empty_description"]["ids"])
    assert set(products.loc[products["product_description"] == "", "id"]) == ids


def test_bad_prices_cycle(sample, products):
    record = sample[1]["quirks"]["bad_price"]
    prices = products.set_index("id").loc[record["ids"], "price"].tolist()
    assert prices == [BAD_PRICES[i % 3] for i in range(record["count"])]
    assert set(prices) == set(BAD_PRICES)  # 0.05 * 60 = 3: each marker once


def test_carriage_returns_inside_and_outside_quotes(sample, products):
    out, manifest = sample
    record = manifest["quirks"]["carriage_return"]
    assert record["count"] == max(2, quirk_count(PARAMS["quirks"]["carriage_return"], N))
    with_cr = products.loc[products["product_description"].str.contains("\r", regex=False), "id"]
    assert set(with_cr) == set(record["ids"])
    inside, outside = _carriage_returns_by_quoting((out / "Products.csv").read_bytes())
    assert inside > 0 and outside > 0
    assert set(record["details"].values()) == {"inside_quotes", "outside_quotes"}


def _carriage_returns_by_quoting(raw: bytes) -> tuple[int, int]:
    inside = outside = 0
    quoted = False
    for byte in raw:
        if byte == ord('"'):
            quoted = not quoted
        elif byte == ord("\r"):
            inside, outside = (inside + 1, outside) if quoted else (inside, outside + 1)
    return inside, outside


def test_default_parser_is_fooled_like_on_real_data(sample):
    """The stray \r outside quotes must split rows unless lineterminator='\n' is given."""
    assert len(pd.read_csv(sample[0] / "Products.csv")) != N
    assert len(pd.read_csv(sample[0] / "Products.csv", lineterminator="\n")) == N


def test_categories_without_separator(sample, products):
    ids = set(sample[1]["quirks"]["category_without_separator"]["ids"])
    assert set(products.loc[~products["category"].str.contains(" / ", regex=False), "id"]) == ids


def test_products_without_images(sample, products, images):
    ids = set(sample[1]["quirks"]["no_image"]["ids"])
    assert set(products["id"]) - set(images["product_id"]) == ids
    per_product = images.groupby("product_id").size()
    assert per_product.max() <= PARAMS["max_images_per_product"]


def test_single_file_quirks(sample, images):
    out, manifest = sample
    quirks = manifest["quirks"]
    folder = out / "images"
    listed = set(images["id"])
    files = {p.stem for p in folder.iterdir()}
    for name in ("zero_byte_image", "truncated_image", "png_as_jpg", "missing_image_file", "orphan_image_file"):
        assert quirks[name]["count"] == 1
    (zero,), (truncated,), (png,) = (quirks[n]["ids"] for n in ("zero_byte_image", "truncated_image", "png_as_jpg"))
    (missing,), (orphan,) = quirks["missing_image_file"]["ids"], quirks["orphan_image_file"]["ids"]
    assert (folder / f"{zero}.jpg").stat().st_size == 0
    with pytest.raises(OSError):
        Image.open(folder / f"{truncated}.jpg").load()
    assert Image.open(folder / f"{png}.jpg").format == "PNG"
    assert missing in listed and missing not in files
    assert orphan in files and orphan not in listed
    assert listed - files == {missing}
    assert files - listed == {orphan}
    Image.open(folder / f"{orphan}.jpg").load()


def test_odd_modes_and_formats(sample):
    out, manifest = sample
    details = manifest["quirks"]["odd_image_mode"]["details"]
    assert {d["mode"] for d in details.values()} == set(ODD_MODE_FORMATS)
    for image_id, info in details.items():
        with Image.open(out / "images" / f"{image_id}.jpg") as image:
            assert (image.mode, image.format) == (info["mode"], info["format"])
            assert list(image.size) == info["size"]


def test_other_images_decode_as_rgb_jpeg(sample, images):
    out, manifest = sample
    broken = {i for name in ("zero_byte_image", "truncated_image", "png_as_jpg", "missing_image_file")
              for i in manifest["quirks"][name]["ids"]}
    odd = set(manifest["quirks"]["odd_image_mode"]["ids"])
    low, high = PARAMS["image_size_min"], PARAMS["image_size_max"]
    for image_id in set(images["id"]) - broken - odd:
        with Image.open(out / "images" / f"{image_id}.jpg") as image:
            image.load()
            assert (image.format, image.mode) == ("JPEG", "RGB")
            width, height = image.size
            assert low <= width <= high and low <= height <= high and width != height


def test_quirks_do_not_overlap(sample):
    quirks = sample[1]["quirks"]
    product_level = [n for n, r in quirks.items() if r["unit"] == "product"]
    seen: set[str] = set()
    for name in product_level:
        ids = set(quirks[name]["ids"])
        assert not ids & seen, name
        seen |= ids


# ---------------------------------------------------------------- params and signal


@pytest.mark.parametrize("change", [
    {"n_products": 0},
    {"image_size_min": 100, "image_size_max": 100},
    {"quirks": {"typo_quirk": 0.1}},
    {"label_noise": 1.5},
    {"n_products": 10},
])
def test_bad_params_raise_config_error(change):
    with pytest.raises(ConfigError):
        parse_params({**PARAMS, **change})


def test_missing_key_names_it():
    with pytest.raises(ConfigError, match="sample.seed"):
        parse_params({k: v for k, v in PARAMS.items() if k != "seed"})


def test_photos_depend_on_category():
    """Mean colour alone should tell two roots with different palettes apart most of the time."""
    def mean_colour(root: str, k: int) -> np.ndarray:
        spec = next(s for s in CATEGORIES if s.root == root)
        image = render_photo(np.random.default_rng([0, k]), spec, (64, 80))
        return np.asarray(image, dtype=float).reshape(-1, 3).mean(axis=0)

    red = np.array([mean_colour("Video Games & Consoles", k) for k in range(30)])
    green = np.array([mean_colour("Home & Garden", k) for k in range(30, 60)])
    assert red[:, 0].mean() > green[:, 0].mean() and green[:, 1].mean() > red[:, 1].mean()


def test_text_is_learnable_but_not_trivial(tmp_path):
    """A TF-IDF linear model lands well above chance (1/13) and well below perfect."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    out = tmp_path / "raw"
    generate_sample(out, {**PARAMS, "n_products": 390, "max_images_per_product": 1,
                          "image_size_min": 32, "image_size_max": 34})
    frame = pd.read_csv(out / "Products.csv", lineterminator="\n", dtype=str, keep_default_na=False)
    roots = frame["category"].str.split(" / ").str[0].to_numpy()
    text = frame["product_name"].str.split(" | ", regex=False).str[0] + ". " + frame["product_description"]
    train = np.arange(len(frame)) % 3 != 0
    vectoriser = TfidfVectorizer(sublinear_tf=True)
    model = LogisticRegression(C=10.0, max_iter=1000).fit(vectoriser.fit_transform(text[train]), roots[train])
    accuracy = (model.predict(vectoriser.transform(text[~train])) == roots[~train]).mean()
    assert 0.35 < accuracy < 0.95
