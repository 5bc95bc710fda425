"""Shared fixtures: tiny AniMind SQLite / Kaggle CSV sources with deliberate defects, shared-data paths."""

from __future__ import annotations

import csv
import os
import sqlite3
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a personal animind.yaml (project root or $ANIMIND_SETTINGS) must not change what the tests see; tests of the
# settings file point ANIMIND_SETTINGS at their own file
os.environ["ANIMIND_SETTINGS"] = "none"

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shared_data() -> Path:
    env = os.environ.get("ANIMIND_SHARED_DATA")
    return Path(env) if env else (PROJECT_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def mal2020_dir() -> Path:
    d = shared_data() / "mal2020"
    if not (d / "anilist.sqlite").exists():
        pytest.skip(f"../shared/data/mal2020 not found at {d}: shared MAL 2020 data absent (set ANIMIND_SHARED_DATA), skipping")
    return d


def shared_cases() -> Path:
    """``../shared/cases`` (failing inputs of issue 12), or ``$ANIMIND_SHARED_CASES``."""
    env = os.environ.get("ANIMIND_SHARED_CASES")
    return Path(env) if env else (PROJECT_ROOT / ".." / "shared" / "cases").resolve()


@pytest.fixture(scope="session")
def cases_dir() -> Path:
    d = shared_cases()
    if not (d / "README.md").exists():
        pytest.skip(f"../shared/cases not found at {d}: shared bad-input cases absent (set ANIMIND_SHARED_CASES), skipping")
    return d


@pytest.fixture(scope="session")
def beauty_dir() -> Path:
    d = shared_data() / "beauty"
    if not (d / "inter.json").exists():
        pytest.skip(f"../shared/data/beauty not found at {d}: shared Amazon Beauty data absent (set ANIMIND_SHARED_DATA), skipping")
    return d


@pytest.fixture(scope="session", autouse=True)
def _onnx_cache(tmp_path_factory):
    """ONNX exports of test models go to a per-session temp folder, not ~/.cache."""
    prev = os.environ.get("ANIMIND_ONNX_CACHE")
    os.environ["ANIMIND_ONNX_CACHE"] = str(tmp_path_factory.mktemp("onnx-cache"))
    yield
    if prev is None:
        os.environ.pop("ANIMIND_ONNX_CACHE", None)
    else:
        os.environ["ANIMIND_ONNX_CACHE"] = prev


@pytest.fixture()
def one_torch_thread():
    """Deterministic, polite CPU use for torch-heavy tests."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture()
def animind_env(tmp_path, monkeypatch):
    """Point every default path (DuckDB, exports, artifacts, MLflow) at a temp folder."""
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    return data


# Catalog rows as the Kaggle anime.csv holds them (strings, 'Unknown' placeholders, an adult title,
# a duplicate id, a null name, a non-numeric score/episodes).
CATALOG = [
    # MAL_ID, Name, Score, Genders, English name, Type, Episodes, Premiered, Studios, Source, Rating, Members
    ["1", "Cowboy Bebop", "8.78", "Action, Adventure, Sci-Fi", "Cowboy Bebop", "TV", "26", "Spring 1998", "Sunrise", "Original", "R - 17+ (violence & profanity)", "1251960"],
    ["5", "Cowboy Bebop: Tengoku no Tobira", "8.39", "Action, Drama", "Unknown", "Movie", "1", "Unknown", "Bones", "Original", "R - 17+ (violence & profanity)", "273145"],
    ["6", "Trigun", "Unknown", "Action, Sci-Fi, Comedy", "Trigun", "TV", "Unknown", "Spring 1998", "Madhouse", "Manga", "PG-13 - Teens 13 or older", "558913"],
    ["7", "Witch Hunter Robin", "abc", "Action, Mystery", "", "TV", "2x", "Summer 2002", "Sunrise", "Original", "PG-13 - Teens 13 or older", "94683"],
    ["8", "Adult Title", "6.1", "Hentai", "Unknown", "OVA", "2", "Unknown", "Unknown", "Unknown", "Rx - Hentai", "1000"],
    ["6", "Trigun duplicate", "8.0", "Action", "Unknown", "TV", "26", "Unknown", "Unknown", "Unknown", "PG-13 - Teens 13 or older", "10"],
    ["9", "Unknown", "7.0", "Drama", "Unknown", "TV", "12", "Unknown", "Unknown", "Unknown", "G - All Ages", "10"],
    ["15", "Eyeshield 21", "7.95", "Action, Sports, Comedy, Shounen", "Unknown", "TV", "145", "Spring 2005", "Gallop", "Manga", "PG-13 - Teens 13 or older", "83648"],
]
SYNOPSES = {
    "1": "In the year 2071, humanity has colonized several of the planets.",
    "5": "Another day, another bounty.",
    "6": "No synopsis information has been added to this title. Help improve our database by adding a synopsis here .",
    "15": "  Sena is like any other shy kid.  ",
}
# user_id, anime_id, rating, watching_status, watched_episodes
INTERACTIONS = [
    ["1", "1", "9", "2", "26"],
    ["1", "5", "0", "2", "1"],
    ["1", "6", "3", "4", "3"],
    ["2", "1", "8", "2", "26"],
    ["2", "15", "11", "2", "145"],  # score out of range
    ["2", "999", "7", "2", "1"],  # unknown anime
    ["2", "8", "7", "2", "2"],  # adult title (excluded from anime_prep)
    ["3", "6", "x", "2", "1"],  # non-numeric score
    ["3", "7", "5", "5", "1"],  # invalid status
    ["3", "1", "10", "1", "3"],
    ["3", "1", "9", "2", "26"],  # duplicate (user 3, anime 1)
    ["3", "15", "7", "6", "0"],
]
ANIME_HEADER = ["MAL_ID", "Name", "Score", "Genders", "English name", "Type", "Episodes", "Premiered", "Studios", "Source", "Rating", "Members"]


def write_kaggle(folder: Path, zipped: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, header: list[str], rows: list[list[str]]) -> None:
        path = folder / name
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
        if zipped:
            with zipfile.ZipFile(folder / f"{name}.zip", "w") as zf:
                zf.write(path, arcname=name)
            path.unlink()

    write("anime.csv", ANIME_HEADER, CATALOG)
    write(
        "anime_with_synopsis.csv",
        ["MAL_ID", "Name", "Score", "Genders", "sypnopsis"],
        [[r[0], r[1], r[2], r[3], SYNOPSES[r[0]]] for r in CATALOG if r[0] in SYNOPSES and r[1] != "Trigun duplicate"],
    )
    write("animelist.csv", ["user_id", "anime_id", "rating", "watching_status", "watched_episodes"], INTERACTIONS)
    return folder


def write_sqlite(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE anime(anime_id INTEGER, name TEXT, english_name TEXT, score REAL, genres TEXT,
          synopsis TEXT, type TEXT, episodes INTEGER, premiered TEXT, studios TEXT, source TEXT, rating TEXT,
          members INTEGER, favorites INTEGER, scored_by INTEGER, imported_at TEXT NOT NULL);
        CREATE TABLE users(user_id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT UNIQUE NOT NULL,
          source_club_id INTEGER, discovered_at TEXT NOT NULL);
        CREATE TABLE user_anime(user_id INTEGER NOT NULL, anime_id INTEGER NOT NULL, score INTEGER NOT NULL,
          watching_status INTEGER NOT NULL, watched_episodes INTEGER NOT NULL, scraped_at TEXT NOT NULL);
        """
    )
    for r in CATALOG:
        conn.execute(
            "INSERT INTO anime VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,'2020-09-01T00:00:00+00:00')",
            [r[0], r[1], r[4], r[2], r[3], SYNOPSES.get(r[0]) if r[1] != "Trigun duplicate" else None, r[5], r[6], r[7], r[8], r[9], r[10], r[11]],
        )
    for uid in {r[0] for r in INTERACTIONS}:
        conn.execute("INSERT INTO users(user_id, username, discovered_at) VALUES (?,?, 'x')", [uid, f"u{uid}"])
    for r in INTERACTIONS:
        conn.execute("INSERT INTO user_anime VALUES (?,?,?,?,?,'x')", r)
    conn.commit()
    conn.close()
    return path


@pytest.fixture()
def kaggle_dir(tmp_path) -> Path:
    return write_kaggle(tmp_path / "kaggle")


@pytest.fixture()
def sqlite_path(tmp_path) -> Path:
    return write_sqlite(tmp_path / "anilist.sqlite")


def add_synthetic_anime(path: Path, n: int, start_id: int = 1000) -> list[int]:
    """Append ``n`` valid catalog rows (ids ``start_id``...) to an AniMind SQLite file made by
    ``write_sqlite``; returns their ids. For tests that need more rows than the defect fixture has."""
    genres = ["Action", "Drama", "Comedy", "Romance", "Sci-Fi", "Fantasy", "Slice of Life", "Mystery"]
    ids = list(range(start_id, start_id + n))
    conn = sqlite3.connect(path)
    for i, anime_id in enumerate(ids):
        conn.execute(
            "INSERT INTO anime VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,'2020-09-01T00:00:00+00:00')",
            [
                anime_id, f"Synthetic Show {anime_id}", f"Synthetic Show {anime_id} (EN)", 6.0 + (i % 30) / 10,
                ", ".join(genres[j % len(genres)] for j in (i, i + 3)),
                f"Episode guide {anime_id}: a {genres[i % len(genres)].lower()} story about team {i % 17}.",
                "TV", 12 + i % 13, f"Spring {1990 + i % 30}", "Studio X", "Original", "PG-13 - Teens 13 or older",
                10_000 - i,
            ],
        )
    conn.commit()
    conn.close()
    return ids
