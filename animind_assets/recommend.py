"""Recommend anime from a watch history with the latest ``finetuned_model``.

    python -m animind_assets.recommend --history "Cowboy Bebop" "Trigun" -k 10
    python -m animind_assets.recommend --history "Cowboy Bebop" --model-dir data/artifacts/finetuned_model --json

Loads ``<artifacts>/finetuned_model`` (``$ANIMIND_DATA_DIR/artifacts`` or ``data/artifacts``; or
``--model-dir`` / ``--artifacts``) with its semantic-ID lookup (``sid_lookup.parquet`` in the folder;
the DuckDB tables ``semantic_ids`` + ``anime_prep`` when it is missing or ``--duckdb`` is given),
matches the titles (display title, original name or English name, case-insensitive), and ranks
anime by beam search constrained to the trie of valid semantic IDs: only real anime come out, and
the history itself is excluded. Unknown titles exit with status 2 and the closest matches.

Python: ``from animind_assets.recommend import recommend; recommend(["Cowboy Bebop"], k=10)``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from animind_assets.lib.semantic_ids.tokens import DISLIKED, DROPPED, LIKED, WATCH

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SENTIMENTS = {"liked": LIKED, "watch": WATCH, "disliked": DISLIKED, "dropped": DROPPED}
_CACHE: dict[str, object] = {}


class UnknownTitleError(ValueError):
    """One or more history titles are not in the model's catalog; ``suggestions`` maps each to close matches."""

    def __init__(self, suggestions: dict[str, list[str]], not_in_model: dict[str, str] | None = None) -> None:
        self.suggestions = suggestions
        self.not_in_model = not_in_model or {}
        lines = []
        for q, close in suggestions.items():
            hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else " No close match found."
            lines.append(f"Unknown title {q!r}.{hint}")
        for q, why in self.not_in_model.items():
            lines.append(f"Title {q!r} is known but {why}.")
        super().__init__("\n".join(lines))


def default_data_dir() -> Path:
    return Path(os.environ.get("ANIMIND_DATA_DIR", PROJECT_ROOT / "data")).resolve()


def default_model_dir(artifacts: str | os.PathLike | None = None) -> Path:
    root = Path(artifacts) if artifacts else default_data_dir() / "artifacts"
    return root / "finetuned_model"


def normalize_title(s: str) -> str:
    s = unicodedata.normalize("NFKD", str(s)).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", " ", s.casefold()).strip()


def lookup_from_duckdb(database: str | os.PathLike):
    """anime_id, semantic_id, title, name, english_name from the DuckDB tables (schema main or animind)."""
    import duckdb

    con = duckdb.connect(str(database), read_only=True)
    try:
        for schema in ("main", "animind"):
            try:
                return con.execute(
                    f'select s.anime_id, s.semantic_id, coalesce(a.english_name, a.name) as title, a.name, a.english_name '
                    f'from "{schema}"."semantic_ids" s join "{schema}"."anime_prep" a using (anime_id) order by s.anime_id'
                ).pl()
            except duckdb.CatalogException:
                continue
    finally:
        con.close()
    raise FileNotFoundError(f"{database} has no semantic_ids/anime_prep tables (schemas main, animind)")


class TitleIndex:
    """Title -> anime_id over display titles, original names and English names."""

    def __init__(self, lookup) -> None:
        self.by_norm: dict[str, int] = {}
        self.display: dict[str, str] = {}
        cols = [c for c in ("title", "name", "english_name") if c in lookup.columns]
        for row in lookup.select(["anime_id", *cols]).iter_rows(named=True):
            for c in cols:
                v = row.get(c)
                if v:
                    key = normalize_title(v)
                    if key and key not in self.by_norm:
                        self.by_norm[key] = int(row["anime_id"])
                        self.display[key] = v

    def find(self, query: str) -> int | None:
        return self.by_norm.get(normalize_title(query))

    def close_matches(self, query: str, n: int = 5) -> list[str]:
        q = normalize_title(query)
        keys = difflib.get_close_matches(q, list(self.by_norm), n=n, cutoff=0.6)
        if len(keys) < n and q:
            extra = sorted((k for k in self.by_norm if q in k and k not in keys), key=len)[: n - len(keys)]
            keys += extra
        return [self.display[k] for k in keys]


def load(model_dir: str | os.PathLike | None = None, artifacts: str | os.PathLike | None = None, duckdb_path: str | None = None, num_threads: int = 2):
    """(SidModel, TitleIndex) for the model folder, cached per folder."""
    from animind_assets.lib.llm.infer import load_sid_model, make_sid_model

    folder = Path(model_dir) if model_dir else default_model_dir(artifacts)
    key = f"{folder.resolve()}|{duckdb_path or ''}"
    if key in _CACHE:
        return _CACHE[key]
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"no finetuned model at {folder}: materialize the finetuned_model asset (or pass --model-dir)"
        )
    sm = load_sid_model(folder, num_threads=num_threads)
    if duckdb_path:
        import polars as pl

        lk = lookup_from_duckdb(duckdb_path)
        known = set(sm.sid_ids)
        lk = lk.filter(pl.col("anime_id").is_in(list(known)) & pl.col("semantic_id").is_in(list(sm.by_sid)))
        sm = make_sid_model(sm.model, sm.tokenizer, lk, sm.info)
    out = (sm, TitleIndex(sm.lookup))
    _CACHE[key] = out
    return out


def resolve_history(titles: Sequence[str], index: TitleIndex) -> list[int]:
    ids, unknown = [], {}
    for t in titles:
        aid = index.find(t)
        if aid is None:
            unknown[t] = index.close_matches(t)
        else:
            ids.append(aid)
    if unknown:
        raise UnknownTitleError(unknown)
    return ids


def recommend(
    history: Sequence[str],
    k: int = 10,
    model_dir: str | os.PathLike | None = None,
    artifacts: str | os.PathLike | None = None,
    duckdb_path: str | None = None,
    sentiment: str = "liked",
    num_beams: int = 0,
    num_threads: int = 2,
    notes: list[str] | None = None,
) -> list[dict]:
    """Top-``k`` anime for a list of watched titles: dicts with rank, anime_id, title, semantic_id, score.

    Requests are bounded first (``lib.llm.infer.plan_recommendation``): ``k`` and the beams are capped at
    the catalog size (and the beams at a KV-cache budget), and a history longer than the model context
    keeps its most recent items; each adjustment is appended to ``notes`` when given (the CLI prints
    them to stderr as ``note: ...``)."""
    from animind_assets.lib.llm.infer import plan_recommendation, rank_items

    if not history:
        raise ValueError("history is empty: give at least one anime title")
    if sentiment not in SENTIMENTS:
        raise ValueError(f"sentiment must be one of {sorted(SENTIMENTS)}, got {sentiment!r}")
    sm, index = load(model_dir, artifacts, duckdb_path, num_threads)
    ids = resolve_history(history, index)
    plan = plan_recommendation(sm, ids, [SENTIMENTS[sentiment]] * len(ids), k=k, num_beams=num_beams)
    if notes is not None:
        notes.extend(plan.notes)
    # the whole history stays excluded (also the oldest items left out of the prompt)
    out = rank_items(sm, [plan.prompt], k=plan.k, num_beams=plan.num_beams, exclude=[set(ids)],
                     prefixes=[plan.prefix] if plan.prefix else None)
    return [
        {"rank": i + 1, "anime_id": aid, "title": sm.titles.get(aid, str(aid)), "semantic_id": sm.sids[aid], "score": score}
        for i, (aid, score) in enumerate(out.items[0])
    ]


def format_table(history: Sequence[str], rows: list[dict]) -> str:
    width = max([len(r["title"]) for r in rows] + [5])
    width = min(width, 60)
    lines = [f"Recommendations for: {', '.join(history)}", f"{'rank':>4}  {'title':<{width}}  {'semantic ID':<34}  score"]
    for r in rows:
        title = r["title"] if len(r["title"]) <= width else r["title"][: width - 1] + "…"
        lines.append(f"{r['rank']:>4}  {title:<{width}}  {r['semantic_id']:<34}  {r['score']:.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m animind_assets.recommend", description="Recommend anime with the fine-tuned semantic-ID model.")
    ap.add_argument("--history", nargs="+", required=True, help="titles the user watched (and liked)")
    ap.add_argument("-k", type=int, default=10, help="number of recommendations")
    ap.add_argument("--model-dir", default=None, help="finetuned_model folder (default <artifacts>/finetuned_model)")
    ap.add_argument("--artifacts", default=None, help="artifact-store root (default $ANIMIND_DATA_DIR/artifacts or data/artifacts)")
    ap.add_argument("--duckdb", default=None, help="read titles/IDs from this DuckDB file instead of the folder's lookup")
    ap.add_argument("--sentiment", default="liked", choices=sorted(SENTIMENTS), help="sentiment token for the history items")
    ap.add_argument("--num-beams", type=int, default=0, help="beams (default 2k)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if args.k < 1:
        ap.error("-k must be >= 1")
    try:
        notes: list[str] = []
        rows = recommend(args.history, k=args.k, model_dir=args.model_dir, artifacts=args.artifacts, duckdb_path=args.duckdb,
                         sentiment=args.sentiment, num_beams=args.num_beams, num_threads=args.threads, notes=notes)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    except UnknownTitleError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(rows, ensure_ascii=False, indent=2) if args.json else format_table(args.history, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
