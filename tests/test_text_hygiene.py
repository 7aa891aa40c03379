"""Text hygiene (validation.text): nothing odd slips into the validated and clean data unnoticed.

Before these rules a product whose description held a run of NUL bytes, or was 200,000
characters long, came out of data/clean unchanged with no reject, warning or metric.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline_steps.cleaning import clean_products
from pipeline_steps.errors import ConfigError
from pipeline_steps.text_hygiene import CONTROL_REGEX, INVALID_REGEX, shown_value, text_rules
from pipeline_steps.validation import validate_raw
from tests.test_validation import PARAMS, TEXT, image_bytes, product, write_export

CLEANING = {"min_products_per_class": 1, "dedupe_subset": ["product_name", "location", "product_description", "price"],
            "text": {"strip_gumtree_suffix": True}, "price_outlier": {"max_price": 100000.0, "min_price": 0.0}}


def hostile_export(root: Path) -> Path:
    products = [product(f"p{i}") for i in range(20)]
    products[1]["product_description"] = "Nice\x00\x00\x00\x00\x00\x00\x00\x00 chair"
    products[2]["product_description"] = "long " * 40_000  # 200,000 characters
    products[3]["product_name"] = "Sofa\u200b\u202e evil"
    products[4]["product_name"] = "Bell\x07 rings"
    images = [{"id": f"i{i}", "product_id": f"p{i}"} for i in range(20)]
    images.append({"id": "i\x00x", "product_id": "p5"})
    files = {f"i{i}.jpg": image_bytes() for i in range(20)}
    raw = write_export(root, products, images, files)
    data = (raw / "Products.csv").read_bytes().replace(b"A fine p6", b"A fine \xff\xfe p6")
    (raw / "Products.csv").write_bytes(data)
    return raw


def run(tmp_path: Path, text: dict[str, Any] | None = None) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    raw = hostile_export(tmp_path / "raw")
    params = {**PARAMS, "max_reject_fraction": 0.5, **({"text": {**TEXT, **text}} if text is not None else {})}
    metrics = validate_raw(raw, tmp_path / "out", params, tmp_path / "docs")
    validated = pd.read_parquet(tmp_path / "out" / "products.parquet")
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv", keep_default_na=False)
    return metrics, validated, rejects


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, Path]:
    tmp = tmp_path_factory.mktemp("hygiene")
    return (*run(tmp), tmp)


def test_control_characters_are_stripped_and_counted(default_run) -> None:
    metrics, validated, _, _ = default_run
    row = validated.set_index("id").loc["p1"]
    assert row["product_description"] == "Nice chair"
    assert validated.set_index("id").loc["p4", "product_name"] == "Bell rings"
    assert metrics["text_fixes"]["products.product_description_control_chars"] == 1
    assert metrics["text_fixes"]["products.product_name_control_chars"] == 1
    assert metrics["warning_counts"]["products.product_description_control_chars"] == 1
    for column in ("product_name", "product_description", "category", "location"):
        assert not validated[column].str.contains(CONTROL_REGEX, regex=True).any(), column


def test_a_200000_character_description_is_truncated_with_a_count(default_run) -> None:
    metrics, validated, _, _ = default_run
    assert validated["product_description"].str.len().max() == 20_000
    assert metrics["text_fixes"]["products.product_description_too_long"] == 1
    assert any("longer than 20,000 characters: truncated" in warning for warning in metrics["warnings"])


def test_zero_width_and_bidi_characters_leave_names(default_run) -> None:
    metrics, validated, _, _ = default_run
    assert validated.set_index("id").loc["p3", "product_name"] == "Sofa evil"
    assert metrics["text_fixes"]["products.product_name_invisible_in_names"] == 1


def test_invalid_utf8_rejects_the_row_with_a_reason(default_run) -> None:
    metrics, validated, rejects, _ = default_run
    assert "p6" not in set(validated["id"])
    row = rejects[rejects["record_id"] == "p6"].iloc[0]
    assert "invalid Unicode" in row["reason"] and "validation.text.invalid_unicode" in row["reason"]
    assert metrics["text_rejects"]["products.product_description_invalid_unicode"] == 1
    assert any("undecodable byte" in warning for warning in metrics["warnings"])
    assert not validated["product_description"].str.contains(INVALID_REGEX, regex=True).any()


def test_an_image_id_with_a_nul_byte_is_rejected_not_a_crash(default_run) -> None:
    _, _, rejects, _ = default_run
    row = rejects[rejects["column"].eq("id") & rejects["source_file"].eq("Images.csv")].iloc[0]
    assert row["record_id"] == "i\\x00x"  # escaped in rejects.csv, readable by a human
    assert "control characters" in row["reason"]


def test_every_input_row_is_accounted_for(default_run) -> None:
    metrics, validated, rejects, _ = default_run
    assert metrics["products_rows_in"] == len(validated) + int(rejects["source_file"].eq("Products.csv").sum())


def test_hygiene_is_a_gx_suite_in_data_docs(default_run) -> None:
    metrics, _, _, tmp = default_run
    assert metrics["suites_passed"]["products_text"] is False
    pages = "".join(p.read_text(encoding="utf-8", errors="replace") for p in (tmp / "docs").rglob("*.html"))
    assert "products_text" in pages
    suite_page = (tmp / "docs" / "expectations" / "products_text.html").read_text(encoding="utf-8")
    assert "longer than 20,000 characters" in suite_page and "control characters" in suite_page


def test_clean_text_has_no_control_characters(default_run) -> None:
    _, validated, _, _ = default_run
    cleaned = clean_products(validated, CLEANING).products
    for column in ("product_name", "product_description", "text", "location", "category"):
        assert not cleaned[column].str.contains(CONTROL_REGEX, regex=True).any(), column


def test_reject_mode_quarantines_instead(tmp_path: Path) -> None:
    text = {"control_chars": "reject", "invisible_in_names": "reject", "truncate": []}
    metrics, validated, rejects = run(tmp_path, text)
    assert not {"p1", "p2", "p3", "p4"} & set(validated["id"])
    reasons = dict(zip(rejects["record_id"], rejects["reason"]))
    assert "row rejected (validation.text.control_chars)" in reasons["p1"]
    assert "longer than 20,000 characters: row rejected" in reasons["p2"]
    assert "validation.text.invisible_in_names" in reasons["p3"]
    long_value = rejects.set_index("record_id").loc["p2", "value"]
    assert len(long_value) < 300 and "200,000 characters" in long_value
    assert metrics["text_fixes_total"] == 0


def test_cleaning_strips_control_characters_left_in_an_older_validated_layer() -> None:
    raw = pd.DataFrame([{**product("p1"), "product_description": "a\x00b\x07c"}]).assign(source_row=0)
    cleaned = clean_products(raw, CLEANING).products
    assert cleaned.loc[0, "product_description"] == "abc"


@pytest.mark.parametrize(
    "text, key",
    [
        ({"control_chars": "drop"}, "validation.text.control_chars"),
        ({"max_chars": {"product_name": 0}}, "validation.text.max_chars.product_name"),
        ({"truncate": ["id"]}, "validation.text.truncate"),
    ],
)
def test_bad_text_params_name_the_key(text: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        text_rules({**TEXT, **text})


def test_shown_value_escapes_and_shortens() -> None:
    assert shown_value("a\x00b") == "a\\x00b"
    assert shown_value("\udcff") == "\ufffd"
    assert shown_value("x" * 1000).endswith("(1,000 characters)")


def test_a_zero_width_joiner_inside_an_emoji_is_kept() -> None:
    """A real listing's name is 'Cookbook 👩🏻\u200d🍳 BRAND NEW': the joiner is part of the cook emoji."""
    from pipeline_steps.text_hygiene import INVISIBLE_REGEX

    assert not re.search(INVISIBLE_REGEX, "Cookbook 👩🏻\u200d🍳 BRAND NEW")
    assert re.sub(INVISIBLE_REGEX, "", "Sofa\u200d bed\u200b \u202eevil\u2066") == "Sofa bed evil"
