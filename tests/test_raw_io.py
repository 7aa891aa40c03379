"""raw_io: every structural problem of a raw export fails with a message a user can act on.

Fixtures are tiny CSVs written into tmp_path, so these tests need no sample data and
run in well under a second each.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline_steps.errors import DataValidationError
from pipeline_steps.raw_io import (
    detect_encoding,
    list_image_files,
    read_images_csv,
    read_products_csv,
    require_images_dir,
)

HEADER = ",id,product_name,category,product_description,price,location"
ROW_A = '0,p1,Sofa,Home & Garden / Sofas,Comfy sofa,£120.00,"Leeds, West Yorkshire"'
ROW_B = '1,p2,Drill,DIY Tools & Materials / Power Tools,Works fine,"£1,250.00","Bath, Somerset"'
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "marketplace"


def write_csv(path: Path, lines: list[str], newline: str = "\n", encoding: str = "utf-8") -> Path:
    path.write_bytes((newline.join(lines) + newline).encode(encoding))
    return path


def products_file(tmp_path: Path, *rows: str, header: str = HEADER) -> Path:
    return write_csv(tmp_path / "Products.csv", [header, *rows])


# --------------------------------------------------------------------------- happy path


def test_reads_strings_with_source_row_and_without_index_column(tmp_path: Path) -> None:
    frame = read_products_csv(products_file(tmp_path, ROW_A, ROW_B))
    assert list(frame.columns) == [
        "source_row", "id", "product_name", "category", "product_description", "price", "location",
    ]
    assert frame["source_row"].tolist() == [0, 1]
    assert frame["price"].tolist() == ["£120.00", "£1,250.00"]
    assert frame["location"].tolist() == ["Leeds, West Yorkshire", "Bath, Somerset"]


def test_empty_values_and_na_words_stay_strings(tmp_path: Path) -> None:
    path = products_file(tmp_path, "0,p1,NA,Home & Garden,,None,null")
    row = read_products_csv(path).iloc[0]
    assert row["product_name"] == "NA"
    assert row["product_description"] == ""
    assert row["price"] == "None"
    assert row["location"] == "null"


def test_file_without_index_column_still_reads(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "Images.csv", ["id,product_id", "i1,p1", "i2,p1"])
    frame = read_images_csv(path)
    assert frame["id"].tolist() == ["i1", "i2"]
    assert frame["source_row"].tolist() == [0, 1]


# --------------------------------------------------------------------------- encodings and line ends


def test_latin1_csv_is_detected_and_decoded(tmp_path: Path) -> None:
    row = '0,p1,Café table,Home & Garden / Tables,Très bien,£45.00,"Hove, East Sussex"'
    path = write_csv(tmp_path / "Products.csv", [HEADER, row], encoding="latin-1")
    warnings: list[str] = []
    frame = read_products_csv(path, warnings)
    assert frame.loc[0, "product_name"] == "Café table"
    assert frame.loc[0, "price"] == "£45.00"
    assert frame.attrs["encoding"] in ("cp1252", "latin-1")
    assert any("not valid UTF-8" in message and "Products.csv" in message for message in warnings)


def test_latin1_fallback_when_bytes_are_not_cp1252() -> None:
    assert detect_encoding("£".encode("latin-1") + b"\x81") == "latin-1"
    assert detect_encoding("£".encode("utf-8")) == "utf-8"


def test_utf8_bom_does_not_corrupt_the_first_column(tmp_path: Path) -> None:
    header = "id,product_name,category,product_description,price,location"
    row = 'p1,Sofa,Home & Garden / Sofas,Comfy,£120.00,"Leeds, West Yorkshire"'
    path = tmp_path / "Products.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"{header}\n{row}\n".encode())
    frame = read_products_csv(path)
    assert frame.attrs["encoding"] == "utf-8-sig"
    assert frame.loc[0, "id"] == "p1"


def test_stray_carriage_returns_inside_and_outside_quotes(tmp_path: Path) -> None:
    lines = [
        HEADER,
        '0,p1,Sofa,Home & Garden / Sofas,"quoted\rdescription\r\nwith CRLF inside"\r,£120.00,"Leeds, West Yorkshire"',
        "1,p2,Lamp,Home & Garden / Lighting,unquoted\rstray return,£5.00,\"Bath, Somerset\"",
        '2,p3,Desk,Office Furniture & Equipment / Desks,plain,£60.00,"York, North Yorkshire"',
    ]
    frame = read_products_csv(write_csv(tmp_path / "Products.csv", lines, newline="\r\n"))
    assert len(frame) == 3, "a stray \\r must never split a row"
    assert frame["id"].tolist() == ["p1", "p2", "p3"]
    assert frame.loc[0, "product_description"] == "quoted\rdescription\r\nwith CRLF inside"
    assert frame.loc[1, "product_description"] == "unquoted\rstray return"
    # The CRLF line end leaves no \r on the last column (nor on its header).
    assert frame["location"].tolist() == ["Leeds, West Yorkshire", "Bath, Somerset", "York, North Yorkshire"]
    assert not any(value.endswith("\r") for column in frame.columns[1:] for value in frame[column])


# --------------------------------------------------------------------------- structural errors


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"Products\.csv not found: .*Products\.csv does not exist"):
        read_products_csv(tmp_path / "Products.csv")


def test_zero_byte_csv_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "Products.csv"
    path.write_bytes(b"")
    with pytest.raises(DataValidationError, match=r"Products\.csv at .* is empty \(0 bytes\)"):
        read_products_csv(path)


def test_blank_lines_only_csv_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "Images.csv"
    path.write_bytes(b"\r\n\n  \n")
    with pytest.raises(DataValidationError, match=r"Images\.csv at .* is empty"):
        read_images_csv(path)


def test_header_only_csv_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"Products\.csv at .* has a header .* but no data rows"):
        read_products_csv(products_file(tmp_path))


@pytest.mark.parametrize("column", ["price", "category"])
def test_missing_required_column_is_named(tmp_path: Path, column: str) -> None:
    names = HEADER.split(",")
    drop = names.index(column)
    header = ",".join(name for i, name in enumerate(names) if i != drop)
    values = ["0", "p1", "Sofa", "Home", "Comfy", "£1.00", "Leeds"]
    row = ",".join(value for i, value in enumerate(values) if i != drop)
    with pytest.raises(DataValidationError) as info:
        read_products_csv(products_file(tmp_path, row, header=header))
    message = str(info.value)
    assert f"Products.csv at {tmp_path / 'Products.csv'} is missing required column '{column}'" in message
    assert "found columns" in message and "'product_name'" in message


def test_missing_column_hint_for_wrong_case(tmp_path: Path) -> None:
    header = HEADER.replace("price", "Price")
    with pytest.raises(DataValidationError, match=r"'Price' looks like 'price'"):
        read_products_csv(products_file(tmp_path, ROW_A, header=header))


def test_images_csv_missing_product_id(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "Images.csv", [",id,bucket_link", "0,i1,s3://x"])
    with pytest.raises(DataValidationError, match=r"Images\.csv at .* is missing required column 'product_id'"):
        read_images_csv(path)


def test_duplicate_ids_name_examples_and_rows(tmp_path: Path) -> None:
    row_c = ROW_A.replace("0,p1,", "2,p1,", 1)
    with pytest.raises(DataValidationError) as info:
        read_products_csv(products_file(tmp_path, ROW_A, ROW_B, row_c))
    message = str(info.value)
    assert "Products.csv" in message and "duplicate value(s) in column 'id'" in message
    assert "'p1' at rows 0, 2" in message


def test_malformed_csv_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"Products\.csv at .* is not a well-formed CSV"):
        read_products_csv(products_file(tmp_path, ROW_A, ROW_B + ",extra,fields,here"))


# --------------------------------------------------------------------------- warnings


def test_extra_unknown_columns_are_kept_and_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    header = HEADER + ",seller_rating,url"
    warnings: list[str] = []
    with caplog.at_level(logging.WARNING, logger="pipeline_steps.raw_io"):
        frame = read_products_csv(products_file(tmp_path, ROW_A + ",4.5,http://x", header=header), warnings)
    assert frame.loc[0, "seller_rating"] == "4.5"
    assert frame.loc[0, "url"] == "http://x"
    assert len(warnings) == 1 and "'seller_rating'" in warnings[0] and "url" not in warnings[0]
    assert "unknown extra column" in caplog.text
    assert frame.attrs["warnings"] == warnings


# --------------------------------------------------------------------------- images folder


def test_missing_images_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"images folder .*images does not exist.*images/<image id>\.jpg"):
        require_images_dir(tmp_path)


def test_images_path_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "images").write_text("not a folder")
    with pytest.raises(DataValidationError, match=r"images folder .* is not a folder"):
        require_images_dir(tmp_path)


def test_list_image_files_skips_hidden_files_and_folders(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.jpg", ".DS_Store"):
        (folder / name).write_bytes(b"x")
    assert list_image_files(require_images_dir(tmp_path)) == ["a.jpg", "b.jpg"]


@pytest.mark.realdata
def test_real_products_csv_reads_every_row() -> None:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    products = read_products_csv(REAL_DATA / "Products.csv")
    images = read_images_csv(REAL_DATA / "Images.csv")
    assert len(products) == 4300
    assert len(images) == 7597
    assert products["source_row"].tolist() == list(range(4300))


# --------------------------------------------------------------------------- encodings and delimiters (issue 12)

ROWS = [ROW_A, ROW_B]


def _export(tmp_path: Path, text: str, encoding: str) -> Path:
    path = tmp_path / "Products.csv"
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-16-le", "utf-16-be", "utf-8-sig"])
def test_utf16_and_utf32_exports_are_read_and_say_how(tmp_path: Path, encoding: str) -> None:
    """A UTF-16 Products.csv used to stop with 'Expected 14 fields in line 45, saw 27'."""
    warnings: list[str] = []
    frame = read_products_csv(_export(tmp_path, "\n".join([HEADER, *ROWS]) + "\n", encoding), warnings)
    assert frame["id"].tolist() == ["p1", "p2"]
    assert frame["price"].tolist() == ["£120.00", "£1,250.00"]
    assert frame.attrs["encoding"] == encoding
    if encoding != "utf-8-sig":
        assert any("read it as UTF-" in message for message in warnings)


@pytest.mark.parametrize("delimiter, name", [(";", "semicolon"), ("\t", "tab"), ("|", "pipe")])
def test_other_delimiters_are_detected_and_reported(tmp_path: Path, delimiter: str, name: str) -> None:
    """A semicolon-delimited Products.csv used to stop with 'Expected 8 fields in line 35'."""
    import csv as csv_module
    import io

    buffer = io.StringIO()
    writer = csv_module.writer(buffer, delimiter=delimiter, lineterminator="\n")
    for line in [HEADER, *ROWS]:
        writer.writerow(next(csv_module.reader([line])))
    warnings: list[str] = []
    frame = read_products_csv(_export(tmp_path, buffer.getvalue(), "utf-8"), warnings)
    assert frame["location"].tolist() == ["Leeds, West Yorkshire", "Bath, Somerset"]
    assert frame.attrs["delimiter"] == delimiter
    assert any(f"is {name}-delimited" in message for message in warnings)


def test_broken_semicolon_file_names_the_delimiter_and_the_fix(tmp_path: Path) -> None:
    lines = [HEADER.replace(",", ";"), "0;p1;Sofa;Home;Comfy;£1.00;Leeds", "1;p2;Desk;Home;a;b;c;£2.00;York"]
    with pytest.raises(DataValidationError) as info:
        read_products_csv(_export(tmp_path, "\n".join(lines) + "\n", "utf-8"))
    message = str(info.value)
    assert "read as UTF-8, semicolon-delimited" in message
    assert "re-export with every text field quoted" in message
    assert "\n" not in message


def test_undecodable_bomless_utf16_says_so(tmp_path: Path) -> None:
    data = "\n".join([HEADER, *ROWS]).encode("utf-16-le") + b"\x00\xd8"  # a lone high surrogate at the end
    path = tmp_path / "Products.csv"
    path.write_bytes(data)
    with pytest.raises(DataValidationError, match=r"looks like UTF-16-LE \(no BOM\) .* re-save it as UTF-8"):
        read_products_csv(path)


def test_header_that_does_not_split_names_the_delimiter(tmp_path: Path) -> None:
    header = HEADER.replace(",", ":")
    with pytest.raises(DataValidationError, match=r"check the delimiter.*read as UTF-8, comma-delimited"):
        read_products_csv(_export(tmp_path, header + "\n0:p1:a:b:c:d:e\n", "utf-8"))


def test_mostly_utf8_with_a_broken_byte_stays_utf8(tmp_path: Path) -> None:
    """One bad byte must not turn every '£' of the file into 'Â£' (a whole-file cp1252 read)."""
    text = "\n".join([HEADER, *ROWS]) + "\n"
    data = text.encode("utf-8").replace(b"Comfy sofa", b"Comfy \xff sofa")
    path = tmp_path / "Products.csv"
    path.write_bytes(data)
    warnings: list[str] = []
    frame = read_products_csv(path, warnings)
    assert frame["price"].tolist() == ["£120.00", "£1,250.00"]
    assert frame.loc[0, "product_description"] == "Comfy \ufffd sofa"
    assert any("1 undecodable byte" in message for message in warnings)


def test_nul_bytes_inside_a_utf8_field_are_not_mistaken_for_utf16(tmp_path: Path) -> None:
    row = ROW_A.replace("Comfy sofa", "Comfy" + "\x00" * 40 + "sofa")
    frame = read_products_csv(_export(tmp_path, "\n".join([HEADER, row, ROW_B]) + "\n", "utf-8"))
    assert frame.attrs["encoding"] == "utf-8"
    assert frame.loc[0, "product_description"] == "Comfy" + "\x00" * 40 + "sofa"


def test_a_header_full_of_nul_bytes_says_utf16_without_bom(tmp_path: Path) -> None:
    """Too short a sample for the UTF-16 heuristic, or mixed with NUL-free bytes: the message still says why."""
    path = tmp_path / "Products.csv"
    path.write_bytes(HEADER.encode("utf-16-le")[:60] + b"\n0,p1,x\n" * 40)
    with pytest.raises(DataValidationError, match=r"looks like UTF-16 or UTF-32 without a byte-order mark"):
        read_products_csv(path)
