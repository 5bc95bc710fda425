"""Embedding throughput, incremental rebuild speed and memory on the real MAL 2020 catalog.

    python -m animind_assets.benchmarks.embeddings                 # full catalog (tens of minutes on 2 cores)
    python -m animind_assets.benchmarks.embeddings --limit 500     # quick run
    python -m animind_assets.benchmarks.embeddings --ratio-sample 1024 --rounds 5 --json out.json

Texts: ``../shared/data/mal2020/anilist.sqlite`` (or ``$ANIMIND_SHARED_DATA``) read with the same
source adapter and cleaning as the ``anime_prep`` asset (``lib.sources.read_sqlite_catalog`` +
``lib.prep.clean_anime``, adult titles excluded as by default), i.e. exactly ``anime_prep.anime_text``.
Model: the default embedded all-MiniLM-L6-v2 on this CPU.

(a) texts/s of the asset's embedding path (``lib.embeddings.embed_texts``) vs plain
    ``SentenceTransformer.encode(texts, batch_size=64)`` on the same seeded sample, both models
    warm, interleaved over ``--rounds`` rounds (order alternating) so that load from other processes
    on a shared machine hits both alike; the ratio is reported per round and as the median.
(b) ``build_embeddings`` full build of the catalog vs an incremental rebuild after changing
    ``--change-frac`` (1%) of the texts (model already loaded in both).
(c) peak resident memory (RSS): of the asset path alone (measured after (b), which runs first, before
    the plain SentenceTransformer copy is loaded), of the whole process, and RSS at each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_catalog(limit: int | None) -> tuple[list[int], list[str], str]:
    from animind_assets.lib.data.prep import clean_anime
    from animind_assets.lib.data.sources import read_sqlite_catalog, shared_data_dir

    path = shared_data_dir() / "mal2020" / "anilist.sqlite"
    if not path.exists():
        print(f"SKIP: ../shared/data/mal2020 not found: {path} (set ANIMIND_SHARED_DATA)")
        sys.exit(0)
    raw = read_sqlite_catalog(path)
    res = clean_anime(raw.frame, include_adult=False, limit=limit)
    df = res.frame
    return df["anime_id"].to_list(), df["anime_text"].to_list(), raw.origin


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="first N anime of the catalog (quick run)")
    ap.add_argument("--ratio-sample", type=int, default=768, help="texts per round for (a) (0 = all)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds for (a)")
    ap.add_argument("--change-frac", type=float, default=0.01, help="fraction of texts changed for (b)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cpu-workers", type=int, default=0, help="asset path inference threads (0 = auto)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="write the figures to this JSON file")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    from animind_assets.lib import embeddings as E

    out: dict = {"rss_mb": {"start": round(_rss_mb(), 1)}}
    t0 = time.perf_counter()
    ids, texts, origin = load_catalog(args.limit)
    out["catalog"] = {"origin": origin, "texts": len(texts), "load_s": round(time.perf_counter() - t0, 2)}
    cfg = E.EmbeddingConfig(device="cpu", batch_size=args.batch_size, cpu_workers=args.cpu_workers)
    emb = E.get_embedder(cfg, log=log)
    max_len = emb.max_length_for(cfg)
    tok_lens = np.concatenate([  # chunked: token lists of the whole catalog would inflate the peak RSS
        [len(x) for x in emb.tokenizer(texts[i : i + 2048], truncation=True, max_length=max_len)["input_ids"]]
        for i in range(0, len(texts), 2048)
    ])
    out["catalog"].update(
        tokens_mean=round(float(tok_lens.mean()), 1), tokens_p50=int(np.median(tok_lens)),
        truncated_at_max_length=round(float((tok_lens >= emb.max_length_for(cfg)).mean()), 3),
    )
    out["rss_mb"]["model_loaded"] = round(_rss_mb(), 1)
    workers, threads = emb._workers(cfg)
    out["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "asset_workers": workers,
                      "threads_per_worker": threads, "loadavg_start": os.getloadavg()}
    print(f"catalog: {len(texts)} anime_text from {origin}; tokens mean {out['catalog']['tokens_mean']}; "
          f"torch threads {torch.get_num_threads()}, asset path {workers} worker(s) x {threads} thread(s)")

    # ------------------------------------------------------------------ (b) incremental vs full
    if not args.skip_b:
        t = time.perf_counter()
        full_df, full_stats = E.build_embeddings(ids, texts, None, cfg, log=log)
        full_s = time.perf_counter() - t
        out["rss_mb"]["after_full_build"] = round(_rss_mb(), 1)
        rng = np.random.default_rng(args.seed + 1)
        k = max(1, int(round(args.change_frac * len(texts))))
        changed = set(rng.choice(len(texts), size=k, replace=False).tolist())
        texts2 = [t_ + " (edited)" if i in changed else t_ for i, t_ in enumerate(texts)]
        t = time.perf_counter()
        inc_df, inc_stats = E.build_embeddings(ids, texts2, full_df, cfg, log=log)
        inc_s = time.perf_counter() - t
        t = time.perf_counter()
        _, noop_stats = E.build_embeddings(ids, texts2, inc_df, cfg)
        noop_s = time.perf_counter() - t
        assert inc_stats.n_embedded == k and inc_stats.n_reused == len(texts) - k, inc_stats
        assert noop_stats.n_embedded == 0
        out["b_incremental"] = {
            "rows": len(texts), "changed": k,
            "full_build_s": round(full_s, 2), "full_texts_per_s": round(full_stats.items_per_s, 2),
            "incremental_s": round(inc_s, 3), "incremental_embedded": inc_stats.n_embedded,
            "incremental_reused": inc_stats.n_reused, "speedup": round(full_s / inc_s, 1),
            "unchanged_rebuild_s": round(noop_s, 3),
        }
        print(f"(b) full build {len(texts)} rows {full_s:.1f}s ({full_stats.items_per_s:.1f} texts/s); "
              f"incremental after changing {k} texts {inc_s:.2f}s -> {full_s / inc_s:.1f}x faster; "
              f"nothing changed {noop_s:.2f}s", flush=True)

    out["rss_mb"]["peak_asset_path_only"] = round(_peak_rss_mb(), 1)  # before the plain ST model is loaded

    # ------------------------------------------------------------------ (a) throughput ratio
    if not args.skip_a:
        st = SentenceTransformer(str(E.embedded_model_path()), device="cpu")
        out["rss_mb"]["st_model_loaded"] = round(_rss_mb(), 1)
        rng = np.random.default_rng(args.seed)
        n = len(texts) if not args.ratio_sample or args.ratio_sample >= len(texts) else args.ratio_sample
        sample = [texts[i] for i in sorted(rng.choice(len(texts), size=n, replace=False))]
        warm = sample[:32]
        st.encode(warm, batch_size=args.batch_size)
        E.embed_texts(warm, cfg)
        rounds = []
        for r in range(args.rounds):
            order = ["st", "asset"] if r % 2 == 0 else ["asset", "st"]
            res: dict = {}
            for which in order:
                t = time.perf_counter()
                if which == "st":
                    vec_st = st.encode(sample, batch_size=args.batch_size)
                else:
                    vec_as = E.embed_texts(sample, cfg)
                res[which] = time.perf_counter() - t
            cos = (vec_st * vec_as).sum(1) / np.linalg.norm(vec_st, axis=1) / np.linalg.norm(vec_as, axis=1)
            row = {"st_texts_per_s": round(n / res["st"], 2), "asset_texts_per_s": round(n / res["asset"], 2),
                   "ratio": round(res["st"] / res["asset"], 3), "min_cosine": float(cos.min())}
            rounds.append(row)
            print(f"(a) round {r + 1}/{args.rounds} ({n} texts, {' then '.join(order)}): ST.encode "
                  f"{row['st_texts_per_s']}/s, asset path {row['asset_texts_per_s']}/s, ratio {row['ratio']}x, "
                  f"min cosine {row['min_cosine']:.7f}", flush=True)
        out["a_throughput"] = {
            "texts": n, "rounds": rounds,
            "ratio_median": round(statistics.median(r["ratio"] for r in rounds), 3),
            "ratio_min": min(r["ratio"] for r in rounds),
            "st_texts_per_s_median": statistics.median(r["st_texts_per_s"] for r in rounds),
            "asset_texts_per_s_median": statistics.median(r["asset_texts_per_s"] for r in rounds),
            "min_cosine": min(r["min_cosine"] for r in rounds),
        }
        out["rss_mb"]["after_a"] = round(_rss_mb(), 1)

    out["rss_mb"]["end"] = round(_rss_mb(), 1)
    out["rss_mb"]["peak"] = round(_peak_rss_mb(), 1)
    out["machine"]["loadavg_end"] = os.getloadavg()
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"(c) RSS MB: {out['rss_mb']}")
    print(json.dumps(out, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
