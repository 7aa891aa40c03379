"""Great-expectations suites that gate a raw export before anything learns from it.

Why this shape:
- Structural problems (missing file/column, duplicate ids) stop the run in raw_io.
- Row-level problems are found by real GX suites (ephemeral context, pandas data source,
  whole-dataframe batch, ExpectationSuite, ValidationDefinition, Checkpoint with
  UpdateDataDocsAction), run with result_format COMPLETE so every failing row index comes
  back; each failing row is quarantined in rejects.csv with a readable reason
  (first reason wins) instead of being dropped silently.
- Checks of severity "warning" (a PNG named .jpg, a location without county...) keep the
  row and only count a warning.
- Image files are inspected once (PIL open + load, which catches truncation) into a frame
  of per-file facts, which a GX suite then validates like any other table.
- Too many rejects means the export (or a parser) is broken: after writing rejects and Data
  Docs, RejectThresholdExceeded stops the pipeline rather than training on a sliver.

Data Docs go to the directory the caller names; the raw export is never written to.
"""

from __future__ import annotations

import logging

# Quiet before great_expectations is imported: no INFO chatter from its import-time machinery
# (a logger level set by the caller wins). Analytics are off through the context's own
# config (`_context_config`: analytics_enabled=False), never through os.environ: importing
# this module leaves the process environment as it was (the flows, the service and the tests
# apply the project's environment themselves: pipeline_steps/runtime_env.py).
if logging.getLogger("great_expectations").level == logging.NOTSET:
    logging.getLogger("great_expectations").setLevel(logging.WARNING)

import re  # noqa: E402
import time  # noqa: E402
import warnings as warnings_module  # noqa: E402
from collections.abc import Iterator, Mapping, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
import pandas as pd  # noqa: E402
from great_expectations.checkpoint import UpdateDataDocsAction  # noqa: E402
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.metadata_types import FailureSeverity  # noqa: E402
from PIL import Image, ImageFile, UnidentifiedImageError  # noqa: E402

from pipeline_steps import io_utils  # noqa: E402
from pipeline_steps import clean_schema  # noqa: E402
from pipeline_steps.clean_schema import SPLITS, load_classes, require_columns  # noqa: E402
from pipeline_steps.clean_schema import IMAGE_COLUMNS as CLEAN_IMAGE_COLUMNS  # noqa: E402
from pipeline_steps.clean_schema import PRODUCT_COLUMNS as CLEAN_PRODUCT_COLUMNS  # noqa: E402
from pipeline_steps.errors import ConfigError, DataValidationError, RejectThresholdExceeded  # noqa: E402
from pipeline_steps.text_hygiene import (  # noqa: E402
    PRODUCT_TEXT_COLUMNS,
    TextRule,
    TextRules,
    apply_fixes,
    gx_view,
    replace_surrogates,
    rules_for,
    shown_value,
    text_rules,
)
from pipeline_steps.raw_io import (  # noqa: E402
    IMAGES_DIR,
    IMAGES_FILE,
    PRODUCTS_FILE,
    SOURCE_ROW,
    format_examples,
    image_file_name,
    list_image_files,
    read_images_csv,
    read_products_csv,
    require_images_dir,
)

logger = logging.getLogger(__name__)

# Groups are non-capturing: GX evaluates these with pandas str.contains, which warns on groups.
PRICE_REGEX = r"^£\d{1,3}(?:,\d{3})*(?:\.\d{2})?$"
# "Root", "Root / Sub", "Root / Sub / Leaf": parts are non-empty and trimmed, joined by " / ".
CATEGORY_REGEX = r"^[^/\s](?:[^/]*[^/\s])?(?: / [^/\s](?:[^/]*[^/\s])?)*$"
# No empty comma-separated part ("Leeds," or ", Kent" cannot be split into town and county).
LOCATION_REGEX = r"^\s*[^,\s][^,]*(?:,\s*[^,\s][^,]*)*$"
TOWN_COUNTY_REGEX = r"^[^,]*[^,\s], [^,\s][^,]*$"
# An image id becomes a file name: one path component, never "." or "..".
SAFE_ID_REGEX = r"^(?!\.\.?$)[^/\\\x00-\x1f\x7f]+$"
MAX_FILE_NAME_CHARS = 200  # ids longer than this cannot name a file on common filesystems
EXPECTED_IMAGE_FORMAT = "JPEG"
REJECT_COLUMNS = ["source_file", "source_row", "record_id", "column", "reason", "value"]
TEXT_RULE_SUFFIXES = ("_control_chars", "_invalid_unicode", "_invisible_in_names", "_too_long")
ORPHAN_COLUMNS = ["file_name"]
DATA_DOCS_SITE = "pipeline_site"
REJECT = FailureSeverity.CRITICAL
WARN = FailureSeverity.WARNING

REQUIRED_PARAMS = (
    "max_reject_fraction",
    "min_image_side",
    "max_image_side",
    "max_image_pixels",
    "allowed_image_modes",
)


# --------------------------------------------------------------------------- checks and GX


@dataclass(frozen=True)
class Check:
    """One GX expectation plus how to explain a failing row to a human.

    `reason` is a str.format template over the row's fields, the validation params and
    `value` (the row's `value_column`); `column` is what rejects.csv names.
    """

    check_id: str
    column: str
    expectation: gxe.Expectation
    reason: str
    value_column: str | None = None

    @property
    def severity(self) -> FailureSeverity:
        return self.expectation.severity


def _expect(kind: type[gxe.Expectation], check_id: str, severity: FailureSeverity, **kwargs: Any) -> gxe.Expectation:
    """Build an expectation tagged with our check id, so results map back to reasons."""
    return kind(meta={"check_id": check_id}, severity=severity, **kwargs)


def _check(
    check_id: str,
    column: str,
    kind: type[gxe.Expectation],
    reason: str,
    severity: FailureSeverity = REJECT,
    value_column: str | None = None,
    on: str | None = "",
    **kwargs: Any,
) -> Check:
    """`column` is named in rejects.csv; `on` is the frame column GX checks (default: the same,
    None for column-pair expectations, which take column_A/column_B instead)."""
    if on is not None:
        kwargs["column"] = on or column
    effect = "Rejects the row" if severity == REJECT else "Keeps the row with a warning"
    notes = f"{effect} when: {re.sub(r'{[^}]*}', '…', reason)}"
    expectation = _expect(kind, check_id, severity, notes=notes, **kwargs)
    return Check(check_id, column, expectation, reason, value_column)


@dataclass
class SuiteResult:
    """What one checkpoint run found: failing row labels per check id, and overall success."""

    name: str
    success: bool
    failing_rows: dict[str, list[Any]]
    observed: dict[str, Any] = field(default_factory=dict)


class GxRunner:
    """An ephemeral GX context whose only persistent output is the Data Docs site.

    Ephemeral keeps suites and results in memory (nothing to clean up, nothing written
    beside the data); the Data Docs site is pointed at `data_docs_dir` so every run
    leaves browsable HTML there.
    """

    def __init__(self, data_docs_dir: Path | None) -> None:
        self.data_docs_dir = Path(data_docs_dir) if data_docs_dir is not None else None
        self.context = gx.get_context(mode="ephemeral", project_config=_context_config(self.data_docs_dir))
        self.source = self.context.data_sources.add_pandas("pipeline_frames")

    def run(self, name: str, frame: pd.DataFrame, checks: Sequence[Check]) -> SuiteResult:
        """Validate `frame` against `checks` through a Checkpoint and collect failing rows."""
        asset = self.source.add_dataframe_asset(name)
        batch_definition = asset.add_batch_definition_whole_dataframe(f"{name}_whole_frame")
        suite = self.context.suites.add(gx.ExpectationSuite(name=name))
        for check in checks:
            suite.add_expectation(check.expectation)
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{name}_validation", data=batch_definition, suite=suite)
        )
        actions = []
        if self.data_docs_dir is not None:
            actions.append(UpdateDataDocsAction(name="update_data_docs", site_names=[DATA_DOCS_SITE]))
        checkpoint = self.context.checkpoints.add(
            gx.Checkpoint(
                name=f"{name}_checkpoint",
                validation_definitions=[definition],
                actions=actions,
                result_format={"result_format": "COMPLETE"},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        (validation_result,) = outcome.run_results.values()
        return _collect(name, validation_result)


def _context_config(data_docs_dir: Path | None) -> DataContextConfig:
    """In-memory stores, no progress bars, no analytics, docs only where we say."""
    sites: dict[str, Any] = {}
    if data_docs_dir is not None:
        sites[DATA_DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(data_docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    return DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )


def _collect(name: str, validation_result: Any) -> SuiteResult:
    """Map each expectation result back to its check id; a crashed expectation is a bug, not a reject."""
    failing: dict[str, list[Any]] = {}
    observed: dict[str, Any] = {}
    for result in validation_result.results:
        config = result.expectation_config
        check_id = (config.meta or {}).get("check_id", config.type)
        info = result.exception_info or {}
        if info.get("raised_exception"):
            raise DataValidationError(
                f"great-expectations could not evaluate check '{check_id}' of suite '{name}': "
                f"{info.get('exception_message')}"
            )
        details = result.result or {}
        observed[check_id] = details.get("observed_value")
        if not result.success:
            failing[check_id] = list(details.get("unexpected_index_list") or [])
    return SuiteResult(name, bool(validation_result.success), failing, observed)


# --------------------------------------------------------------------------- suites


def product_checks(params: Mapping[str, Any]) -> list[Check]:
    """Products.csv rules, in the order their reasons win."""
    location_severity = REJECT if params["location_requires_county"] else WARN
    return [
        _check("id_missing", "id", gxe.ExpectColumnValuesToNotBeNull, "id is empty"),
        _check("id_duplicate", "id", gxe.ExpectColumnValuesToBeUnique, "id {value!r} appears more than once"),
        _check("name_missing", "product_name", gxe.ExpectColumnValuesToNotBeNull, "product_name is empty"),
        _check("category_missing", "category", gxe.ExpectColumnValuesToNotBeNull, "category is empty"),
        _check(
            "category_format", "category", gxe.ExpectColumnValuesToMatchRegex,
            "category {value!r} is not like 'Root / Sub / Leaf'", regex=CATEGORY_REGEX,
        ),
        _check("price_missing", "price", gxe.ExpectColumnValuesToNotBeNull, "price is empty"),
        _check(
            "price_format", "price", gxe.ExpectColumnValuesToMatchRegex,
            "price {value!r} is not a £ amount like '£1,234.00'", regex=PRICE_REGEX,
        ),
        _check("location_missing", "location", gxe.ExpectColumnValuesToNotBeNull, "location is empty"),
        _check(
            "location_format", "location", gxe.ExpectColumnValuesToMatchRegex,
            "location {value!r} has an empty part; expected 'Town, County'", regex=LOCATION_REGEX,
        ),
        _check(
            "location_without_county", "location", gxe.ExpectColumnValuesToMatchRegex,
            "location {value!r} is not 'Town, County'", severity=location_severity, regex=TOWN_COUNTY_REGEX,
        ),
        _check(
            "description_missing", "product_description", gxe.ExpectColumnValuesToNotBeNull,
            "product_description is empty", severity=WARN,
        ),
    ]


def text_checks(rules: Sequence[TextRule]) -> list[Check]:
    """Text hygiene as GX expectations: regexes for characters, value lengths for limits.

    A rule that fixes (strip, truncate) is a warning-level expectation: the row is kept,
    counted in the metrics and shown in Data Docs; a rejecting rule quarantines the row.
    """
    checks = []
    for rule in rules:
        severity = REJECT if rule.reject else WARN
        if rule.rule == "too_long":
            checks.append(_check(rule.check_id, rule.column, gxe.ExpectColumnValueLengthsToBeBetween, rule.reason,
                                 severity=severity, max_value=rule.max_chars))
        else:
            checks.append(_check(rule.check_id, rule.column, gxe.ExpectColumnValuesToNotMatchRegex, rule.reason,
                                 severity=severity, regex=rule.regex))
    return checks


def image_row_checks(product_ids: Sequence[str], rules: TextRules | None = None) -> list[Check]:
    """Images.csv rules: usable ids, and every image belongs to a product of Products.csv."""
    hygiene = text_checks(rules_for(["id", "product_id"], rules)) if rules is not None else []
    return [*hygiene,
        _check("id_missing", "id", gxe.ExpectColumnValuesToNotBeNull, "id is empty"),
        _check("id_duplicate", "id", gxe.ExpectColumnValuesToBeUnique, "id {value!r} appears more than once"),
        _check(
            "id_not_file_name", "id", gxe.ExpectColumnValuesToMatchRegex,
            "id {value!r} cannot be used as a file name", regex=SAFE_ID_REGEX,
        ),
        _check("product_id_missing", "product_id", gxe.ExpectColumnValuesToNotBeNull, "product_id is empty"),
        _check(
            "product_id_unknown", "product_id", gxe.ExpectColumnValuesToBeInSet,
            "product_id {value!r} is not an id in Products.csv",
            value_set=sorted({replace_surrogates(product_id) for product_id in product_ids}),
        ),
    ]


def image_file_checks(params: Mapping[str, Any]) -> list[Check]:
    """Per-file facts rules: the photo exists, is non-empty, decodes and has a sane size/mode."""
    side = "each side must be within [{min_image_side}, {max_image_side}] px (validation.min_image_side/max_image_side)"
    return [
        _check("file_missing", "file", gxe.ExpectColumnValuesToBeInSet, "image file {file_name} is missing",
               on="exists", value_set=[True], value_column="file_name"),
        _check("file_empty", "file", gxe.ExpectColumnValuesToBeBetween, "image file {file_name} is empty (0 bytes)",
               on="size_bytes", min_value=1, value_column="file_name"),
        _check(
            "file_too_many_pixels", "file_pixels", gxe.ExpectColumnValuesToBeBetween,
            "image {file_name} has {pixels:.0f} pixels, more than validation.max_image_pixels "
            "({max_image_pixels}): possible decompression bomb",
            on="pixels", max_value=params["max_image_pixels"], value_column="pixels",
        ),
        _check("file_undecodable", "file", gxe.ExpectColumnValuesToBeInSet,
               "image file {file_name} cannot be decoded: {error}",
               on="decodable", value_set=[True], value_column="file_name"),
        _check("file_mode", "file_mode", gxe.ExpectColumnValuesToBeInSet,
               "image {file_name} has mode {mode!r}, not one of validation.allowed_image_modes",
               on="mode", value_set=list(params["allowed_image_modes"]), value_column="mode"),
        _check("file_width", "file_width", gxe.ExpectColumnValuesToBeBetween,
               "image {file_name} is {width:.0f}x{height:.0f} px; " + side,
               on="width", min_value=params["min_image_side"], max_value=params["max_image_side"],
               value_column="width"),
        _check("file_height", "file_height", gxe.ExpectColumnValuesToBeBetween,
               "image {file_name} is {width:.0f}x{height:.0f} px; " + side,
               on="height", min_value=params["min_image_side"], max_value=params["max_image_side"],
               value_column="height"),
        _check("file_format_mismatch", "file_format", gxe.ExpectColumnValuesToBeInSet,
               "image {file_name} is {format}, not JPEG, despite its .jpg name",
               severity=WARN, on="format", value_set=[EXPECTED_IMAGE_FORMAT], value_column="format"),
    ]


# --------------------------------------------------------------------------- image files


@contextmanager
def pil_safety(max_image_pixels: int) -> Iterator[None]:
    """Decompression-bomb guard and strict truncation for the duration of a scan.

    PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; turning the warning
    into an exception means an oversized file is never decoded. The previous global
    settings are restored because other steps (cleaning, serving) set their own.
    """
    previous_limit = Image.MAX_IMAGE_PIXELS
    previous_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = int(max_image_pixels)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings_module.catch_warnings():
            warnings_module.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
        ImageFile.LOAD_TRUNCATED_IMAGES = previous_truncated


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# None = not checked (e.g. no size for a missing file); GX column checks skip None.
NO_FACTS: dict[str, Any] = dict(exists=None, size_bytes=None, pixels=None, decodable=None,
                                format=None, mode=None, width=None, height=None, error=None)


def inspect_image_file(path: Path, max_image_pixels: int) -> dict[str, Any]:
    """Facts about one photo from a single open + load (no second decode anywhere).

    Call inside `pil_safety`. Fields left None were not reachable (e.g. no size for a
    missing file) and are ignored by the GX checks, so the first real problem is reported.
    """
    facts = {**NO_FACTS, "exists": False}
    try:
        stat = path.stat()
    except (OSError, ValueError):  # missing, not a folder on the way, name too long, NUL byte
        return facts
    if not path.is_file():
        return facts
    facts.update(exists=True, size_bytes=stat.st_size)
    if stat.st_size == 0:
        return facts
    try:
        with Image.open(path) as image:
            width, height = image.size
            facts.update(format=image.format, mode=image.mode, width=width, height=height, pixels=width * height)
            if width * height > max_image_pixels:
                return facts
            image.load()
        facts["decodable"] = True
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        match = _BOMB_PIXELS.search(str(exc))
        facts.update(pixels=int(match.group(1)) if match else max_image_pixels + 1, error=str(exc))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        facts.update(decodable=False, error=str(exc) or type(exc).__name__)
    return facts


def scan_image_files(images: pd.DataFrame, images_dir: Path, max_image_pixels: int) -> pd.DataFrame:
    """One row of file facts per Images.csv row (same index), ready for the GX file suite."""
    rows = []
    safe = (images["id"].str.fullmatch(SAFE_ID_REGEX) & (images["id"].str.strip() != "")
            & (images["id"].str.len() <= MAX_FILE_NAME_CHARS))
    with pil_safety(max_image_pixels):
        for image_id, is_safe in zip(images["id"], safe, strict=True):
            name = image_file_name(image_id)
            # An unsafe id is rejected by the Images.csv suite; its "file" is never touched.
            facts = inspect_image_file(images_dir / name, max_image_pixels) if is_safe else NO_FACTS
            rows.append({"image_id": image_id, "file_name": f"{IMAGES_DIR}/{name}", **facts})
    frame = pd.DataFrame(rows, index=images.index, columns=["image_id", "file_name", *NO_FACTS])
    for column in ("size_bytes", "pixels", "width", "height"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in ("exists", "decodable", "format", "mode", "error"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


def find_orphans(images: pd.DataFrame, file_names: Sequence[str]) -> pd.DataFrame:
    """Files in images/ that no Images.csv row (accepted or not) points at."""
    claimed = {image_file_name(image_id) for image_id in images["id"]}
    orphans = [name for name in file_names if name not in claimed]
    return pd.DataFrame({"file_name": orphans}, columns=ORPHAN_COLUMNS)


# --------------------------------------------------------------------------- rejects


def blank_to_none(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """A GX view of raw strings: blank ('' or whitespace) becomes None so not-null checks see it."""
    view = pd.DataFrame(index=frame.index)
    for column in columns:
        values = frame[column].astype(object)
        view[column] = values.where(values.astype(str).str.strip() != "", None)
    return view


def rows_to_rejects(
    source_file: str,
    frame: pd.DataFrame,
    suite: SuiteResult,
    checks: Sequence[Check],
    params: Mapping[str, Any],
    id_column: str,
    already: dict[Any, dict[str, Any]],
) -> dict[str, list[Any]]:
    """Turn failing reject-level rows into reject records (first reason wins, in check order).

    Mutates `already` (row label -> reject record); returns the warning-level failing rows.
    """
    warned: dict[str, list[Any]] = {}
    for check in checks:
        rows = suite.failing_rows.get(check.check_id, [])
        if not rows:
            continue
        if check.severity != REJECT:
            warned[check.check_id] = rows
            continue
        for row in rows:
            if row in already:
                continue
            already[row] = _reject_record(source_file, frame, row, check, params, id_column)
    return warned


def _reject_record(
    source_file: str,
    frame: pd.DataFrame,
    row: Any,
    check: Check,
    params: Mapping[str, Any],
    id_column: str,
) -> dict[str, Any]:
    record = {key: shown_value(_printable(value)) for key, value in frame.loc[row].items()}
    value = record.get(check.value_column or check.column, "")
    try:
        reason = check.reason.format_map(_FormatDict({**params, **record, "value": value}))
    except (ValueError, TypeError, IndexError):  # e.g. "{width:.0f}" on an empty fact
        reason = f"check '{check.check_id}' failed on {check.column} {value!r}"
    return {
        "source_file": source_file,
        "source_row": int(frame.loc[row, SOURCE_ROW]),
        "record_id": record.get(id_column, ""),
        "column": check.column,
        "reason": reason,
        "value": value,
        "check_id": check.check_id,
    }


class _FormatDict(dict):
    """format_map that prints '?' for a field the row does not have instead of failing."""

    def __missing__(self, key: str) -> str:
        return "?"


def _printable(value: Any) -> Any:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return value


def warnings_from_rows(
    source_file: str, frame: pd.DataFrame, warned: Mapping[str, list[Any]], checks: Sequence[Check],
    params: Mapping[str, Any], id_column: str, rejected: Mapping[Any, Any],
) -> tuple[list[str], dict[str, int]]:
    """One readable warning per warning-level check over the kept rows, with a count and examples."""
    by_id = {check.check_id: check for check in checks}
    messages, counts = [], {}
    for check_id, all_rows in warned.items():
        check = by_id[check_id]
        rows = [row for row in all_rows if row not in rejected]
        if not rows:
            continue
        examples: list[str] = []
        for row in rows:
            reason = _reject_record(source_file, frame, row, check, params, id_column)["reason"]
            if reason not in examples:
                examples.append(reason)
            if len(examples) == 3:
                break
        counts[f"{_prefix(source_file)}.{check_id}"] = len(rows)
        messages.append(
            f"{source_file}: {len(rows)} row(s) kept with warning '{check_id}', e.g. {'; '.join(examples)}"
        )
    return messages, counts


def _prefix(source_file: str) -> str:
    return Path(source_file).stem.lower()


# --------------------------------------------------------------------------- validate_raw


def validate_raw(
    raw_dir: Path, out_dir: Path, validation_params: Mapping[str, Any], data_docs_dir: Path
) -> dict[str, Any]:
    """Validate a raw export into `out_dir` and return the run's metrics.

    Writes rejects.csv, orphans.csv and, when the reject threshold holds, products.parquet
    and images.parquet (all atomically); rebuilds the Data Docs site in `data_docs_dir`
    (swapped in as a whole, so it never mixes pages of two runs). Raises DataValidationError
    for structural problems (nothing written) and RejectThresholdExceeded, carrying
    `.metrics`, after rejects and docs are written when too many rows were rejected.
    """
    started = time.perf_counter()
    raw_dir, out_dir, data_docs_dir = Path(raw_dir), Path(out_dir), Path(data_docs_dir)
    params = check_validation_params(validation_params)
    _refuse_inside(raw_dir, {"validated output dir": out_dir, "data docs dir": data_docs_dir})

    read_warnings: list[str] = []
    products = read_products_csv(raw_dir / PRODUCTS_FILE, read_warnings)
    images = read_images_csv(raw_dir / IMAGES_FILE, read_warnings)
    images_dir = require_images_dir(raw_dir)
    file_names = list_image_files(images_dir)

    with io_utils.atomic_dir(data_docs_dir) as docs_build_dir:
        docs_build_dir.chmod(0o755)  # mkdtemp makes it private; docs are meant to be browsed
        runner = GxRunner(docs_build_dir)
        product_result = _validate_products(runner, products, params)
        image_result = _validate_images(runner, images, images_dir, products, product_result.rejects, params)
    orphans = find_orphans(images, file_names)

    rejects = _rejects_frame([*product_result.rejects.values(), *image_result.rejects.values()])
    metrics = _metrics(products, images, product_result, image_result, rejects, orphans, params,
                       read_warnings, data_docs_dir / "index.html", file_names)
    exceeded = _threshold_message(metrics, params, out_dir)
    # The validated layer is written into a temporary sibling and swapped in as a whole: a crash
    # never leaves a mix of two runs' tables. Past the reject threshold it holds only rejects.csv
    # and orphans.csv, so no older run's accepted tables look current.
    with io_utils.atomic_dir(out_dir) as tmp_out:
        tmp_out.chmod(0o755)
        io_utils.write_csv(rejects[REJECT_COLUMNS], tmp_out / "rejects.csv")
        io_utils.write_csv(orphans, tmp_out / "orphans.csv")
        if not exceeded:
            io_utils.write_parquet(product_result.frame.drop(index=list(product_result.rejects)),
                                   tmp_out / "products.parquet")
            io_utils.write_parquet(_accepted_images(images, image_result), tmp_out / "images.parquet")
    metrics["duration_s"] = round(time.perf_counter() - started, 2)
    if exceeded:
        error = RejectThresholdExceeded(exceeded)
        error.metrics = metrics  # type: ignore[attr-defined]
        raise error
    return metrics


@dataclass
class TableOutcome:
    """Rejects (row label -> record) and the warnings a file's suites produced."""

    rejects: dict[Any, dict[str, Any]]
    warnings: list[str]
    warning_counts: dict[str, int]
    suites: dict[str, bool]
    file_facts: pd.DataFrame | None = None
    frame: pd.DataFrame | None = None  # the rows after the text-hygiene fixes
    text_fixes: dict[str, int] = field(default_factory=dict)


def _validate_products(runner: GxRunner, products: pd.DataFrame, params: Mapping[str, Any]) -> TableOutcome:
    """Text hygiene first (its fixes are what the other checks and the outputs see), then the row rules."""
    rules = rules_for([c for c in ("id", *PRODUCT_TEXT_COLUMNS, "price") if c in products.columns], params["text"])
    hygiene = text_checks(rules)
    text_suite = runner.run("products_text", gx_view(products, [rule.column for rule in rules]), hygiene)
    rejects: dict[Any, dict[str, Any]] = {}
    text_warned = rows_to_rejects(PRODUCTS_FILE, products, text_suite, hygiene, params, "id", rejects)
    fixed, fixes = apply_fixes(products, rules, skip=list(rejects))
    fixed.attrs = dict(products.attrs)

    checks = product_checks(params)
    suite = runner.run("products_csv", gx_view(fixed, [c.column for c in checks]), checks)
    warned = rows_to_rejects(PRODUCTS_FILE, fixed, suite, checks, params, "id", rejects)
    text_messages, text_counts = warnings_from_rows(PRODUCTS_FILE, products, text_warned, hygiene, params, "id", rejects)
    messages, counts = warnings_from_rows(PRODUCTS_FILE, fixed, warned, checks, params, "id", rejects)
    suites = {text_suite.name: text_suite.success, suite.name: suite.success}
    return TableOutcome(rejects, text_messages + messages, {**text_counts, **counts}, suites,
                        frame=fixed, text_fixes={f"products.{key}": n for key, n in fixes.items()})


def _validate_images(
    runner: GxRunner,
    images: pd.DataFrame,
    images_dir: Path,
    products: pd.DataFrame,
    product_rejects: Mapping[Any, dict[str, Any]],
    params: Mapping[str, Any],
) -> TableOutcome:
    """Images.csv rows, then their files, then the product cascade: first reason wins."""
    rejects: dict[Any, dict[str, Any]] = {}
    row_checks = image_row_checks(products["id"].tolist(), params["text"])
    row_suite = runner.run("images_csv", gx_view(images, ["id", "product_id"]), row_checks)
    warned = rows_to_rejects(IMAGES_FILE, images, row_suite, row_checks, params, "id", rejects)

    facts = scan_image_files(images, images_dir, params["max_image_pixels"])
    file_checks = image_file_checks(params)
    gx_columns = ["exists", "size_bytes", "pixels", "decodable", "mode", "width", "height", "format"]
    file_suite = runner.run("image_files", facts[gx_columns], file_checks)
    detailed = facts.join(images[[SOURCE_ROW]])
    file_warned = rows_to_rejects(IMAGES_FILE, detailed, file_suite, file_checks, params, "image_id", rejects)

    _reject_images_of_rejected_products(images, products, product_rejects, rejects)
    messages, counts = warnings_from_rows(IMAGES_FILE, images, warned, row_checks, params, "id", rejects)
    file_messages, file_counts = warnings_from_rows(
        IMAGES_FILE, detailed, file_warned, file_checks, params, "image_id", rejects
    )
    suites = {row_suite.name: row_suite.success, file_suite.name: file_suite.success}
    return TableOutcome(rejects, messages + file_messages, {**counts, **file_counts}, suites, facts)


def _reject_images_of_rejected_products(
    images: pd.DataFrame,
    products: pd.DataFrame,
    product_rejects: Mapping[Any, dict[str, Any]],
    rejects: dict[Any, dict[str, Any]],
) -> None:
    """An image of a quarantined product cannot be used either; say which product and why."""
    reason_by_id = {products.loc[row, "id"]: record["reason"] for row, record in product_rejects.items()}
    hit = images["product_id"].isin(list(reason_by_id))
    for row in images.index[hit]:
        if row in rejects:
            continue
        product_id = images.loc[row, "product_id"]
        rejects[row] = {
            "source_file": IMAGES_FILE,
            "source_row": int(images.loc[row, SOURCE_ROW]),
            "record_id": images.loc[row, "id"],
            "column": "product_id",
            "reason": f"its product {product_id!r} was rejected ({reason_by_id[product_id]})",
            "value": product_id,
            "check_id": "product_rejected",
        }


def _accepted_images(images: pd.DataFrame, outcome: TableOutcome) -> pd.DataFrame:
    """Passing Images.csv rows plus the file facts the contract promises downstream."""
    facts = outcome.file_facts
    if facts is None:
        raise ValueError("the images outcome carries no file facts")
    kept = images.drop(index=list(outcome.rejects)).copy()
    kept["file_format"] = facts.loc[kept.index, "format"].astype(str)
    kept["file_mode"] = facts.loc[kept.index, "mode"].astype(str)
    kept["file_width"] = facts.loc[kept.index, "width"].astype("int64")
    kept["file_height"] = facts.loc[kept.index, "height"].astype("int64")
    return kept.reset_index(drop=True)


def _rejects_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(records), columns=[*REJECT_COLUMNS, "check_id"])
    frame["value"] = frame["value"].map(lambda value: "" if value is None else str(shown_value(value, cut=False)))
    frame["record_id"] = frame["record_id"].map(lambda value: shown_value(value, cut=False))
    return frame.sort_values(["source_file", "source_row"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- metrics


def _metrics(
    products: pd.DataFrame,
    images: pd.DataFrame,
    product_result: TableOutcome,
    image_result: TableOutcome,
    rejects: pd.DataFrame,
    orphans: pd.DataFrame,
    params: Mapping[str, Any],
    read_warnings: list[str],
    data_docs_index: Path,
    file_names: Sequence[str],
) -> dict[str, Any]:
    """Flat, JSON-friendly numbers for metrics/validate.json (dvc metrics diff reads them)."""
    n_products, n_images = len(products), len(images)
    n_rej_products, n_rej_images = len(product_result.rejects), len(image_result.rejects)
    by_reason = {
        f"{_prefix(file)}.{check}": int(count)
        for (file, check), count in rejects.groupby(["source_file", "check_id"]).size().items()
    }
    warnings_list = [*read_warnings, *product_result.warnings, *image_result.warnings]
    if len(orphans):
        warnings_list.append(
            f"{len(orphans)} image file(s) have no {IMAGES_FILE} row, e.g. "
            f"{format_examples(orphans['file_name'].tolist(), 3)}; listed in orphans.csv"
        )
    kept_products = products.drop(index=list(product_result.rejects))
    text_rejects = {key: n for key, n in by_reason.items() if key.split(".", 1)[1].endswith(TEXT_RULE_SUFFIXES)}
    kept_images = images.drop(index=list(image_result.rejects))
    warning_counts = {**product_result.warning_counts, **image_result.warning_counts}
    return {
        "products_rows_in": n_products,
        "products_rows_out": n_products - n_rej_products,
        "products_rejected": n_rej_products,
        "products_rejected_fraction": _fraction(n_rej_products, n_products),
        "images_rows_in": n_images,
        "images_rows_out": n_images - n_rej_images,
        "images_rejected": n_rej_images,
        "images_rejected_fraction": _fraction(n_rej_images, n_images),
        "rejected_fraction": max(_fraction(n_rej_products, n_products), _fraction(n_rej_images, n_images)),
        "max_reject_fraction": float(params["max_reject_fraction"]),
        "image_files_found": len(file_names),
        "image_format_mismatches": warning_counts.get("images.file_format_mismatch", 0),
        "orphan_files": len(orphans),
        "products_without_images": int((~kept_products["id"].isin(kept_images["product_id"])).sum()),
        "rejects_by_reason": by_reason,
        "warning_counts": warning_counts,
        # text hygiene (validation.text): values fixed (stripped/truncated) and rows rejected, per check
        "text_fixes": dict(sorted(product_result.text_fixes.items())),
        "text_fixes_total": int(sum(product_result.text_fixes.values())),
        "text_rejects": text_rejects,
        "text_rejects_total": int(sum(text_rejects.values())),
        "warnings": warnings_list,
        "n_warnings": len(warnings_list),
        "suites_passed": {**product_result.suites, **image_result.suites},
        "encodings": {PRODUCTS_FILE: products.attrs.get("encoding"), IMAGES_FILE: images.attrs.get("encoding")},
        "delimiters": {PRODUCTS_FILE: products.attrs.get("delimiter"), IMAGES_FILE: images.attrs.get("delimiter")},
        "data_docs_index": str(data_docs_index),
    }


def _fraction(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def _threshold_message(metrics: Mapping[str, Any], params: Mapping[str, Any], out_dir: Path) -> str | None:
    """The RejectThresholdExceeded message, or None when both files are within the limit."""
    limit = float(params["max_reject_fraction"])
    problems = []
    for label, key in ((PRODUCTS_FILE, "products"), (IMAGES_FILE, "images")):
        fraction = metrics[f"{key}_rejected_fraction"]
        if fraction > limit:
            problems.append(
                f"{metrics[f'{key}_rejected']} of {metrics[f'{key}_rows_in']} {label} rows "
                f"({fraction:.1%}) were rejected"
            )
    if not problems:
        return None
    top = sorted(metrics["rejects_by_reason"].items(), key=lambda item: -item[1])[:5]
    top_text = ", ".join(f"{name}: {count}" for name, count in top)
    return (
        f"{'; '.join(problems)}, more than params.yaml validation.max_reject_fraction = {limit} "
        f"({limit:.1%}). Top reasons: {top_text}. Rejects are in {out_dir / 'rejects.csv'}, Data Docs in "
        f"{metrics['data_docs_index']}. Fix the export, or raise validation.max_reject_fraction if this is expected."
    )


def check_validation_params(validation_params: Mapping[str, Any]) -> dict[str, Any]:
    """Fail early, naming the params.yaml key, instead of a KeyError halfway through a scan."""
    if not isinstance(validation_params, Mapping):
        raise ConfigError("params.yaml key 'validation' must be a mapping")
    missing = [key for key in REQUIRED_PARAMS if key not in validation_params]
    if missing:
        raise ConfigError(f"params.yaml is missing key(s) {', '.join('validation.' + k for k in missing)}")
    params = dict(validation_params)
    fraction = params["max_reject_fraction"]
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ConfigError(
            f"params.yaml key 'validation.max_reject_fraction' is {fraction!r}; expected a number in [0, 1]"
        )
    for key in ("min_image_side", "max_image_side", "max_image_pixels"):
        if not isinstance(params[key], int) or params[key] <= 0:
            raise ConfigError(f"params.yaml key 'validation.{key}' is {params[key]!r}; expected a positive integer")
    if params["min_image_side"] > params["max_image_side"]:
        raise ConfigError("params.yaml: validation.min_image_side is larger than validation.max_image_side")
    params["allowed_image_modes"] = [str(mode) for mode in params["allowed_image_modes"]]
    params["text"] = text_rules(params["text"])
    return params


def _refuse_inside(raw_dir: Path, outputs: Mapping[str, Path]) -> None:
    """The raw export is read-only by contract: refuse outputs that would land inside it."""
    raw = raw_dir.resolve()
    for label, path in outputs.items():
        if path.resolve() == raw or path.resolve().is_relative_to(raw):
            raise ConfigError(f"the {label} {path} is inside the raw export {raw_dir}, which is never written to")


# --------------------------------------------------------------------------- clean tables

CLEAN_PATH_REGEX = r"^images/[^/\\]+\.jpg$"


def validate_clean_tables(
    products_df: pd.DataFrame,
    images_df: pd.DataFrame,
    classes: Sequence[str] | None = None,
    *,
    min_classes: int = 2,
    data_docs_dir: Path | None = None,
) -> dict[str, Any]:
    """Check data.clean_dir's products/images tables against the contract, or raise.

    `classes` is labels.json's sorted class list; without it the sorted distinct categories
    are used, which is what the contract's "label = int code of category" means. Raises
    DataValidationError naming every failed check with counts and examples.
    """
    require_columns(products_df, CLEAN_PRODUCT_COLUMNS, f"clean {clean_schema.PRODUCTS_FILE}")
    require_columns(images_df, CLEAN_IMAGE_COLUMNS, f"clean {clean_schema.IMAGES_FILE}")
    if products_df.empty:
        raise DataValidationError("clean products.parquet has no rows")
    class_list = list(classes) if classes is not None else sorted(products_df["category"].dropna().unique())
    products = _clean_products_view(products_df, class_list)
    images = _clean_images_view(images_df, products_df)
    with _docs_build_dir(data_docs_dir) as docs_build_dir:
        runner = GxRunner(docs_build_dir)
        product_checks_ = clean_product_checks(class_list, min_classes)
        image_checks_ = clean_image_checks()
        product_suite = runner.run("clean_products", products, product_checks_)
        image_suite = runner.run("clean_images", images, image_checks_)

    problems = _describe_failures("clean products.parquet", products, product_suite, product_checks_, "product_id")
    problems += _describe_failures("clean images.parquet", images, image_suite, image_checks_, "image_id")
    if problems:
        raise DataValidationError(f"clean tables break the data contract: {' | '.join(problems)}")
    return {
        "products": len(products_df),
        "images": len(images_df),
        "n_classes": len(class_list),
        "classes_present": int(products_df["category"].nunique()),
        "splits": {split: int((products_df["split"] == split).sum()) for split in SPLITS},
        "data_docs_index": str(Path(data_docs_dir) / "index.html") if data_docs_dir is not None else None,
    }


def validate_clean_layer(clean_dir: Path, data_docs_dir: Path | None = None) -> dict[str, Any]:
    """Check a written clean layer (products.parquet, images.parquet, labels.json) against the contract.

    What the clean stage runs on the layer it has just built, before the layer replaces the
    previous one (flows/clean.py): the GX suites `clean_products` and `clean_images`
    (validate_clean_tables), with their Data Docs in `data_docs_dir`.

    Args:
        clean_dir: a folder in the Clean layout (docs/ARCHITECTURE.md, "Clean").
        data_docs_dir: where the Data Docs site goes (replaced as a whole); None for none.

    Returns:
        validate_clean_tables' summary (row counts, classes, splits, Data Docs index).

    Raises:
        DataValidationError: a file is missing or a check failed, naming the check, the rows
        and an example reason.
    """
    clean_dir = Path(clean_dir)
    layer_files = (clean_schema.PRODUCTS_FILE, clean_schema.IMAGES_FILE, clean_schema.LABELS_FILE)
    missing = [name for name in layer_files if not (clean_dir / name).is_file()]
    if missing:
        raise DataValidationError(f"the clean layer {clean_dir} lacks {format_examples(missing)}")
    return validate_clean_tables(
        pd.read_parquet(clean_dir / clean_schema.PRODUCTS_FILE),
        pd.read_parquet(clean_dir / clean_schema.IMAGES_FILE),
        load_classes(clean_dir),
        data_docs_dir=data_docs_dir,
    )


@contextmanager
def _docs_build_dir(data_docs_dir: Path | None) -> Iterator[Path | None]:
    """Build docs in a temporary sibling swapped in on success; no docs when no dir is given."""
    if data_docs_dir is None:
        yield None
        return
    with io_utils.atomic_dir(data_docs_dir) as build_dir:
        build_dir.chmod(0o755)  # mkdtemp makes it private; docs are meant to be browsed
        yield build_dir


def clean_product_checks(classes: Sequence[str], min_classes: int) -> list[Check]:
    """Contract rules for clean products.parquet (label, split, price, category, ids)."""
    n_classes = len(classes)
    return [
        _check("product_id_missing", "product_id", gxe.ExpectColumnValuesToNotBeNull, "product_id is empty"),
        _check("product_id_duplicate", "product_id", gxe.ExpectColumnValuesToBeUnique,
               "product_id {value!r} is on several rows (a product in two splits?)"),
        _check("text_missing", "text", gxe.ExpectColumnValuesToNotBeNull, "text is empty"),
        _check("category_missing", "category", gxe.ExpectColumnValuesToNotBeNull, "category is empty"),
        _check("category_unknown", "category", gxe.ExpectColumnValuesToBeInSet,
               "category {value!r} is not in labels.json classes", value_set=list(classes)),
        _check("label_missing", "label", gxe.ExpectColumnValuesToNotBeNull, "label is missing"),
        _check("label_range", "label", gxe.ExpectColumnValuesToBeBetween,
               "label {value} is outside [0, n_classes-1]", min_value=0, max_value=max(n_classes - 1, 0)),
        _check("label_matches_category", "label", gxe.ExpectColumnPairValuesToBeEqual,
               "label {value} is not the index of its category", on=None,
               column_A="label", column_B="expected_label"),
        _check("split_value", "split", gxe.ExpectColumnValuesToBeInSet,
               "split {value!r} is not train/val/test", value_set=list(SPLITS)),
        _check("train_split_present", "split", gxe.ExpectColumnDistinctValuesToContainSet,
               "there is no train split", on="split", value_set=["train"]),
        _check("price_missing", "price", gxe.ExpectColumnValuesToNotBeNull, "price is missing"),
        _check("price_negative", "price", gxe.ExpectColumnValuesToBeBetween, "price {value} is negative",
               min_value=0),
        _check("outlier_flag", "price_is_outlier", gxe.ExpectColumnValuesToBeInSet,
               "price_is_outlier {value!r} is not a boolean", value_set=[True, False]),
        _check("n_images_negative", "n_images", gxe.ExpectColumnValuesToBeBetween,
               "n_images {value} is negative", min_value=0),
        _check("class_count", "category", gxe.ExpectColumnUniqueValueCountToBeBetween,
               "number of classes is outside [min_classes, n_classes]",
               min_value=min(min_classes, n_classes), max_value=n_classes),
    ]


def clean_image_checks() -> list[Check]:
    """Contract rules for clean images.parquet, including 'no product in two splits'."""
    return [
        _check("image_id_missing", "image_id", gxe.ExpectColumnValuesToNotBeNull, "image_id is empty"),
        _check("image_id_duplicate", "image_id", gxe.ExpectColumnValuesToBeUnique, "image_id {value!r} is duplicated"),
        _check("product_unknown", "product_id", gxe.ExpectColumnValuesToBeInSet,
               "product_id {value!r} is not in products.parquet", on="product_known", value_set=[True]),
        _check("path_format", "path", gxe.ExpectColumnValuesToMatchRegex,
               "path {value!r} is not images/<id>.jpg", regex=CLEAN_PATH_REGEX),
        _check("split_value", "split", gxe.ExpectColumnValuesToBeInSet,
               "split {value!r} is not train/val/test", value_set=list(SPLITS)),
        _check("split_matches_product", "split", gxe.ExpectColumnPairValuesToBeEqual,
               "image split differs from its product's split", on=None,
               column_A="split", column_B="product_split", ignore_row_if="either_value_is_missing"),
        _check("label_matches_product", "label", gxe.ExpectColumnPairValuesToBeEqual,
               "image label differs from its product's label", on=None,
               column_A="label", column_B="product_label", ignore_row_if="either_value_is_missing"),
    ]


def _clean_products_view(products_df: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    view = products_df.reset_index(drop=True).copy()
    index_of = {name: i for i, name in enumerate(classes)}
    view["expected_label"] = view["category"].map(index_of).astype("float64")
    view["label"] = pd.to_numeric(view["label"], errors="coerce").astype("float64")
    view["price"] = pd.to_numeric(view["price"], errors="coerce").astype("float64")
    for column in ("product_id", "text", "category", "split", "price_is_outlier"):
        view[column] = view[column].astype(object).where(view[column].notna(), None)
    for column in ("text", "product_id", "category"):
        view[column] = view[column].where(view[column].astype(str).str.strip() != "", None)
    return view


def _clean_images_view(images_df: pd.DataFrame, products_df: pd.DataFrame) -> pd.DataFrame:
    view = images_df.reset_index(drop=True).copy()
    by_product = products_df.drop_duplicates("product_id").set_index("product_id")
    view["product_known"] = view["product_id"].isin(by_product.index).astype(object)
    view["product_split"] = view["product_id"].map(by_product["split"])
    view["product_label"] = pd.to_numeric(view["product_id"].map(by_product["label"]), errors="coerce")
    view["label"] = pd.to_numeric(view["label"], errors="coerce").astype("float64")
    view["product_label"] = view["product_label"].astype("float64")
    for column in ("image_id", "path", "split", "product_split"):
        view[column] = view[column].astype(object).where(view[column].notna(), None)
    return view


def _describe_failures(
    label: str, frame: pd.DataFrame, suite: SuiteResult, checks: Sequence[Check], id_column: str
) -> list[str]:
    """One sentence per failed check: how many rows, which ids, and the first row's reason."""
    by_id = {check.check_id: check for check in checks}
    problems = []
    for check_id, rows in suite.failing_rows.items():
        check = by_id[check_id]
        if rows:
            ids = [frame.loc[row, id_column] for row in rows[:5]]
            first = _reject_record(label, frame.assign(**{SOURCE_ROW: frame.index}), rows[0], check, {}, id_column)
            detail = f"{len(rows)} row(s), e.g. {id_column} {format_examples(ids)}: {first['reason']}"
        else:
            detail = f"{check.reason} (observed {suite.observed.get(check_id)!r})"
        problems.append(f"{label}: check '{check_id}' failed for {detail}")
    return problems
