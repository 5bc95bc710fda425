"""Amazon review/metadata files read line by line: JSON or Python-literal records, gzip or plain, every bad
line counted with its number (``ParseReport``). No Dagster."""

from __future__ import annotations

import ast
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from animind_assets.lib.data.sources import SourceError

FORMATS = ("auto", "json", "python")
MAX_BAD_EXAMPLES = 20



# ------------------------------------------------------------------------------------- line parsing
@dataclass
class ParseReport:
    """What happened to every line of one file: parsed, blank, or bad (with line numbers)."""

    path: str
    lines: int = 0
    parsed: int = 0
    blank: int = 0
    bad: int = 0
    json_lines: int = 0
    python_lines: int = 0
    bad_examples: list[tuple[int, str]] = field(default_factory=list)  # (1-based line, reason)
    # decoding problems in lines that were still parsed: "invalid_utf8" (bytes replaced by U+FFFD),
    # "replacement_character" (U+FFFD already in the file) -> count, with the first line numbers
    decode_issues: dict[str, int] = field(default_factory=dict)
    decode_examples: dict[str, list[int]] = field(default_factory=dict)

    def add_bad(self, lineno: int, reason: str) -> None:
        self.bad += 1
        if len(self.bad_examples) < MAX_BAD_EXAMPLES:
            self.bad_examples.append((lineno, reason[:200]))

    def add_decode_issue(self, lineno: int, kind: str) -> None:
        self.decode_issues[kind] = self.decode_issues.get(kind, 0) + 1
        ex = self.decode_examples.setdefault(kind, [])
        if len(ex) < MAX_BAD_EXAMPLES:
            ex.append(lineno)

    def summary(self) -> str:
        text = (
            f"{self.path}: {self.lines} lines, {self.parsed} parsed "
            f"({self.json_lines} JSON, {self.python_lines} Python literal), {self.blank} blank, {self.bad} bad"
        )
        if self.bad_examples:
            text += "; bad lines: " + ", ".join(f"{n} ({r})" for n, r in self.bad_examples[:5])
        for kind, n in sorted(self.decode_issues.items()):
            text += f"; {kind} {n} (lines {', '.join(map(str, self.decode_examples.get(kind, [])[:5]))})"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "lines": self.lines,
            "parsed": self.parsed,
            "blank": self.blank,
            "bad": self.bad,
            "json_lines": self.json_lines,
            "python_lines": self.python_lines,
            "bad_examples": [list(x) for x in self.bad_examples],
            "decode_issues": dict(self.decode_issues),
            "decode_examples": {k: list(v) for k, v in self.decode_examples.items()},
        }


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _checked_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"Amazon file not found: {p.resolve()}")
    if not p.is_file():
        raise SourceError(f"Amazon path is not a file: {p.resolve()}")
    return p


def open_binary(path: str | os.PathLike) -> Any:
    """Open a file for reading bytes, transparently gunzipping it (by magic bytes, not by suffix)."""
    p = _checked_path(path)
    return gzip.open(p, "rb") if _is_gzip(p) else open(p, "rb")


def open_text(path: str | os.PathLike) -> Any:
    """Open a text file (UTF-8, strict: undecodable bytes raise ``UnicodeDecodeError``), transparently
    gunzipping it (by magic bytes, not by suffix)."""
    p = _checked_path(path)
    if _is_gzip(p):
        return gzip.open(p, "rt", encoding="utf-8")
    return open(p, encoding="utf-8")


_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error, OSError)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[Any, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"duplicate key {k!r}")
        out[k] = v
    return out


def _literal_dict(line: str) -> Any:
    """``ast.literal_eval`` of one line, refusing dict literals that repeat a key."""
    tree = ast.parse(line, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
            if dup is not None:
                raise _DuplicateKey(f"duplicate key {dup!r}")
    return ast.literal_eval(tree)


def parse_record(line: str, fmt: str = "auto") -> tuple[dict, str]:
    """One line -> (dict, "json" | "python"). Raises ``ValueError`` on anything that is not a dict.

    Python literals are parsed with ``ast.literal_eval`` (literals only: no names, calls or attribute
    access can run).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}; expected one of {FORMATS}")
    errors = []
    if fmt in ("auto", "json"):
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            if isinstance(obj, dict):
                return obj, "json"
            errors.append(f"JSON value is {type(obj).__name__}, not an object")
        except _DuplicateKey as exc:
            raise ValueError(f"JSON: {exc}") from None  # valid JSON with a repeated key: never guess which wins
        except json.JSONDecodeError as exc:
            errors.append(f"JSON: {exc.msg}")
        except (RecursionError, MemoryError) as exc:  # nesting too deep for the parser
            errors.append(f"JSON: {type(exc).__name__} (nesting too deep or value too large)")
    if fmt in ("auto", "python"):
        try:
            obj = _literal_dict(line)
            if isinstance(obj, dict):
                return obj, "python"
            errors.append(f"Python literal is {type(obj).__name__}, not a dict")
        except _DuplicateKey as exc:
            errors.append(f"Python literal: {exc}")
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            errors.append(f"Python literal: {type(exc).__name__}: {str(exc)[:80]}")
    raise ValueError("; ".join(errors) or "unparseable")


def iter_records(path: str | os.PathLike, fmt: str = "auto", report: ParseReport | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for every parseable line; bad lines go to ``report``."""
    report = report if report is not None else ParseReport(str(path))
    lineno = 0
    with open_binary(path) as fh:
        lines = iter(fh)
        while True:
            try:
                raw_bytes = next(lines)
            except StopIteration:
                break
            except _GZIP_ERRORS as exc:
                raise SourceError(f"{path}: corrupt or truncated after line {lineno} ({type(exc).__name__}: {exc})") from exc
            lineno += 1
            report.lines += 1
            try:
                raw = raw_bytes.decode("utf-8")
                if "\ufffd" in raw:
                    report.add_decode_issue(lineno, "replacement_character")
            except UnicodeDecodeError:
                raw = raw_bytes.decode("utf-8", errors="replace")
                report.add_decode_issue(lineno, "invalid_utf8")
            line = raw.strip()
            if not line:
                report.blank += 1
                continue
            try:
                rec, kind = parse_record(line, fmt)
            except (ValueError, RecursionError, MemoryError) as exc:
                report.add_bad(lineno, str(exc) or type(exc).__name__)
                continue
            report.parsed += 1
            if kind == "json":
                report.json_lines += 1
            else:
                report.python_lines += 1
            yield lineno, rec


def read_records(path: str | os.PathLike, fmt: str = "auto") -> tuple[list[tuple[int, dict]], ParseReport]:
    report = ParseReport(str(path))
    records = list(iter_records(path, fmt, report))
    return records, report


