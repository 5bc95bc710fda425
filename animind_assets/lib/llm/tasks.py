"""Task-A (semantic ID <-> item metadata linking) and task-C (preference reasoning) example builders for
``llm_prep_dataset`` (LC-Rec-style alignment tasks, Zheng et al., ICDE 2024). No Dagster."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


# ------------------------------------------------------------------------------------------ task A
def _fmt_list(values: Sequence[str] | None, limit: int = 6) -> str | None:
    vals = [v for v in (values or []) if v]
    return ", ".join(vals[:limit]) if vals else None


def _first(values: Sequence[str] | None) -> str | None:
    vals = [v for v in (values or []) if v]
    return vals[0] if vals else None


def _clip(text: str | None, n: int) -> str | None:
    if not text:
        return None
    text = " ".join(str(text).split())
    if len(text) <= n:
        return text
    cut = text[:n].rsplit(" ", 1)[0]
    return cut + " ..."


def a_examples_for(row: dict, templates: Sequence[str], synopsis_chars: int, rng: np.random.Generator) -> tuple[list[tuple[str, str, str]], Counter]:
    """(template, prompt, completion) for one anime; templates whose field is missing are skipped
    (counted by ``template:missing_field``)."""
    sid = row["semantic_id"]
    title = row.get("title") or row.get("name")
    name = row.get("name")
    # alternate between the display title and the original name for the title->SID direction
    query_title = title if not name or name == title or rng.random() < 0.6 else name
    year = row.get("year")
    studio = _first(row.get("studios"))
    genres = _fmt_list(row.get("genres"))
    themes = _fmt_list(row.get("themes")) if isinstance(row.get("themes"), list) else None
    synopsis = _clip(row.get("synopsis"), synopsis_chars)
    out: list[tuple[str, str, str]] = []
    skipped: Counter = Counter()
    for t in templates:
        if t == "sid_to_title":
            out.append((t, f"What is the title of the anime {sid}?", title))
        elif t == "title_to_sid":
            out.append((t, f'What is the semantic ID of the anime "{query_title}"?', sid))
        elif t == "sid_to_genres":
            if genres:
                out.append((t, f"Which genres does the anime {sid} have?", genres))
            else:
                skipped[f"{t}:genres"] += 1
        elif t == "title_studio_to_sid":
            if studio:
                out.append((t, f'Give the semantic ID of "{query_title}" by studio {studio}.', sid))
            else:
                skipped[f"{t}:studios"] += 1
        elif t == "sid_to_year":
            if year is not None:
                out.append((t, f"In which year did the anime {sid} premiere?", str(int(year))))
            else:
                skipped[f"{t}:year"] += 1
        elif t == "title_year_to_sid":
            if year is not None:
                out.append((t, f'Give the semantic ID of "{query_title}" ({int(year)}).', sid))
            else:
                skipped[f"{t}:year"] += 1
        elif t == "sid_to_synopsis":
            if synopsis:
                out.append((t, f"Summarize the story of the anime {sid}.", synopsis))
            else:
                skipped[f"{t}:synopsis"] += 1
        elif t == "sid_to_type":
            if row.get("type"):
                out.append((t, f"What type of release is the anime {sid} (TV, Movie, OVA, ...)?", str(row["type"])))
            else:
                skipped[f"{t}:type"] += 1
        elif t == "sid_to_studio":
            if studio:
                out.append((t, f"Which studio made the anime {sid}?", _fmt_list(row.get("studios"), 3)))
            else:
                skipped[f"{t}:studios"] += 1
        elif t == "sid_to_source":
            if row.get("source"):
                out.append((t, f"What is the anime {sid} adapted from?", str(row["source"])))
            else:
                skipped[f"{t}:source"] += 1
        elif t == "sid_to_themes":
            if themes:
                out.append((t, f"Which themes does the anime {sid} have?", themes))
            else:
                skipped[f"{t}:themes"] += 1
    return out, skipped


# ------------------------------------------------------------------------------------------ task C
def overlap_summary(rows: Sequence[dict]) -> str:
    """Deterministic reasoning text from the overlaps of several anime's metadata."""
    n = len(rows)
    genre_c = Counter(g for r in rows for g in set(r.get("genres") or []))
    studio_c = Counter(s for r in rows for s in set(r.get("studios") or []))
    era_c = Counter(e for r in rows if (e := era_of(r.get("year"))))
    type_c = Counter(r["type"] for r in rows if r.get("type"))

    def top(counter: Counter, k: int, min_count: int) -> list[tuple[str, int]]:
        return [(v, c) for v, c in sorted(counter.items(), key=lambda x: (-x[1], x[0]))[:k] if c >= min_count]

    parts = []
    g = top(genre_c, 3, 2)
    parts.append(
        "Shared genres: " + ", ".join(f"{v} ({c}/{n})" for v, c in g) if g else "No genre is shared by two or more of them"
    )
    s = top(studio_c, 2, 2)
    if s:
        parts.append("studios in common: " + ", ".join(f"{v} ({c}/{n})" for v, c in s))
    e = top(era_c, 1, 1)
    if e:
        parts.append(f"mostly from the {e[0][0]} ({e[0][1]}/{n})")
    t = top(type_c, 1, 1)
    if t:
        parts.append(f"mostly {t[0][0]} ({t[0][1]}/{n})")
    return "; ".join(parts) + "."


def _overlap_score(a: dict, profile: dict[str, Counter]) -> float:
    s = sum(profile["genres"][g] for g in set(a.get("genres") or []))
    s += 2 * sum(profile["studios"][x] for x in set(a.get("studios") or []))
    if (e := era_of(a.get("year"))) is not None:
        s += profile["era"][e]
    if a.get("type"):
        s += profile["type"][a["type"]]
    return float(s)


def c_example(liked: Sequence[dict], pick: dict | None, show_titles: bool) -> tuple[str, str, str]:
    def fmt(r: dict) -> str:
        return f"{r['semantic_id']} ({r['title']})" if show_titles else r["semantic_id"]

    listing = ", ".join(fmt(r) for r in liked)
    reason = overlap_summary(liked)
    if pick is None:
        prompt = f"A user liked these anime: {listing}. What do they have in common?"
        return "c_profile", prompt, reason
    prompt = (
        f"A user liked these anime: {listing}. Explain what they have in common, "
        f"then name one more anime they liked."
    )
    return "c_recommend", prompt, f"{reason} They also liked {pick['semantic_id']}"

def era_of(year: int | None) -> str | None:
    if year is None:
        return None
    return f"{(int(year) // 10) * 10}s"
