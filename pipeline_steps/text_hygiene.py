"""Text hygiene: what may be in a raw export's text, and what happens to what may not.

Rules (params.yaml `validation.text`, checked by great-expectations in validation.py):

- control characters (C0/C1 except tab, newline, carriage return, e.g. a run of NUL bytes):
  `control_chars: strip | reject`;
- invalid Unicode (bytes that were not UTF-8, read back as lone surrogates, and U+FFFD
  replacement characters left by an earlier failed decode): `invalid_unicode: strip | reject`;
- zero-width and bidirectional control characters in product names (they hide text or flip
  its direction on screen): `invisible_in_names: strip | reject`;
- maximum length per column: `max_chars: {column: n}`; columns in `truncate` are cut to their
  limit (counted as a warning), any other column over its limit rejects the row.

Ids and prices are never altered: a control character, invalid character or excess length
in them always rejects the row (an id is a join key and a file name; a price is a number).

The functions here are pure (strings and frames in, strings and frames out) so the rules are
tested on their own; validation.py wires them into GX suites, rejects and metrics.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline_steps.errors import ConfigError

# C0 controls except \t \n \r, DEL and the C1 block. (Regex text: GX and pandas compile it.)
CONTROL_REGEX = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
# Lone surrogates (undecodable bytes kept by surrogateescape) and U+FFFD. GX sees U+FFFD only:
# gx_view() replaces surrogates first, because they cannot be written as UTF-8 (Data Docs).
INVALID_REGEX = r"[\ud800-\udfff\ufffd]"
GX_INVALID_REGEX = r"\ufffd"
# Zero-width space/non-joiner, word joiner and invisible operators, BOM; LRM/RLM/ALM, embeddings,
# overrides and isolates. The zero-width joiner only outside an emoji sequence: in one it is
# part of the emoji (a real listing's name holds "👩🏻\u200d🍳", a cook).
_EMOJI = "\U0001F000-\U0001FAFF\u2600-\u27BF"
INVISIBLE_REGEX = (
    r"[\u200b\u200c\u200e\u200f\u2060-\u2064\ufeff\u061c\u202a-\u202e\u2066-\u2069]"
    rf"|(?<![{_EMOJI}\ufe0f])\u200d|\u200d(?![{_EMOJI}])"
)
SURROGATE_RE = re.compile(r"[\ud800-\udfff]")

ACTIONS = ("strip", "reject")
PRODUCT_TEXT_COLUMNS = ("product_name", "product_description", "category", "location")
NEVER_ALTERED = ("id", "product_id", "price")
TEXT_KEYS = ("control_chars", "invalid_unicode", "invisible_in_names", "max_chars", "truncate")  # validation.text
MAX_SHOWN_CHARS = 200  # a reject's value is cut to this (a 200,000-character description helps nobody)


@dataclass(frozen=True)
class TextRules:
    control_chars: str
    invalid_unicode: str
    invisible_in_names: str
    max_chars: dict[str, int]
    truncate: tuple[str, ...]

    def rejects(self, rule: str, column: str) -> bool:
        """Whether a failure of `rule` on `column` rejects the row (else it is fixed and counted)."""
        if rule == "too_long":
            return column not in self.truncate
        if column in NEVER_ALTERED:
            return True
        return getattr(self, rule) == "reject"


def text_rules(params: Mapping[str, Any]) -> TextRules:
    """validation.text, checked (every key required, as in params.yaml); errors name the params.yaml key."""
    for key in TEXT_KEYS:
        if key not in params:
            raise ConfigError(f"params.yaml key 'validation.text.{key}' is missing (every knob has to be in params.yaml)")
    raw = dict(params)
    for key in ("control_chars", "invalid_unicode", "invisible_in_names"):
        if raw[key] not in ACTIONS:
            raise ConfigError(f"params.yaml key 'validation.text.{key}' is {raw[key]!r}; expected one of {', '.join(ACTIONS)}")
    max_chars = raw["max_chars"]
    if not isinstance(max_chars, Mapping):
        raise ConfigError("params.yaml key 'validation.text.max_chars' must map column names to integers")
    limits = {}
    for column, limit in max_chars.items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"params.yaml key 'validation.text.max_chars.{column}' is {limit!r}; expected a positive integer")
        limits[str(column)] = limit
    truncate = raw["truncate"] or []
    if not isinstance(truncate, (list, tuple)):
        raise ConfigError("params.yaml key 'validation.text.truncate' must be a list of column names")
    bad = [c for c in truncate if c in NEVER_ALTERED or c not in limits]
    if bad:
        raise ConfigError(
            f"params.yaml key 'validation.text.truncate' names {bad}: only columns with a max_chars limit, "
            f"and never {', '.join(NEVER_ALTERED)}, can be truncated"
        )
    return TextRules(raw["control_chars"], raw["invalid_unicode"], raw["invisible_in_names"], limits, tuple(truncate))


@dataclass(frozen=True)
class TextRule:
    """One (rule, column) pair: the check id, the GX regex or length limit and a readable reason."""

    rule: str  # control_chars | invalid_unicode | invisible_in_names | too_long
    column: str
    reject: bool
    regex: str | None = None
    max_chars: int | None = None

    @property
    def check_id(self) -> str:
        return f"{self.column}_{self.rule}"

    @property
    def reason(self) -> str:
        fix = "row rejected" if self.reject else ("truncated" if self.rule == "too_long" else "stripped")
        key = {"too_long": f"validation.text.max_chars.{self.column}"}.get(self.rule, f"validation.text.{self.rule}")
        what = {
            "control_chars": "holds control characters (e.g. NUL)",
            "invalid_unicode": "holds invalid Unicode (undecodable bytes or U+FFFD)",
            "invisible_in_names": "holds zero-width or bidirectional control characters",
            "too_long": f"is longer than {self.max_chars or 0:,} characters",
        }[self.rule]
        return f"{self.column} {what}: {fix} ({key})"


def rules_for(columns: Sequence[str], rules: TextRules) -> list[TextRule]:
    """Every (rule, column) check for the columns a file has, in the order their reasons win."""
    out: list[TextRule] = []
    for column in columns:
        out.append(TextRule("invalid_unicode", column, rules.rejects("invalid_unicode", column), regex=GX_INVALID_REGEX))
        out.append(TextRule("control_chars", column, rules.rejects("control_chars", column), regex=CONTROL_REGEX))
        if column == "product_name":
            out.append(TextRule("invisible_in_names", column, rules.rejects("invisible_in_names", column),
                                regex=INVISIBLE_REGEX))
        limit = rules.max_chars.get("id" if column == "product_id" else column)
        if limit is not None:
            out.append(TextRule("too_long", column, rules.rejects("too_long", column), max_chars=limit))
    return out


def replace_surrogates(value: Any) -> Any:
    """Lone surrogates -> U+FFFD: anything written as UTF-8 (HTML, CSV, Parquet) needs this."""
    if isinstance(value, str) and SURROGATE_RE.search(value):
        return SURROGATE_RE.sub("\ufffd", value)
    return value


def gx_view(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The frame GX checks: blank -> None (not-null checks see it), surrogates -> U+FFFD."""
    view = pd.DataFrame(index=frame.index)
    for column in columns:
        values = frame[column].astype(object).map(replace_surrogates)
        view[column] = values.where(values.astype(str).str.strip() != "", None)
    return view


def fix_value(value: str, rule: TextRule) -> str:
    """The value after a non-rejecting rule: characters stripped or text cut."""
    if rule.rule == "too_long":
        return value[: rule.max_chars]
    pattern = {"control_chars": CONTROL_REGEX, "invalid_unicode": INVALID_REGEX,
               "invisible_in_names": INVISIBLE_REGEX}[rule.rule]
    return re.sub(pattern, "", value)


def apply_fixes(frame: pd.DataFrame, rules: Sequence[TextRule], skip: Sequence[Any] = ()) -> tuple[pd.DataFrame, dict[str, int]]:
    """Apply every non-rejecting rule to the rows not in `skip`; count changed values per check id.

    Rows in `skip` (already rejected) only get their surrogates replaced, so no output
    (rejects.csv, Data Docs) ever holds a character UTF-8 cannot encode.
    """
    out = frame.copy()
    counts: dict[str, int] = {}
    skipped = out.index.isin(list(skip))
    for rule in rules:
        if rule.reject or rule.column not in out.columns:
            continue
        column = out[rule.column].astype(object)
        if rule.rule == "too_long":
            hit = column.map(lambda v: isinstance(v, str) and len(v) > rule.max_chars)
        else:
            pattern = {"control_chars": CONTROL_REGEX, "invalid_unicode": INVALID_REGEX,
                       "invisible_in_names": INVISIBLE_REGEX}[rule.rule]
            hit = column.map(lambda v, p=re.compile(pattern): isinstance(v, str) and bool(p.search(v)))
        hit = hit.astype(bool) & ~skipped
        if hit.any():
            out.loc[hit, rule.column] = column[hit].map(lambda v, r=rule: fix_value(v, r))
            counts[rule.check_id] = int(hit.sum())
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(replace_surrogates)
    return out, counts


def shown_value(value: Any, cut: bool = True) -> Any:
    """A reject's value as a human reads it: control characters escaped, surrogates replaced, cut short."""
    if not isinstance(value, str):
        return value
    text = replace_surrogates(value)
    text = re.sub(CONTROL_REGEX, lambda m: f"\\x{ord(m.group()):02x}", text)
    if cut and len(text) > MAX_SHOWN_CHARS:
        text = f"{text[:MAX_SHOWN_CHARS]}… ({len(value):,} characters)"
    return text


def find_violations(text: str, max_chars: int | None = None) -> list[str]:
    """Which hygiene rules a clean string breaks (used by tests and the clean-table check)."""
    problems = []
    if re.search(CONTROL_REGEX, text):
        problems.append("control_chars")
    if re.search(INVALID_REGEX, text):
        problems.append("invalid_unicode")
    if max_chars is not None and len(text) > max_chars:
        problems.append("too_long")
    return problems


@dataclass
class HygieneOutcome:
    """Rows rejected by hygiene (row label -> check id) and the fixes applied per check id."""

    frame: pd.DataFrame
    rejected: dict[Any, str] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)
