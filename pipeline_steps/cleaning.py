"""Clean stage: validated tables -> model-ready products, photos, labels and splits.

The validated layer guarantees structure (columns present, ids unique, images
readable headers); this stage applies the *meaning* rules the seed projects
applied, but without their silent losses:

- prices become floats; an unparseable price ("Free", "") is a reject with a
  reason, never a NaN that quietly disappears from the price model;
- absurd prices are kept and flagged (`price_is_outlier`), so the classifiers
  keep the listing while the price model can leave it out;
- names lose the scraped "| in Town, County | Gumtree" tail (it leaks the
  location into the text models), text keeps its emoji, accents and quotes;
- duplicates, rare categories and unusable photos are dropped *and counted*
  (rejects.csv + manifest.json), so every input row is accounted for.

The table functions are pure (DataFrame in, DataFrame out) so they are tested
on small frames; `clean_dataset` does the I/O, atomically, in a fixed order so
identical inputs give byte-identical outputs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_steps import clean_schema, io_utils
from pipeline_steps.clean_schema import require_columns  # noqa: F401  (re-exported: cleaning.require_columns)
from pipeline_steps.errors import ConfigError, DataValidationError
from pipeline_steps.images import IMAGE_MISSING, ImageResult, ImageTask, convert_images
from pipeline_steps.splitting import SPLITS, assign_splits, split_settings

LOGGER = logging.getLogger(__name__)

PRODUCTS_FILE = "Products.csv"
IMAGES_FILE = "Images.csv"
REJECT_COLUMNS = ["source_file", "source_row", "record_id", "column", "reason", "value"]
REQUIRED_PRODUCT_COLUMNS = ("id", "product_name", "category", "product_description", "price", "location")
REQUIRED_IMAGE_COLUMNS = ("id", "product_id")
PRODUCT_COLUMNS = list(clean_schema.PRODUCT_COLUMNS)
IMAGE_COLUMNS = list(clean_schema.IMAGE_COLUMNS)
CATEGORY_SEPARATOR = " / "
IMAGES_SUBDIR = "images"

# Reject reasons (the `reason` column of rejects.csv and the keys of manifest["rejects"]["by_reason"]).
PRICE_UNPARSEABLE = "price_unparseable"
EMPTY_NAME = "empty_product_name"
MISSING_CATEGORY = "missing_category"
DUPLICATE = "duplicate_product"
RARE_CATEGORY = "rare_category"
PRODUCT_REJECTED = "product_rejected"
UNKNOWN_PRODUCT = "unknown_product"
INVALID_IMAGE_ID = "invalid_image_id"
REJECT_IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"

# "£1,234.00", "1234", "£ 5.5": thousands commas must be real groups of three, so "1,23" is not 123.
# "Â£" is the pound sign of a UTF-8 file read as Latin-1 (seen in the seed projects).
_PRICE_RE = re.compile(r"^(?:Â)?£?\s*(?P<number>\d{1,3}(?:,\d{3})+|\d+)(?P<decimals>\.\d+)?$")
# " | in Wokingham, Berkshire | Gumtree" (also a bare " | Gumtree"), at the very end of a name.
_GUMTREE_SUFFIX_RE = re.compile(r"(?:\s*\|\s*in\s[^|]*)?\s*\|\s*Gumtree\s*$", re.IGNORECASE)
_WHITESPACE_RE = re.compile(r"\s+")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# An image id becomes a file name: one path component, never "." or ".." (same rule as validation).
_SAFE_ID_RE = re.compile(r"^(?!\.\.?$)[^/\\\x00]+$")


# --------------------------------------------------------------------------- cell rules


def parse_price(value: Any) -> float | None:
    """'£1,234,567.00' -> 1234567.0; None when the text is not a price ('Free', '', 'abc', '-5').

    Returning None (not NaN) makes the caller decide, and the caller rejects the row:
    a listing whose price is unknown must not silently train the price model.
    """
    if _is_missing(value):
        return None
    match = _PRICE_RE.match(str(value).strip())
    if match is None:
        return None
    return float(match["number"].replace(",", "") + (match["decimals"] or ""))


def normalise_whitespace(value: Any) -> str:
    """Drop stray carriage returns and collapse every run of whitespace to one space.

    `\\r` separates lines in the real descriptions ("table\\rOriginal text"), so it
    becomes a space rather than vanishing, which would glue two words together.
    Non-ASCII characters (emoji, curly quotes, accents) are kept untouched; only
    whitespace (including non-breaking spaces) is collapsed.
    """
    if _is_missing(value):
        return ""
    text = _WHITESPACE_RE.sub(" ", str(value).replace("\r", " "))
    # Validation strips or rejects control characters (validation.text); a validated layer made
    # by an older run may still hold some, and no model or page should ever see them.
    return _CONTROL_RE.sub("", text).strip()


def _is_missing(value: Any) -> bool:
    """None, NaN and pd.NA (what a null parquet cell reads back as), never a real string."""
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def strip_gumtree_suffix(name: str) -> str:
    """'Sofa | in Leeds, West Yorkshire | Gumtree' -> 'Sofa'; names without the tail are unchanged.

    The tail repeats the location (already its own column) and the site name, which
    would let text models learn towns instead of products. Pipes inside the name
    itself ('Sofa || GREY || 3+2') are kept: only the trailing '| in ... | Gumtree' goes.
    """
    return _GUMTREE_SUFFIX_RE.sub("", name).strip()


def clean_name(value: Any, strip_suffix: bool = True) -> str:
    """Whitespace-normalised product name, without the Gumtree tail when asked."""
    name = normalise_whitespace(value)
    return strip_gumtree_suffix(name) if strip_suffix else name


def build_text(name: str, description: str) -> str:
    """Name first, so a tokenizer's truncation cuts the (long) description, not the (short) name."""
    return f"{name}. {description}" if description else name


def root_category(category: Any) -> str:
    """'Home & Garden / Dining / Mirrors' -> 'Home & Garden'; a path with no ' / ' is its own root."""
    return normalise_whitespace(category).split(CATEGORY_SEPARATOR, 1)[0].strip()


def split_location(location: Any) -> tuple[str, str]:
    """'Delph, Manchester' -> ('Delph', 'Manchester'); 'London' -> ('London', '').

    Split on the *last* ', ' so a town containing a comma stays whole. A missing county
    is common in real exports (big cities) and is not a reason to lose the listing.
    """
    text = normalise_whitespace(location)
    town, separator, county = text.rpartition(", ")
    if not separator:
        return text, ""
    return town.strip(), county.strip()


# --------------------------------------------------------------------------- table rules


@dataclass
class ProductCleaning:
    """Result of cleaning the products table (before images and splits are known)."""

    products: pd.DataFrame
    rejects: pd.DataFrame
    labels: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)


def empty_rejects() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=object) for column in REJECT_COLUMNS})


def make_rejects(
    frame: pd.DataFrame, source_file: str, id_column: str, column: str, reason: str, values: pd.Series | str
) -> pd.DataFrame:
    """Reject rows in the contract's shape: one row per record, with the offending value."""
    if frame.empty:
        return empty_rejects()
    source_rows = frame["source_row"] if "source_row" in frame else pd.Series(pd.NA, index=frame.index)
    value_series = values if isinstance(values, pd.Series) else pd.Series(values, index=frame.index)
    return pd.DataFrame(
        {
            "source_file": source_file,
            "source_row": source_rows.to_numpy(dtype=object),
            "record_id": frame[id_column].to_numpy(dtype=object),
            "column": column,
            "reason": reason,
            "value": value_series.loc[frame.index].to_numpy(dtype=object),
        }
    )


def require_unique(frame: pd.DataFrame, column: str, name: str) -> None:
    """Ids name output files and join tables: a repeated id would silently merge two records."""
    repeated = frame.loc[frame[column].duplicated(), column]
    if not repeated.empty:
        examples = repeated.iloc[:3].tolist()
        raise DataValidationError(f"{name} has {len(repeated)} repeated '{column}' value(s), e.g. {examples}")


def in_source_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in file order: 'keep first' of duplicates then means the first listing in the export."""
    if "source_row" not in frame:
        return frame.reset_index(drop=True)
    order = pd.to_numeric(frame["source_row"], errors="coerce")
    return frame.assign(_order=order).sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def normalise_products(raw: pd.DataFrame, strip_suffix: bool = True) -> pd.DataFrame:
    """Add the cleaned columns next to the raw ones (raw price kept as `price_raw` for rejects).

    Cleaned values replace product_name, product_description and location so that
    de-duplication compares what the models will see, not scraping noise.
    """
    frame = raw.copy()
    frame["product_id"] = frame["id"].map(normalise_whitespace)
    frame["product_name"] = frame["product_name"].map(lambda value: clean_name(value, strip_suffix))
    frame["product_description"] = frame["product_description"].map(normalise_whitespace)
    frame["text"] = [build_text(n, d) for n, d in zip(frame["product_name"], frame["product_description"])]
    frame["category_path"] = frame["category"].map(normalise_whitespace)
    frame["category"] = frame["category_path"].map(root_category)
    frame["price_raw"] = frame["price"]
    frame["price"] = pd.Series([parse_price(v) for v in frame["price"]], index=frame.index, dtype="float64")
    frame["location"] = frame["location"].map(normalise_whitespace)
    towns_counties = [split_location(location) for location in frame["location"]]
    frame["town"] = [town for town, _ in towns_counties]
    frame["county"] = [county for _, county in towns_counties]
    return frame


def reject_unusable(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows no model can use: unparseable price, no name left, no category. First reason wins."""
    rules = [
        ("price", PRICE_UNPARSEABLE, frame["price"].isna(), "price_raw"),
        ("product_name", EMPTY_NAME, frame["product_name"].eq(""), "product_name"),
        ("category", MISSING_CATEGORY, frame["category"].eq(""), "category_path"),
    ]
    rejected = pd.Series(False, index=frame.index)
    pieces = []
    for column, reason, mask, value_column in rules:
        new = mask & ~rejected
        pieces.append(make_rejects(frame[new], PRODUCTS_FILE, "product_id", column, reason, frame[value_column]))
        rejected |= new
    return frame[~rejected], concat_rejects(pieces)


def dedupe_columns(frame: pd.DataFrame, subset: Sequence[str]) -> list[str]:
    """The configured subset minus columns this export does not have (e.g. create_time)."""
    present = [column for column in subset if column in frame.columns]
    absent = [column for column in subset if column not in frame.columns]
    if absent:
        LOGGER.info("dedupe: columns %s absent from the data, de-duplicating on %s", absent, present)
    return present


def drop_duplicates(frame: pd.DataFrame, subset: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first listing (file order) of each group equal on `subset`; reject the others.

    Columns hold cleaned values (name without the Gumtree tail, whitespace collapsed,
    price as a float), so "£1,000.00" and "1000" or a stray \r do not hide a duplicate.
    The reject's value names the product that was kept, so a reviewer can compare them.
    Expects rows already in source order (see in_source_order).
    """
    columns = [column for column in subset if column in frame.columns]
    if not columns or frame.empty:
        return frame, empty_rejects()
    keys = frame[columns].astype(str)
    duplicated = keys.duplicated(keep="first")
    groups = [keys[column] for column in columns]
    kept_id = frame["product_id"].groupby(groups, sort=False, dropna=False).transform("first")
    rejects = make_rejects(frame[duplicated], PRODUCTS_FILE, "product_id", ",".join(columns), DUPLICATE, kept_id)
    return frame[~duplicated], rejects


def reject_rare_classes(frame: pd.DataFrame, min_products: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop roots with fewer than `min_products` products: too few to train or evaluate a class.

    Counted after de-duplication and the other rejects, so only usable products count.
    """
    counts = frame["category"].map(frame["category"].value_counts())
    rare = counts < int(min_products)
    rejects = make_rejects(frame[rare], PRODUCTS_FILE, "product_id", "category", RARE_CATEGORY, frame["category"])
    return frame[~rare], rejects


def flag_price_outliers(prices: pd.Series, min_price: float | None, max_price: float | None) -> pd.Series:
    """True where price > max_price or price <= min_price ('free' listings at £0.00). Kept, not dropped."""
    flags = pd.Series(False, index=prices.index)
    if max_price is not None:
        flags |= prices > float(max_price)
    if min_price is not None:
        flags |= prices <= float(min_price)
    return flags


def build_labels(categories: Sequence[str] | pd.Series) -> dict[str, Any]:
    """labels.json: classes sorted by name, so codes do not depend on row order."""
    classes = sorted(set(categories))
    return {"classes": classes, "label_to_index": {name: index for index, name in enumerate(classes)}}


def clean_products(raw: pd.DataFrame, cleaning_params: Mapping[str, Any]) -> ProductCleaning:
    """All product rules in order: normalise, reject unusable, de-duplicate, reject rare roots, label.

    Rows come back sorted by product_id; `n_images` and `split` are added later,
    once the photos are known.
    """
    require_columns(raw, REQUIRED_PRODUCT_COLUMNS, "products.parquet")
    frame = normalise_products(in_source_order(raw), bool(cleaning_params["text"]["strip_gumtree_suffix"]))
    require_unique(frame, "product_id", "products.parquet")
    frame, unusable = reject_unusable(frame)
    subset = dedupe_columns(frame, cleaning_params["dedupe_subset"])
    frame, duplicates = drop_duplicates(frame, subset)
    frame, rare = reject_rare_classes(frame, int(cleaning_params["min_products_per_class"]))
    if frame.empty:
        raise DataValidationError(
            "no product left after cleaning: check rejects.csv and cleaning.min_products_per_class"
        )
    labels = build_labels(frame["category"])
    outlier = cleaning_params["price_outlier"]
    frame = frame.assign(
        label=frame["category"].map(labels["label_to_index"]).astype("int64"),
        price_is_outlier=flag_price_outliers(frame["price"], outlier["min_price"], outlier["max_price"]),
    )
    products = frame.sort_values("product_id", kind="stable").reset_index(drop=True)
    stats = {
        "duplicates_removed": len(duplicates),
        "outliers_flagged": int(products["price_is_outlier"].sum()),
        "locations_without_county": int(products["county"].eq("").sum()),
        "dedupe_columns": subset,
    }
    if stats["locations_without_county"]:
        LOGGER.warning("%d kept products have a location with no county", stats["locations_without_county"])
    return ProductCleaning(products, concat_rejects([unusable, duplicates, rare]), labels, stats)


def link_images(
    raw_images: pd.DataFrame, products: pd.DataFrame, product_rejects: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep images of kept products; reject the others with why their product went.

    Images of a dropped duplicate go with it (reason duplicate_product) rather than
    being moved to the kept copy: the kept copy has its own photos.
    """
    require_columns(raw_images, REQUIRED_IMAGE_COLUMNS, "images.parquet")
    images = in_source_order(raw_images).assign(
        image_id=lambda f: f["id"].map(normalise_whitespace),
        product_id=lambda f: f["product_id"].map(normalise_whitespace),
    )
    require_unique(images, "image_id", "images.parquet")
    product_reason = product_rejects.drop_duplicates("record_id").set_index("record_id")["reason"]
    kept = images["product_id"].isin(products["product_id"])
    reason = images["product_id"].map(product_reason)
    unsafe = kept & ~images["image_id"].map(lambda value: bool(_SAFE_ID_RE.match(value)))

    def reject(mask: pd.Series, column: str, why: str, values: pd.Series) -> pd.DataFrame:
        return make_rejects(images[mask], IMAGES_FILE, "image_id", column, why, values)

    rejects = concat_rejects([
        reject(~kept & reason.eq(DUPLICATE), "product_id", DUPLICATE, images["product_id"]),
        reject(~kept & reason.notna() & reason.ne(DUPLICATE), "product_id", PRODUCT_REJECTED, reason),
        reject(~kept & reason.isna(), "product_id", UNKNOWN_PRODUCT, images["product_id"]),
        reject(unsafe, "id", INVALID_IMAGE_ID, images["image_id"]),  # ids become file names: no paths
    ])
    linked = images[kept & ~unsafe].sort_values("image_id", kind="stable").reset_index(drop=True)
    return linked, rejects


def image_tasks(images: pd.DataFrame, raw_images_dir: Path, out_images_dir: Path) -> list[ImageTask]:
    """Raw layout: images/<image id>.jpg (whatever the real format inside)."""
    return [ImageTask(i, raw_images_dir / f"{i}.jpg", out_images_dir / f"{i}.jpg") for i in images["image_id"]]


def apply_image_results(
    images: pd.DataFrame, results: Sequence[ImageResult]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Keep converted photos (with their relative path); reject the rest; count sources by mode."""
    by_id = {result.image_id: result for result in results}
    errors = images["image_id"].map(lambda i: by_id[i].error)
    failed = errors.notna()
    missing = errors.eq(IMAGE_MISSING)
    rejects = concat_rejects([
        make_rejects(images[missing], IMAGES_FILE, "image_id", "file", REJECT_IMAGE_MISSING, errors),
        make_rejects(images[failed & ~missing], IMAGES_FILE, "image_id", "file", IMAGE_UNREADABLE, errors),
    ])
    kept = images[~failed].assign(path=lambda f: IMAGES_SUBDIR + "/" + f["image_id"] + ".jpg")
    modes = pd.Series([by_id[i].source_mode for i in kept["image_id"]], dtype=object).value_counts()
    return kept.reset_index(drop=True), rejects, {str(mode): int(n) for mode, n in sorted(modes.items())}


def count_images(products: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """`n_images` per product; products with no usable photo stay, with 0 (text models use them)."""
    counts = images["product_id"].value_counts()
    return products.assign(n_images=products["product_id"].map(counts).fillna(0).astype("int64"))


def build_listings(products: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """One row per (product, photo); products with no photo appear once with a null image_id."""
    photos = images[["product_id", "image_id", "path"]]
    listings = products.merge(photos, on="product_id", how="left", validate="one_to_many")
    return listings.sort_values(["product_id", "image_id"], na_position="last", kind="stable").reset_index(drop=True)


def concat_rejects(pieces: Sequence[pd.DataFrame]) -> pd.DataFrame:
    non_empty = [piece for piece in pieces if not piece.empty]
    if not non_empty:
        return empty_rejects()
    return pd.concat(non_empty, ignore_index=True)[REJECT_COLUMNS]


def sort_rejects(rejects: pd.DataFrame) -> pd.DataFrame:
    """Stable order (file, row, id) so reruns write the same rejects.csv."""
    order = rejects.assign(_row=pd.to_numeric(rejects["source_row"], errors="coerce"))
    order = order.sort_values(["source_file", "_row", "record_id"], kind="stable", na_position="last")
    return order.drop(columns="_row").reset_index(drop=True)


# --------------------------------------------------------------------------- manifest


def split_class_counts(frame: pd.DataFrame, classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """{split: {class: n}} with every split and class present (zeros included) for stable diffs."""
    table = pd.crosstab(frame["split"], frame["category"]) if not frame.empty else pd.DataFrame()
    table = table.reindex(index=list(SPLITS), columns=list(classes), fill_value=0)
    return {split: {name: int(table.at[split, name]) for name in classes} for split in SPLITS}


def build_manifest(
    products: pd.DataFrame,
    images: pd.DataFrame,
    rejects: pd.DataFrame,
    labels: Mapping[str, Any],
    stats: Mapping[str, Any],
    inputs: Mapping[str, int],
) -> dict[str, Any]:
    """Everything a reviewer needs to trust the clean layer without opening it.

    Headline counts are top-level scalars (the clean flow publishes those as DVC
    metrics); breakdowns (split x class, rejects by reason, photo modes) are nested.
    """
    classes = labels["classes"]
    images_with_class = images.merge(products[["product_id", "category"]], on="product_id", how="left")
    return {
        "n_products": len(products),
        "n_images": len(images),
        "n_listings": int(stats["n_listings"]),
        "n_classes": len(classes),
        "n_products_without_images": int(products["n_images"].eq(0).sum()),
        "n_rejects": len(rejects),
        "duplicates_removed": int(stats["duplicates_removed"]),
        "duplicate_images_removed": rejects_of(rejects, IMAGES_FILE, DUPLICATE),
        "outliers_flagged": int(stats["outliers_flagged"]),
        "locations_without_county": int(stats["locations_without_county"]),
        "image_size": int(stats["image_size"]),
        "inputs": {"products": int(inputs["products"]), "images": int(inputs["images"])},
        "classes": list(classes),
        "counts": {
            "products": split_class_counts(products, classes),
            "images": split_class_counts(images_with_class, classes),
        },
        "split_totals": {
            "products": {split: int(products["split"].eq(split).sum()) for split in SPLITS},
            "images": {split: int(images["split"].eq(split).sum()) for split in SPLITS},
        },
        "rejects": {"by_reason": count_by(rejects, "reason"), "by_file": {
            name: count_by(group, "reason") for name, group in rejects.groupby("source_file", sort=True)
        }},
        "dedupe_columns": list(stats["dedupe_columns"]),
        "images_converted_by_mode": dict(stats["images_by_mode"]),
    }


def count_by(frame: pd.DataFrame, column: str) -> dict[str, int]:
    return {str(key): int(n) for key, n in sorted(frame[column].value_counts().items())}


def rejects_of(rejects: pd.DataFrame, source_file: str, reason: str) -> int:
    return int((rejects["source_file"].eq(source_file) & rejects["reason"].eq(reason)).sum())


# --------------------------------------------------------------------------- the stage


def clean_dataset(
    validated_dir: Path, raw_images_dir: Path, out_dir: Path, cleaning_params: dict, progress: bool = True
) -> dict:
    """Run the clean stage: read the validated layer, write the clean layer, return the manifest.

    Args:
        validated_dir: the validate stage's layer (products.parquet, images.parquet).
        raw_images_dir: the raw export's photos (read, never modified).
        out_dir: the clean layer to (re)build.
        cleaning_params: params.yaml's `cleaning` section.
        progress: show a progress bar while photos are converted (off in tests).

    Returns:
        The manifest (counts, rejects by reason, labels), also written as manifest.json.

    Settings are checked before any work. The whole layer (photos, tables, manifest.json
    last) is written into a temporary sibling folder that replaces out_dir as a whole: no
    stale photo survives a rerun, and a failure or a crash at any point leaves the previous
    clean layer untouched (pipeline_steps/io_utils.atomic_dir).
    """
    validated_dir, raw_images_dir, out_dir = Path(validated_dir), Path(raw_images_dir), Path(out_dir)
    image_size, pad_colour = image_settings(cleaning_params)
    workers = worker_setting(cleaning_params)
    split_settings(cleaning_params["split"])
    raw_products = read_validated(validated_dir / "products.parquet")
    raw_images = read_validated(validated_dir / "images.parquet")

    cleaned = clean_products(raw_products, cleaning_params)
    linked, link_rejects = link_images(raw_images, cleaned.products, cleaned.rejects)
    # The whole clean layer is built in a temporary sibling and swapped in at once: a crash at
    # any point (photos half converted, tables half written) leaves the previous layer whole,
    # never a mix of two runs, and the stage's stamp goes with the old folder.
    with io_utils.atomic_dir(out_dir) as tmp_out:
        tmp_out.chmod(0o755)  # mkdtemp makes it private; the photos are read by other tools and users
        tmp_images = tmp_out / IMAGES_SUBDIR
        tmp_images.mkdir()
        results = convert_images(
            image_tasks(linked, raw_images_dir, tmp_images), image_size, pad_colour,
            workers=workers, progress=progress,
        )
        images, image_rejects, by_mode = apply_image_results(linked, results)
        products, images = assign_splits(count_images(cleaned.products, images), images, cleaning_params["split"])
        products, images = products[PRODUCT_COLUMNS], images[IMAGE_COLUMNS]
        listings = build_listings(products, images)
        rejects = sort_rejects(concat_rejects([cleaned.rejects, link_rejects, image_rejects]))
        stats = {**cleaned.stats, "images_by_mode": by_mode, "n_listings": len(listings), "image_size": image_size}
        inputs = {"products": len(raw_products), "images": len(raw_images)}
        manifest = build_manifest(products, images, rejects, cleaned.labels, stats, inputs)

        io_utils.write_parquet(products, tmp_out / clean_schema.PRODUCTS_FILE)
        io_utils.write_parquet(images, tmp_out / clean_schema.IMAGES_FILE)
        io_utils.write_parquet(listings, tmp_out / clean_schema.LISTINGS_FILE)
        io_utils.write_json(tmp_out / clean_schema.LABELS_FILE, cleaned.labels)
        io_utils.write_csv(rejects, tmp_out / "rejects.csv")
        io_utils.write_json(tmp_out / "manifest.json", manifest)
    return manifest


def image_settings(cleaning_params: Mapping[str, Any]) -> tuple[int, tuple[int, int, int]]:
    """Check image_size and pad_colour before any work, naming the params.yaml key at fault."""
    size = cleaning_params["image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"params.yaml key 'cleaning.image_size' must be a positive integer, got {size!r}")
    pad = cleaning_params["pad_colour"]
    if not isinstance(pad, (list, tuple)) or len(pad) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in pad):
        raise ConfigError(f"params.yaml key 'cleaning.pad_colour' must be three integers 0..255, got {pad!r}")
    return size, (pad[0], pad[1], pad[2])


def worker_setting(cleaning_params: Mapping[str, Any]) -> int | str:
    """`cleaning.num_workers`: threads converting photos (1 = in this thread, 'auto' = one per CPU)."""
    workers = cleaning_params["num_workers"]
    if workers == "auto" or (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        return workers
    raise ConfigError(f"params.yaml key 'cleaning.num_workers' must be a positive integer or 'auto', got {workers!r}")


def read_validated(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataValidationError(f"{path} not found: run the validate stage first")
    return pd.read_parquet(path)
