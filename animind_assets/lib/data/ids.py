"""The one exact integer/id parser of every source adapter (catalog ids, synopsis join, known-id set,
interactions, Amazon files) -- ids never pass through float64.

Accepted (-> Python ``int`` / polars ``Int64``), for any value that denotes an integer exactly:

* ``int`` (not ``bool``), ``decimal.Decimal`` with an integral value, ``float`` with an integral value
  (a float *given* by the source, e.g. an SQLite ``REAL`` 1.0; its value is converted exactly);
* text after stripping surrounding whitespace, matching ``[+-]?digits[.digits][e|E[+-]digits]``:
  ``"1"``, ``" 5"``, ``"+7"``, ``"-3"``, ``"1.0"``, ``"12.000"``, ``"1e3"``, ``"1.0e+15"`` (SQLite's
  ``CAST(real AS TEXT)`` spelling). Scientific notation is evaluated exactly with ``decimal`` (never
  float), so ``"1e3"`` is 1000 and ``"1.5e1"`` is 15.

Everything else returns ``None`` plus a reason (one of ``PROBLEMS``):

* ``missing``: ``None`` or empty / whitespace-only text;
* ``not_finite``: ``nan``, ``inf``, ``-Infinity`` (any case) or a non-finite float/Decimal;
* ``not_integral``: a number with a fractional part (``"2.5"``, ``2.5``, ``"1e-3"``);
* ``out_of_range``: an integer outside signed 64-bit (``"1e20"``, ``"9223372036854775808"``);
* ``not_a_number``: anything else (``"abc"``, ``"1,000"``, ``"0x10"``, ``"1_000"``, ``True``, longer
  than ``MAX_TEXT_LEN`` characters).

``parse_ids`` is the vectorised form over a polars Series (plain integer text takes a polars fast path;
every other distinct value goes through ``parse_id`` once).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

import polars as pl

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_TEXT_LEN = 64
PROBLEMS = ("missing", "not_a_number", "not_finite", "not_integral", "out_of_range")

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_PLAIN_INT = r"^[+-]?\d{1,18}$"  # always inside int64: safe for polars' own cast
_MAX_EXPONENT = 40  # |exponent| beyond this is out of range (or not integral) without computing


def _from_decimal(d: Decimal) -> tuple[int | None, str | None]:
    if not d.is_finite():
        return None, "not_finite"
    sign, digits, exponent = d.as_tuple()
    if not digits or all(x == 0 for x in digits):
        return 0, None
    # magnitude ~ 10**(len(digits) + exponent): decide huge/tiny values without materialising them
    magnitude = len(digits) + int(exponent)
    if magnitude > 20:
        return None, "out_of_range"
    if magnitude < -_MAX_EXPONENT:
        return None, "not_integral"
    if d != d.to_integral_value():
        return None, "not_integral"
    value = int(d)
    if not INT64_MIN <= value <= INT64_MAX:
        return None, "out_of_range"
    return value, None


def parse_id(value: object) -> tuple[int | None, str | None]:
    """``(int, None)`` for a value that is exactly an int64, else ``(None, reason)`` (see ``PROBLEMS``).

    Never raises: any input type is accepted and classified.
    """
    if value is None:
        return None, "missing"
    if isinstance(value, bool):
        return None, "not_a_number"
    if isinstance(value, int):
        return (value, None) if INT64_MIN <= value <= INT64_MAX else (None, "out_of_range")
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, "not_finite"
        if not value.is_integer():
            return None, "not_integral"
        return _from_decimal(Decimal(value))  # exact: Decimal(float) keeps the float's exact value
    if isinstance(value, Decimal):
        return _from_decimal(value)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "not_a_number"
    text = str(value).strip()
    if not text:
        return None, "missing"
    if len(text) > MAX_TEXT_LEN:
        return None, "not_a_number"
    if _NON_FINITE.fullmatch(text):
        return None, "not_finite"
    if not _NUMBER.fullmatch(text):
        return None, "not_a_number"
    try:
        d = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid literals
        return None, "not_a_number"
    return _from_decimal(d)


def parse_ids(series: pl.Series) -> tuple[pl.Series, pl.Series]:
    """Vectorised ``parse_id``: ``(values Int64, problems Utf8)``, both as long as ``series``.

    ``problems`` is null where the value parsed and one of ``PROBLEMS`` elsewhere. Integer dtypes pass
    through (UInt64 above int64 -> ``out_of_range``); float dtypes are judged value by value (exact);
    anything else is read as text.
    """
    name = series.name
    if series.dtype in (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32):
        values = series.cast(pl.Int64)
        problems = pl.select(pl.when(values.is_null()).then(pl.lit("missing")).otherwise(pl.lit(None, dtype=pl.Utf8))).to_series()
        return values.alias(name), problems.alias(f"{name}_problem")
    if series.dtype == pl.Null:
        series = series.cast(pl.Utf8)
    if series.dtype != pl.Utf8:
        pairs = [parse_id(v) for v in series.to_list()]
        return (
            pl.Series(name, [p[0] for p in pairs], dtype=pl.Int64),
            pl.Series(f"{name}_problem", [p[1] for p in pairs], dtype=pl.Utf8),
        )
    stripped = series.str.strip_chars()
    is_plain = stripped.str.contains(_PLAIN_INT).fill_null(False)
    fast = pl.select(pl.when(is_plain).then(stripped).otherwise(None).cast(pl.Int64)).to_series()
    rest = series.filter(~is_plain & series.is_not_null()).unique().to_list()
    lookup = {v: parse_id(v) for v in rest}
    keys = list(lookup)
    slow_vals = series.replace_strict(keys, [lookup[k][0] for k in keys], default=None, return_dtype=pl.Int64)
    slow_probs = series.replace_strict(keys, [lookup[k][1] for k in keys], default=None, return_dtype=pl.Utf8)
    values = pl.select(pl.when(is_plain).then(fast).otherwise(slow_vals)).to_series()
    problems = pl.select(
        pl.when(is_plain).then(pl.lit(None, dtype=pl.Utf8)).when(series.is_null()).then(pl.lit("missing")).otherwise(slow_probs)
    ).to_series()
    return values.alias(name), problems.alias(f"{name}_problem")


def id_set(series: pl.Series) -> set[int]:
    """The set of the values of ``series`` that parse as ids (invalid values left out)."""
    values, _ = parse_ids(series)
    return set(values.drop_nulls().to_list())
