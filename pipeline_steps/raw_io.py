"""Robust, read-only access to a raw marketplace export.

Users export Products.csv / Images.csv from tools we do not control, so this
module absorbs the quirks seen in real exports (a BOM, cp1252 bytes, stray
carriage returns outside quotes, an unnamed index column) and turns every
structural problem (missing or empty file, missing column, duplicate ids) into
a DataValidationError that names the file, the column and example values.
Row-level problems (a bad price, a missing photo) are *not* handled here: the
validation step quarantines those rows instead of failing the whole run.

Nothing in this module ever writes to the raw export.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline_steps.errors import DataValidationError

logger = logging.getLogger(__name__)

PRODUCTS_FILE = "Products.csv"
IMAGES_FILE = "Images.csv"
IMAGES_DIR = "images"
IMAGE_SUFFIX = ".jpg"
SOURCE_ROW = "source_row"

UTF8_BOM = b"\xef\xbb\xbf"
MAX_EXAMPLES = 5
# Longest first: the UTF-32-LE BOM starts with the UTF-16-LE one.
BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (UTF8_BOM, "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)
ENCODING_NAMES = {
    "utf-8": "UTF-8", "utf-8-sig": "UTF-8 (with BOM)", "utf-16": "UTF-16", "utf-32": "UTF-32",
    "utf-16-le": "UTF-16-LE (no BOM)", "utf-16-be": "UTF-16-BE (no BOM)", "cp1252": "cp1252 (Windows-1252)",
    "latin-1": "Latin-1",
}
DELIMITERS = (",", ";", "\t", "|")
DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


@dataclass(frozen=True)
class CsvSpec:
    """What a raw CSV must and may contain, so reading and warnings share one definition."""

    file_name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]

    @property
    def known(self) -> tuple[str, ...]:
        return self.required + self.optional


PRODUCTS_SPEC = CsvSpec(
    file_name=PRODUCTS_FILE,
    required=("id", "product_name", "category", "product_description", "price", "location"),
    optional=("url", "page_id", "create_time"),
)
IMAGES_SPEC = CsvSpec(
    file_name=IMAGES_FILE,
    required=("id", "product_id"),
    optional=("bucket_link", "image_ref", "create_time"),
)


# --------------------------------------------------------------------------- public API


def read_products_csv(path: str | Path, warnings: list[str] | None = None) -> pd.DataFrame:
    """Read Products.csv as strings with a `source_row` column.

    `warnings` (if given) collects non-fatal findings such as unknown extra
    columns; they are also logged and stored in `frame.attrs["warnings"]`.
    """
    return read_raw_csv(path, PRODUCTS_SPEC, warnings)


def read_images_csv(path: str | Path, warnings: list[str] | None = None) -> pd.DataFrame:
    """Read Images.csv as strings with a `source_row` column (see read_products_csv)."""
    return read_raw_csv(path, IMAGES_SPEC, warnings)


def read_raw_csv(path: str | Path, spec: CsvSpec, warnings: list[str] | None = None) -> pd.DataFrame:
    """Read one raw CSV per `spec`, raising DataValidationError on structural problems.

    Every value stays a string ("" stays "", "NA" stays "NA") because the
    validated layer promises the raw values untouched; `source_row` is the
    0-based data row number so a reject can be traced back to the file.
    """
    path = Path(path)
    collected: list[str] = []
    raw = _read_bytes(path, spec)
    encoding = detect_encoding(raw)
    if encoding not in ("utf-8", "utf-8-sig"):
        collected.append(f"{spec.file_name} at {path} is not valid UTF-8; read it as {ENCODING_NAMES.get(encoding, encoding)}")
    text = _decode(raw, encoding, path, spec)
    n_bad = sum(1 for char in text if "\udc80" <= char <= "\udcff") if encoding.startswith("utf-8") else 0
    if n_bad:
        # The parser (and every UTF-8 output) cannot hold lone surrogates: each undecodable byte
        # becomes U+FFFD, which the validation.text.invalid_unicode rule strips or rejects per row.
        text = re.sub("[\udc80-\udcff]", "\ufffd", text)
        collected.append(
            f"{spec.file_name} at {path} is UTF-8 with {n_bad} undecodable byte(s); the rows holding them "
            "follow validation.text.invalid_unicode"
        )
    delimiter = detect_delimiter(text, spec)
    if delimiter != ",":
        collected.append(
            f"{spec.file_name} at {path} is {DELIMITER_NAMES.get(delimiter, repr(delimiter))}-delimited; read it that way"
        )
    frame = _parse_csv(text, path, spec, delimiter=delimiter, encoding=encoding)
    frame = _strip_carriage_returns(frame)
    frame = _drop_index_column(frame)
    _check_required_columns(frame, path, spec)
    collected.extend(_extra_column_warnings(frame, path, spec))
    _check_unique_ids(frame, path, spec.file_name)
    frame.insert(0, SOURCE_ROW, range(len(frame)))
    frame[SOURCE_ROW] = frame[SOURCE_ROW].astype("int64")
    for message in collected:
        logger.warning(message)
    if warnings is not None:
        warnings.extend(collected)
    frame.attrs["warnings"] = list(collected)
    frame.attrs["encoding"] = encoding
    frame.attrs["delimiter"] = delimiter
    frame.attrs["source_file"] = spec.file_name
    return frame


def detect_encoding(raw: bytes) -> str:
    """Pick the codec of a CSV: a byte-order mark first (UTF-32, UTF-8, UTF-16), then UTF-8, cp1252, Latin-1.

    Spreadsheet exports on Windows are the usual source of cp1252 (and of UTF-16 with a BOM,
    "Unicode text"); Latin-1 is the last resort because it decodes any byte sequence. UTF-16
    without a BOM is recognised by its NUL bytes and read only when every byte decodes.
    """
    for bom, encoding in BOMS:
        if raw.startswith(bom):
            return encoding
    bomless = _bomless_utf16(raw)
    if bomless is not None:
        return bomless
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    if _mostly_utf8(raw):
        return "utf-8"  # a few undecodable bytes: kept as invalid Unicode, which validation.text rules handle per row
    try:
        raw.decode("cp1252")
        return "cp1252"
    except UnicodeDecodeError:
        return "latin-1"


def _mostly_utf8(raw: bytes) -> bool:
    """UTF-8 with a few broken bytes (a truncated emoji, one bad paste), not a cp1252 file.

    A cp1252 export has (almost) no valid multi-byte UTF-8 sequence; a UTF-8 one has far more
    of them than broken bytes. Reading the first as cp1252 turns every '£' into 'Â£' file-wide.
    """
    text = raw.decode("utf-8", "surrogateescape")
    bad = sum(1 for char in text if "\udc80" <= char <= "\udcff")
    good = sum(1 for char in text if char > "\x7f" and not "\udc80" <= char <= "\udcff")
    return good > bad


def detect_delimiter(text: str, spec: CsvSpec) -> str:
    """The field delimiter: the candidate whose header row names the most required columns.

    Comma wins ties (it is the contract's delimiter). When no candidate finds even one
    required column, csv.Sniffer's guess on the first lines is used; the missing-column
    error then says which delimiter the file was read with.
    """
    lines = text.lstrip("\ufeff").splitlines()
    header = next((line for line in lines if line.strip()), "")
    best, best_hits = ",", -1
    for candidate in DELIMITERS:
        try:
            names = next(csv.reader([header], delimiter=candidate))
        except (csv.Error, StopIteration):
            continue
        hits = len({name.strip() for name in names} & set(spec.required))
        if hits > best_hits:
            best, best_hits = candidate, hits
    if best_hits > 0:
        return best
    try:
        return csv.Sniffer().sniff("\n".join(lines[:20])[:65536], delimiters="".join(DELIMITERS)).delimiter
    except csv.Error:
        return ","


def describe_format(encoding: str, delimiter: str) -> str:
    """'UTF-8, comma-delimited': how a CSV was read, for messages and metrics."""
    return f"{ENCODING_NAMES.get(encoding, encoding)}, {DELIMITER_NAMES.get(delimiter, repr(delimiter))}-delimited"


def _bomless_utf16(raw: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when the bytes look like UTF-16 without a BOM, else None.

    ASCII text in UTF-16 has a NUL in every other byte; a run of NUL bytes inside a UTF-8
    field does not make that pattern over the whole sample.
    """
    sample = raw[:8192]
    if len(sample) < 4:
        return None
    sample = sample[: len(sample) - len(sample) % 2]
    even, odd = sample[0::2], sample[1::2]
    n = len(even)
    for zeros, data, encoding in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
        if zeros.count(0) > 0.6 * n and data.count(0) < 0.1 * n:
            return encoding
    return None


def _decode(raw: bytes, encoding: str, path: Path, spec: CsvSpec) -> str:
    """Decode with the detected codec; a BOM-less UTF-16 file that does not decode is a clear error."""
    errors = "surrogateescape" if encoding in ("utf-8", "utf-8-sig") else "strict"
    try:
        return raw.decode(encoding, errors)
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            f"{spec.file_name} at {path} looks like {ENCODING_NAMES.get(encoding, encoding)} but does not decode "
            f"as it ({exc.reason} at byte {exc.start}); re-save it as UTF-8 (\"CSV UTF-8\" in a spreadsheet)"
        ) from exc


def require_images_dir(raw_dir: str | Path) -> Path:
    """Return raw_dir/images, or explain what is missing (photos are required, not optional)."""
    images_dir = Path(raw_dir) / IMAGES_DIR
    if not images_dir.is_dir():
        what = "is not a folder" if images_dir.exists() else "does not exist"
        raise DataValidationError(
            f"images folder {images_dir} {what}: the raw export must hold the photos as "
            f"{IMAGES_DIR}/<image id>{IMAGE_SUFFIX} beside {IMAGES_FILE}"
        )
    return images_dir


def list_image_files(images_dir: str | Path) -> list[str]:
    """Names of the regular, non-hidden files in the images folder, sorted for stable output."""
    with os.scandir(images_dir) as entries:
        names = [entry.name for entry in entries if entry.is_file() and not entry.name.startswith(".")]
    return sorted(names)


def image_file_name(image_id: str) -> str:
    """The file an Images.csv row points at: images/<image id>.jpg (name only)."""
    return f"{image_id}{IMAGE_SUFFIX}"


def format_examples(values: Sequence[object], limit: int = MAX_EXAMPLES) -> str:
    """"'a', 'b', 'c' (and 7 more)": short, quoted examples for error messages."""
    shown = ", ".join(repr(value) for value in list(values)[:limit])
    extra = len(values) - limit
    return f"{shown} (and {extra} more)" if extra > 0 else shown


# --------------------------------------------------------------------------- helpers


def _read_bytes(path: Path, spec: CsvSpec) -> bytes:
    """Read the whole file (a few MB) once: encoding detection and parsing share the bytes."""
    if not path.exists():
        raise DataValidationError(f"{spec.file_name} not found: {path} does not exist")
    if not path.is_file():
        raise DataValidationError(f"{spec.file_name} at {path} is not a file")
    raw = path.read_bytes()
    if not raw.strip(UTF8_BOM + b" \t\r\n"):
        raise DataValidationError(
            f"{spec.file_name} at {path} is empty ({len(raw)} bytes): expected a header with columns "
            f"{', '.join(spec.required)} and at least one data row"
        )
    return raw


def _parse_csv(text: str, path: Path, spec: CsvSpec, delimiter: str = ",", encoding: str = "utf-8") -> pd.DataFrame:
    """Parse with lineterminator='\\n' so a stray '\\r' in a description never splits a row."""
    how = describe_format(encoding, delimiter)
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=delimiter,
            lineterminator="\n",
            dtype=str,
            keep_default_na=False,
            na_filter=False,
        )
    except pd.errors.EmptyDataError as exc:
        raise DataValidationError(f"{spec.file_name} at {path} has no header row ({exc})") from exc
    except pd.errors.ParserError as exc:
        raise DataValidationError(
            f"{spec.file_name} at {path} is not a well-formed CSV (read as {how}): {str(exc).strip()}. "
            f"{_parse_hint(text, delimiter)}"
        ) from exc
    if frame.empty:
        raise DataValidationError(
            f"{spec.file_name} at {path} has a header ({format_examples(list(frame.columns))}) but no data rows"
        )
    frame.attrs["read_as"] = how
    return frame


def _parse_hint(text: str, delimiter: str) -> str:
    """The likely cause of a tokenizing error, so the user looks at the right thing."""
    header = text.lstrip("\ufeff").split("\n", 1)[0]
    if "\x00" in header:
        return ("The header holds NUL bytes: the file looks like UTF-16 or UTF-32 without a byte-order mark; "
                "re-save it as UTF-8.")
    others = [d for d in DELIMITERS if d != delimiter and header.count(d) > header.count(delimiter)]
    if others:
        return (f"The header looks {DELIMITER_NAMES[others[0]]}-delimited but the rows do not split consistently; "
                "re-export with comma delimiters and quoted fields.")
    return ("A row has more fields than the header: a field holding the delimiter or a quote is not quoted; "
            "re-export with every text field quoted.")


def _strip_carriage_returns(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop the '\\r' that CRLF line ends leave at the end of the last field and header."""
    frame = frame.rename(columns=lambda name: str(name).strip().strip("\r").strip())
    for column in frame.columns:
        frame[column] = frame[column].fillna("").astype(str).str.removesuffix("\r")
    return frame


def _drop_index_column(frame: pd.DataFrame) -> pd.DataFrame:
    """Remove the unnamed leading index column that pandas exports write; source_row replaces it."""
    first = str(frame.columns[0])
    if first == "" or first.startswith("Unnamed: "):
        frame = frame.drop(columns=frame.columns[0])
    return frame


def _check_required_columns(frame: pd.DataFrame, path: Path, spec: CsvSpec) -> None:
    """Fail naming every missing column (and a likely misspelling), not just the first."""
    present = [str(column) for column in frame.columns]
    missing = [column for column in spec.required if column not in present]
    if not missing:
        return
    hints = []
    lowered = {column.lower(): column for column in present}
    for column in missing:
        if column.lower() in lowered:
            hints.append(f"'{lowered[column.lower()]}' looks like '{column}' with different case")
    if any("\x00" in column for column in present):
        hints.append("the header holds NUL bytes: the file looks like UTF-16 or UTF-32 without a byte-order mark; "
                     "re-save it as UTF-8")
    elif len(present) <= 2 and sum(name in present[-1] for name in spec.required) >= 2:
        hints.append("the header did not split into columns: check the delimiter")
    hint = f" ({'; '.join(hints)})" if hints else ""
    noun = "column" if len(missing) == 1 else "columns"
    read_as = f" (read as {frame.attrs['read_as']})" if frame.attrs.get("read_as") else ""
    raise DataValidationError(
        f"{spec.file_name} at {path} is missing required {noun} {format_examples(missing)}; "
        f"found columns {format_examples(present, limit=20)}{hint}{read_as}"
    )


def _extra_column_warnings(frame: pd.DataFrame, path: Path, spec: CsvSpec) -> list[str]:
    """Unknown columns are kept (they may matter to someone) but reported."""
    extra = [str(column) for column in frame.columns if column not in spec.known]
    if not extra:
        return []
    return [
        f"{spec.file_name} at {path} has unknown extra column(s) {format_examples(extra)}; "
        "they are kept as strings but not validated"
    ]


def _check_unique_ids(frame: pd.DataFrame, path: Path, file_name: str) -> None:
    """Duplicate ids make every join ambiguous, so they stop the run instead of being rejected.

    Empty ids are left to row-level validation, which rejects each of them.
    """
    ids = frame["id"]
    non_empty = ids[ids.str.strip() != ""]
    duplicated = non_empty[non_empty.duplicated(keep=False)]
    if duplicated.empty:
        return
    examples = []
    for value, rows in duplicated.groupby(duplicated, sort=False).groups.items():
        examples.append(f"{value!r} at rows {', '.join(str(row) for row in list(rows)[:4])}")
        if len(examples) >= MAX_EXAMPLES:
            break
    n_values = duplicated.nunique()
    raise DataValidationError(
        f"{file_name} at {path} has {n_values} duplicate value(s) in column 'id' "
        f"({len(duplicated)} rows), e.g. {'; '.join(examples)}; ids must be unique"
    )
