"""Sharded vs unsharded embedding of a synthetic catalog: wall time and peak RSS per shard.

    nice -n 5 python -m animind_assets.benchmarks.sharded_embeddings --items 3000 --shards 4 --processes 2
    python -m animind_assets.benchmarks.sharded_embeddings --items 100000 --json out.json   # the issue's size

Catalog: ``--items`` synthetic anime built from the real MAL 2020 catalog's fields
(``../shared/data/mal2020/anilist.sqlite`` or ``$ANIMIND_SHARED_DATA``, cleaned like ``anime_prep``, adult
titles excluded): item ``i`` takes its title from one seeded random real anime, type/episodes/premiered/
source/rating from a second, genres from a third, studios from a fourth and its synopsis from a fifth,
and ``anime_text`` is built by ``lib.data.prep.build_anime_text`` (the asset's own text format). Texts have the
real catalog's length distribution but are (almost all) unique, so a cache cannot help.

Protocol (every run is a fresh ``python`` child process, so peak RSS is per run):

1. warm-up child (8 texts): the ONNX export is cached before anything is timed;
2. **unsharded**: one child embeds all items with ``build_embeddings`` (asset defaults);
3. **sharded**: ``--shards`` children, one per item-hash shard (``lib.common.sharding``), at most
   ``--processes`` running at once (a pool, like pods on a node), each with
   ``cpu_workers = max(1, cores // processes)`` so the pool does not oversubscribe the cores;
4. the union of the shards is compared with the unsharded table row for row (ids, max |diff| of
   the vectors, min cosine).

Figures: per run wall time (process start to exit, model load included), embedding seconds, texts/s,
CPU seconds (user + system of the child: on a loaded machine the wall time is mostly waiting for a core)
and peak RSS (``ru_maxrss`` of the child); the sharded total is the wall time of the whole pool. Report
them with ``uptime``'s load average (printed at start and end).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def synthetic_catalog(n_items: int, seed: int = 0):
    """``polars.DataFrame[anime_id Int64, anime_text Utf8]`` of ``n_items`` synthetic anime mixed
    from the real catalog's fields (see the module docstring). Exits 0 with SKIP when the data is absent."""
    import numpy as np
    import polars as pl

    from animind_assets.lib.data.prep import build_anime_text, clean_anime
    from animind_assets.lib.data.sources import read_sqlite_catalog, shared_data_dir

    path = shared_data_dir() / "mal2020" / "anilist.sqlite"
    if not path.exists():
        print(f"SKIP: ../shared/data/mal2020 not found: {path} (set ANIMIND_SHARED_DATA)")
        sys.exit(0)
    real = clean_anime(read_sqlite_catalog(path).frame, include_adult=False).frame
    rows = real.to_dicts()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(rows), size=(n_items, 5))
    texts = []
    for a, b, c, d, e in picks:
        rec = {
            "name": rows[a]["name"],
            "english_name": rows[a].get("english_name"),
            "type": rows[b].get("type"),
            "episodes": rows[b].get("episodes"),
            "premiered": rows[b].get("premiered"),
            "year": rows[b].get("year"),
            "source": rows[b].get("source"),
            "rating": rows[b].get("rating"),
            "genres": rows[c].get("genres"),
            "studios": rows[d].get("studios"),
            "synopsis": rows[e].get("synopsis"),
        }
        texts.append(build_anime_text(rec))
    return pl.DataFrame(
        {"anime_id": np.arange(1, n_items + 1, dtype=np.int64), "anime_text": texts},
        schema={"anime_id": pl.Int64, "anime_text": pl.Utf8},
    )


# ------------------------------------------------------------------------------------------- child
def child(catalog: str, out: str, shard: str | None, cpu_workers: int, limit: int | None) -> None:
    """One run: embed the catalog (or one shard of it) and write ``out`` (parquet) + ``out.json``."""
    t0 = time.perf_counter()
    import polars as pl

    from animind_assets.lib.common.sharding import shard_mask
    from animind_assets.lib.embeddings import EmbeddingConfig, build_embeddings

    df = pl.read_parquet(catalog)
    if limit:
        df = df.head(limit)
    if shard:
        df = df.filter(pl.Series(shard_mask(df["anime_id"].to_list(), shard)))
    cfg = EmbeddingConfig(cpu_workers=cpu_workers)
    label = shard or "unsharded"

    last = [0.0]

    def log(msg: str) -> None:
        """Progress (counts, rate, ETA) on stderr, tagged with the run: at most one line a minute, plus the end."""
        now = time.perf_counter()
        if now - last[0] >= 60.0 or "(100.0%)" in msg:
            last[0] = now
            print(f"[{label}] {msg}", file=sys.stderr, flush=True)

    table, stats = build_embeddings(df["anime_id"].to_list(), df["anime_text"].to_list(), None, cfg, log=log)
    table.select("anime_id", "embedding").write_parquet(out)
    figures = {
        "shard": shard or "all",
        "items": int(df.height),
        "wall_s": round(time.perf_counter() - t0, 2),
        "embed_s": round(stats.embed_seconds, 2),
        "texts_per_s": round(stats.items_per_s, 2),
        "cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "backend": stats.backend,
        "cpu_workers": cpu_workers,
        "dim": stats.dim,
    }
    Path(out + ".json").write_text(json.dumps(figures))


def _spawn(catalog: str, out: str, shard: str | None, cpu_workers: int, limit: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "animind_assets.benchmarks.sharded_embeddings", "--child",
           "--catalog", catalog, "--out", out, "--cpu-workers", str(cpu_workers)]
    if shard:
        cmd += ["--shard", shard]
    if limit:
        cmd += ["--limit", str(limit)]
    return subprocess.Popen(cmd)


def _wait(proc: subprocess.Popen, what: str) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"{what}: child exited with {proc.returncode}")


def _run_pool(jobs: list[tuple[str, str]], catalog: str, processes: int, cpu_workers: int) -> float:
    """Run ``(shard, out)`` jobs with at most ``processes`` children at once; wall seconds of the pool."""
    t0 = time.perf_counter()
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, str]] = []
    while pending or running:
        while pending and len(running) < processes:
            shard, out = pending.pop(0)
            running.append((_spawn(catalog, out, shard, cpu_workers), shard))
        time.sleep(0.2)
        for proc, shard in list(running):
            if proc.poll() is not None:
                _wait(proc, f"shard {shard}")
                running.remove((proc, shard))
                print(f"  shard {shard} done: {json.loads(Path(dict(jobs)[shard] + '.json').read_text())}", flush=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000, help="synthetic catalog size")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--processes", type=int, default=2, help="shard processes at once")
    ap.add_argument("--cpu-workers", type=int, default=0, help="unsharded run's cpu_workers (0 = auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=str, default=None, help="keep catalog and vectors here (default: temp)")
    ap.add_argument("--json", type=str, default=None, help="write the figures to this JSON file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--catalog", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.catalog, args.out, args.shard, args.cpu_workers, args.limit)
        return {}

    import numpy as np
    import polars as pl

    from animind_assets.lib.common.sharding import shard_keys, shard_sizes

    load_start = _load()
    print(f"load average at start: {load_start}; cores: {os.cpu_count()}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="animind-shardbench-") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    catalog = str(work / "catalog.parquet")
    cat = synthetic_catalog(args.items, args.seed)
    cat.write_parquet(catalog)
    lens = cat["anime_text"].str.len_chars()
    print(f"synthetic catalog: {cat.height} items, {cat['anime_text'].n_unique()} unique texts, "
          f"mean {lens.mean():.0f} chars", flush=True)

    _wait(_spawn(catalog, str(work / "warmup.parquet"), None, 1, limit=8), "warm-up")

    print("unsharded ...", flush=True)
    t0 = time.perf_counter()
    _wait(_spawn(catalog, str(work / "all.parquet"), None, args.cpu_workers), "unsharded")
    unsharded_pool = time.perf_counter() - t0
    unsharded = json.loads(Path(work / "all.parquet.json").read_text())
    print(f"  {unsharded}", flush=True)

    keys = shard_keys(args.shards)
    shard_workers = max(1, (os.cpu_count() or 1) // args.processes)
    print(f"{args.shards} shards, {args.processes} at once, cpu_workers={shard_workers} each ...", flush=True)
    jobs = [(k, str(work / f"shard-{k}.parquet")) for k in keys]
    sharded_pool = _run_pool(jobs, catalog, args.processes, shard_workers)
    per_shard = [json.loads(Path(out + ".json").read_text()) for _, out in jobs]

    # same vectors either way
    a = pl.read_parquet(work / "all.parquet").sort("anime_id")
    b = pl.concat([pl.read_parquet(out) for _, out in jobs]).sort("anime_id")
    same_ids = a["anime_id"].to_list() == b["anime_id"].to_list()
    va, vb = a["embedding"].to_numpy(), b["embedding"].to_numpy()
    max_abs = float(np.abs(va - vb).max()) if same_ids else float("nan")
    min_cos = float((va * vb).sum(axis=1).min()) if same_ids else float("nan")

    result = {
        "items": args.items,
        "shards": args.shards,
        "processes": args.processes,
        "shard_sizes": shard_sizes(cat["anime_id"].to_list(), args.shards),
        "unsharded": {**unsharded, "pool_wall_s": round(unsharded_pool, 2)},
        "sharded": {"pool_wall_s": round(sharded_pool, 2), "per_shard": per_shard,
                    "max_peak_rss_mb": max(s["peak_rss_mb"] for s in per_shard)},
        "union_equals_unsharded": {"same_ids": same_ids, "max_abs_diff": max_abs, "min_cosine": min_cos},
        "load_average_start": load_start,
        "load_average_end": _load(),
    }
    print(json.dumps(result, indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
