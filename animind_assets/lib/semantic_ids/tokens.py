"""The one owner of the semantic-ID token format (``<L1_47><L2_203><L3_9><L4_0>``).

Format: a semantic ID is a run of *level tokens* ``<L{level}_{code}>`` concatenated without a
separator; ``level`` is 1-based (the quantizer's first level is ``L1``; the TIGER disambiguation
level, when present, is the last one), ``code`` a non-negative integer index into that level's
codebook. The item markers and sentiment tokens that surround IDs in prompts
(``<anime_start>{SID}<anime_end><liked>``) are the *special tokens* listed here too; no special
token may look like a level token.

Every module that writes, lists or parses these strings (semantic-ID assignment, the SentencePiece
tokenizer, LLM data / fine-tune / inference, assets) imports this module instead of its own regex.

This module never imports Dagster.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# --------------------------------------------------------------------------- special tokens
ANIME_START = "<anime_start>"
ANIME_END = "<anime_end>"
WATCH = "<watch>"
LIKED = "<liked>"
DISLIKED = "<disliked>"
DROPPED = "<dropped>"
SPECIAL_TOKENS: tuple[str, ...] = (ANIME_START, ANIME_END, WATCH, LIKED, DISLIKED, DROPPED)
"""Item markers and sentiment tokens, in vocabulary order (added to tokenizers as atomic tokens)."""

# --------------------------------------------------------------------------- level tokens
LEVEL_TOKEN_PATTERN = r"<L(\d+)_(\d+)>"
"""One level token; groups: (level, code) as decimal strings."""
SID_PATTERN = r"(?:<L\d+_\d+>)+"
"""A whole semantic ID (one or more level tokens), no groups; usable in polars ``str.extract_all``."""
LEVEL_TOKEN_RE = re.compile(LEVEL_TOKEN_PATTERN)
SID_RE = re.compile(SID_PATTERN)
_LEADING_SID_RE = re.compile(r"\s*(" + SID_PATTERN + ")")


def level_token(level: int, code: int) -> str:
    """``<L{level}_{code}>`` for a 1-based ``level`` and a code >= 0. Raises ValueError otherwise."""
    level, code = int(level), int(code)
    if level < 1 or code < 0:
        raise ValueError(f"level must be >= 1 and code >= 0, got level {level} code {code}")
    return f"<L{level}_{code}>"


def level_tokens(codes_row: Sequence[int]) -> list[str]:
    """Level tokens of one item's code row (position 0 = level 1)."""
    return [level_token(lv + 1, c) for lv, c in enumerate(codes_row)]


def sid_string(codes_row: Sequence[int], separator: str = "") -> str:
    """The semantic-ID string of one code row, e.g. ``[47, 203, 9, 0]`` -> ``<L1_47><L2_203><L3_9><L4_0>``."""
    return separator.join(level_tokens(codes_row))


def is_level_token(token: str) -> bool:
    return LEVEL_TOKEN_RE.fullmatch(token) is not None


def parse_level_token(token: str) -> tuple[int, int]:
    """(level, code) of one level token; ValueError when ``token`` is not exactly one."""
    m = LEVEL_TOKEN_RE.fullmatch(token)
    if m is None:
        raise ValueError(f"not a level token <L{{level}}_{{code}}>: {token!r}")
    return int(m.group(1)), int(m.group(2))


def split_sid(semantic_id: str) -> list[str]:
    """The level tokens of one semantic ID, in order. ValueError when the string is not exactly a
    run of level tokens (no separators, no other text)."""
    toks = [m.group(0) for m in LEVEL_TOKEN_RE.finditer(semantic_id)]
    if not toks or "".join(toks) != semantic_id:
        raise ValueError(f"not a semantic ID made of <L{{level}}_{{code}}> tokens: {semantic_id!r}")
    return toks


def parse_sid(semantic_id: str) -> list[tuple[int, int]]:
    """[(level, code), ...] of one semantic ID (strict, see ``split_sid``)."""
    return [parse_level_token(t) for t in split_sid(semantic_id)]


def sid_codes(semantic_id: str) -> list[int]:
    """The codes of one semantic ID, level by level (strict)."""
    return [c for _, c in parse_sid(semantic_id)]


def find_level_tokens(text: str) -> list[tuple[int, int]]:
    """(level, code) of every level token anywhere in ``text`` (lenient: other text is ignored)."""
    return [(int(a), int(b)) for a, b in LEVEL_TOKEN_RE.findall(text)]


def find_sids(text: str) -> list[str]:
    """Every maximal run of level tokens in ``text`` (the semantic IDs it mentions)."""
    return SID_RE.findall(text)


def leading_sid(text: str) -> str:
    """The run of level tokens at the start of ``text`` (leading whitespace allowed), or ``""``:
    how a generated answer is read back as an ID."""
    m = _LEADING_SID_RE.match(text)
    return m.group(1) if m else ""


def sid_tokens_used(semantic_ids: Iterable[str]) -> list[str]:
    """Distinct level tokens appearing in the given strings, sorted by (level, code)."""
    found: set[tuple[int, int]] = set()
    for sid in semantic_ids:
        found.update(find_level_tokens(sid))
    return [level_token(lv, c) for lv, c in sorted(found)]


def level_vocab(sizes: Sequence[int]) -> list[str]:
    """Every level token for codes ``0..sizes[l]-1`` at each level, level by level."""
    return [level_token(lv + 1, c) for lv, size in enumerate(sizes) for c in range(int(size))]


def level_vocab_from_codes(codes: Iterable[Sequence[int]]) -> list[str]:
    """``level_vocab`` with each level's size = 1 + the largest code seen at that level."""
    maxima: list[int] = []
    for row in codes:
        for lv, c in enumerate(row):
            if lv >= len(maxima):
                maxima.append(-1)
            maxima[lv] = max(maxima[lv], int(c))
    return level_vocab([m + 1 for m in maxima])


def check_special_tokens(tokens: Iterable[str]) -> list[str]:
    """Stripped, deduplicated (order kept) special tokens; ValueError when one looks like a level token."""
    specials = list(dict.fromkeys(t.strip() for t in tokens if t and t.strip()))
    clash = [t for t in specials if LEVEL_TOKEN_RE.search(t) or (t.startswith("<L") and "_" in t)]
    if clash:
        raise ValueError(f"special tokens must not look like level tokens: {clash}")
    return specials
