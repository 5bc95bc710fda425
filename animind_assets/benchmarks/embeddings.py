"""Embedding throughput, int8 quality, incremental rebuild speed and memory on the real MAL 2020 catalog.

    python -m animind_assets.benchmarks.embeddings --limit 1000 --ratio-sample 256 --rounds 3   # usual run
    python -m animind_assets.benchmarks.embeddings --variants onnx-unfused,onnx,int8 --skip-b   # before/after
    python -m animind_assets.benchmarks.embeddings --skip-a --skip-b --cowatch                  # int8 co-watch gate
    python -m animind_assets.benchmarks.embeddings                                              # full catalog

Every figure line carries the CPU (model name and vector extensions AVX2 / AVX-512 / VNNI / AMX from
``/proc/cpuinfo``) in the header and the 1-minute load average (``os.getloadavg``, as ``uptime``) at
the moment it was measured. Ratios are measured side by side in one run, so load from other
processes on a shared machine hits every path alike; absolute texts/s are only comparable at equal load.

Texts: ``../shared/data/mal2020/anilist.sqlite`` (or ``$ANIMIND_SHARED_DATA``) read with the same
source adapter and cleaning as the ``anime_prep`` asset (``lib.data.sources.read_sqlite_catalog`` +
``lib.data.prep.clean_anime``, adult titles excluded as by default), i.e. exactly ``anime_prep.anime_text``.
Model: the default embedded all-MiniLM-L6-v2 on this CPU.

(a) texts/s of the asset's embedding path (``lib.embeddings.embed_texts``) in each ``--variants``
    setting (``onnx`` = the default fp32 path: ONNX Runtime, fused graph; ``onnx-unfused`` = the
    graph as exported, i.e. the path before the fusions; ``onnx-notail`` = the fused graph without the
    guided tail of the last window; ``torch`` = PyTorch; ``int8`` = the gated int8 option; each with an
    optional ``@w<workers>b<batch>t<tokens>`` suffix, ``--sweep`` adds a workers x batch grid) vs plain ``SentenceTransformer.encode(texts, batch_size=64)`` on the same seeded
    sample, all models warm, interleaved over ``--rounds`` rounds (order rotating); per round and
    median ratio to ST.encode, min cosine to ST.encode, and int8's cosine to fp32 (mean / min: the
    library's gate is mean >= 0.995 and min >= 0.98 on a seeded sample).
(b) ``build_embeddings`` full build of the catalog (default fp32 path) vs an incremental rebuild after
    changing ``--change-frac`` (1%) of the texts; projected time for the 16,214-text full catalog.
(c) peak resident memory (RSS): of the asset path alone (measured after (b), before the plain
    SentenceTransformer copy is loaded), of the whole process, and RSS at each stage.
(d) ``--cowatch``: the issue-17 downstream gate for int8: semantic IDs (``--cowatch-preset`` of
    ``lib.semantic_ids.quantizers``, default ``rqkmeans``) fitted on the fp32 and on the int8 vectors of the catalog,
    co-watch recall@20 of each ID ranking (``lib.semantic_ids.evaluation.cowatch_recall``, positives = completed
    and score >= 7 in ``user_anime``, 500 seeded queries with >= 10 positive users); passes when int8's
    recall is within 1% (relative) of fp32's.
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

from animind_assets.lib.common.device import cpu_info

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FULL_CATALOG_TEXTS = 16214
VARIANTS = {  # name -> EmbeddingConfig changes
    "onnx": {"backend": "onnx"},
    "onnx-unfused": {"backend": "onnx", "onnx_optimize": False},
    "torch": {"backend": "torch"},
    "int8": {"backend": "onnx", "quantize": "int8"},
    "onnx-notail": {"backend": "onnx"},  # fused fp32 without the guided tail (the batching before the AVX2 follow-up)
}
NO_GUIDED_TAIL = {"onnx-notail"}
# --sweep: the threads x batch grid of (a) (workers x threads each = the CPU count; batch = texts per forward)
SWEEP = [f"onnx@w{w}b{b}" for w in (1, 2) for b in (16, 32, 64)]


def variant_changes(spec: str) -> dict:
    """``NAME[@w<workers>][b<batch>][t<max batch tokens>]`` -> ``EmbeddingConfig`` changes, e.g.
    ``onnx@w1b32`` = fused fp32 graph, one inference worker (one ONNX Runtime session with all the
    threads), 32 texts per batch; ``t-1`` = no padded-token cap. Raises ``ValueError`` for an unknown
    name or suffix."""
    import re

    name, _, suffix = spec.partition("@")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r} in {spec!r}; choose from {sorted(VARIANTS)} (+ @w<N>b<N>t<N>)")
    changes = dict(VARIANTS[name])
    m = re.fullmatch(r"(?:w(\d+))?(?:b(\d+))?(?:t(-?\d+))?", suffix)
    if m is None:
        raise ValueError(f"bad variant suffix {suffix!r} in {spec!r}; expected e.g. @w1b32 or @w2b64t-1")
    if m.group(1):
        changes["cpu_workers"] = int(m.group(1))
    if m.group(2):
        changes["batch_size"] = int(m.group(2))
    if m.group(3):
        changes["max_batch_tokens"] = int(m.group(3))
    return changes


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


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


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.clip(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12, None)


def cowatch_check(ids: list[int], fp32: np.ndarray, int8: np.ndarray, preset: str, k: int = 20) -> dict:
    """Co-watch recall@k of semantic IDs fitted on fp32 vs int8 vectors (see module docstring (d))."""
    import sqlite3

    from animind_assets.lib.data.sources import shared_data_dir
    from animind_assets.lib.semantic_ids.assign import assign_semantic_ids
    from animind_assets.lib.semantic_ids.evaluation import (
        cowatch_recall,
        positive_graph,
    )
    from animind_assets.lib.semantic_ids.quantizers import (
        preset_config,
        train_quantizer,
    )

    con = sqlite3.connect(f"file:{shared_data_dir() / 'mal2020' / 'anilist.sqlite'}?mode=ro", uri=True)
    arr = np.asarray(con.execute("select user_id, anime_id, score, watching_status from user_anime").fetchall(), dtype=np.int64)
    con.close()
    order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
    sorted_ids = np.asarray(ids, dtype=np.int64)[order]
    graph = positive_graph(arr[:, 0], arr[:, 1], arr[:, 3], arr[:, 2], item_universe=sorted_ids)
    out: dict = {"preset": preset, "k": k, "positive_rows": graph.n_positive_rows}
    for name, x in (("fp32", fp32[order]), ("int8", int8[order])):
        t = time.perf_counter()
        res = train_quantizer(np.ascontiguousarray(x, dtype=np.float32), preset_config(preset))
        full = assign_semantic_ids(res.codes, order_key=sorted_ids)
        rep = cowatch_recall(sorted_ids, full, x, graph, k=k, min_support=10, max_queries=500, seed=42)
        out[name] = {"recall_semantic_id": rep["methods"]["semantic_id"]["mean_recall"],
                     "recall_embedding_cosine": rep["methods"]["embedding_cosine"]["mean_recall"],
                     "queries": rep["evaluated_queries"], "fit_s": round(time.perf_counter() - t, 1)}
    base = out["fp32"]["recall_semantic_id"]
    out["relative_change"] = (out["int8"]["recall_semantic_id"] - base) / max(base, 1e-12)
    out["passed"] = bool(out["relative_change"] >= -0.01)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="first N anime of the catalog (quick run)")
    ap.add_argument("--ratio-sample", type=int, default=768, help="texts per round for (a) (0 = all)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds for (a)")
    ap.add_argument("--variants", default="onnx,int8",
                    help=f"asset-path settings timed in (a), of {sorted(VARIANTS)}, each optionally with @w<workers>b<batch>t<tokens>")
    ap.add_argument("--sweep", action="store_true", help=f"add the threads x batch grid {','.join(SWEEP)} to --variants")
    ap.add_argument("--change-frac", type=float, default=0.01, help="fraction of texts changed for (b)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cpu-workers", type=int, default=0, help="asset path inference threads (0 = auto)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--cowatch", action="store_true", help="(d) int8 vs fp32 semantic-ID co-watch recall on the catalog")
    ap.add_argument("--cowatch-preset", default="rqkmeans", help="lib.semantic_ids.quantizers preset for (d)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.sweep:
        variants += [v for v in SWEEP if v not in variants]
    try:
        changes = {v: variant_changes(v) for v in variants}
    except ValueError as exc:
        ap.error(str(exc))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    from animind_assets.lib import embeddings as E

    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cpus']} logical CPUs); extensions: {', '.join(cpu['extensions']) or 'none'}; "
          f"without: {', '.join(cpu['missing'])}; load {load_now()}", flush=True)
    out: dict = {"cpu": cpu, "rss_mb": {"start": round(_rss_mb(), 1)}}
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
        truncated_at_max_length=round(float((tok_lens >= max_len).mean()), 3),
    )
    out["rss_mb"]["model_loaded"] = round(_rss_mb(), 1)
    workers, threads = emb.workers_for(cfg)
    out["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "asset_workers": workers,
                      "threads_per_worker": threads, "loadavg_start": os.getloadavg()}
    print(f"catalog: {len(texts)} anime_text from {origin}; tokens mean {out['catalog']['tokens_mean']}; "
          f"torch threads {torch.get_num_threads()}, asset path {workers} worker(s) x {threads} thread(s)")

    # ------------------------------------------------------------------ (b) incremental vs full
    if not args.skip_b:
        load_b = load_now()
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
        per_s = full_stats.items_per_s
        out["b_incremental"] = {
            "rows": len(texts), "changed": k, "backend": full_stats.backend, "graph": emb.last_graph,
            "full_build_s": round(full_s, 2), "full_texts_per_s": round(per_s, 2),
            "projected_full_catalog_s": round(FULL_CATALOG_TEXTS / per_s, 1) if per_s else None,
            "incremental_s": round(inc_s, 3), "incremental_embedded": inc_stats.n_embedded,
            "incremental_reused": inc_stats.n_reused, "speedup": round(full_s / inc_s, 1),
            "unchanged_rebuild_s": round(noop_s, 3), "load_start": load_b, "load_end": load_now(),
        }
        b = out["b_incremental"]
        print(f"(b) full build {len(texts)} rows {full_s:.1f}s ({per_s:.1f} texts/s, {b['backend']} {b['graph']}; "
              f"{FULL_CATALOG_TEXTS} texts -> ~{b['projected_full_catalog_s']}s); incremental after changing {k} texts "
              f"{inc_s:.2f}s -> {full_s / inc_s:.1f}x faster; nothing changed {noop_s:.2f}s "
              f"[load {b['load_start']} -> {b['load_end']}]", flush=True)

    out["rss_mb"]["peak_asset_path_only"] = round(_peak_rss_mb(), 1)  # before the plain ST model is loaded

    # ------------------------------------------------------------------ (a) throughput ratios
    if not args.skip_a:
        st = SentenceTransformer(str(E.embedded_model_path()), device="cpu")
        out["rss_mb"]["st_model_loaded"] = round(_rss_mb(), 1)
        rng = np.random.default_rng(args.seed)
        n = len(texts) if not args.ratio_sample or args.ratio_sample >= len(texts) else args.ratio_sample
        sample = [texts[i] for i in sorted(rng.choice(len(texts), size=n, replace=False))]
        cfgs = {v: cfg.replace(**changes[v]) for v in variants}
        warm = sample[:32]
        st.encode(warm, batch_size=args.batch_size)
        for v, c in cfgs.items():
            E.embed_texts(warm, c, log=log if v == "int8" else None)
            out.setdefault("graphs", {})[v] = E.get_embedder(c).last_graph or E.get_embedder(c).last_backend
            if v == "int8":  # the library's gate ran on this first int8 call
                out["int8_library_gate"] = dict(E.get_embedder(c).last_int8_gate)
        names = ["st", *variants]
        rounds = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            secs: dict = {}
            vecs: dict = {}
            loads: list[float] = []
            for which in order:
                loads.append(load_now())
                t = time.perf_counter()
                if which == "st":
                    vecs[which] = st.encode(sample, batch_size=args.batch_size)
                else:
                    embedder = E.get_embedder(cfgs[which])
                    embedder.guided_tail = which.partition("@")[0] not in NO_GUIDED_TAIL
                    try:
                        vecs[which] = E.embed_texts(sample, cfgs[which])
                    finally:
                        embedder.guided_tail = True
                secs[which] = time.perf_counter() - t
            row = {"order": order, "load": round(statistics.mean(loads), 2), "st_texts_per_s": round(n / secs["st"], 2)}
            for v in variants:
                c = _cos(vecs["st"], vecs[v])
                row[v] = {"texts_per_s": round(n / secs[v], 2), "ratio": round(secs["st"] / secs[v], 3),
                          "min_cosine_to_st": float(c.min())}
            if "int8" in variants:
                ref = vecs["onnx"] if "onnx" in vecs else vecs["st"]
                c = _cos(ref, vecs["int8"])
                row["int8"].update(cosine_to_fp32_mean=round(float(c.mean()), 5), cosine_to_fp32_min=round(float(c.min()), 5))
            rounds.append(row)
            parts = [f"ST.encode {row['st_texts_per_s']}/s"] + [
                f"{v} {row[v]['texts_per_s']}/s = {row[v]['ratio']}x" for v in variants]
            extra = ""
            if "int8" in variants:
                extra = f"; int8 cosine to fp32 mean {row['int8']['cosine_to_fp32_mean']}, min {row['int8']['cosine_to_fp32_min']}"
            print(f"(a) round {r + 1}/{args.rounds} ({n} texts, order {' > '.join(order)}): {', '.join(parts)}; "
                  f"min cosine to ST {min(row[v]['min_cosine_to_st'] for v in variants if v != 'int8') if any(v != 'int8' for v in variants) else float('nan'):.7f}"
                  f"{extra} [load {row['load']}]", flush=True)
        summary = {"texts": n, "rounds": rounds, "st_texts_per_s_median": statistics.median(r["st_texts_per_s"] for r in rounds),
                   "load_median": statistics.median(r["load"] for r in rounds)}
        for v in variants:
            summary[v] = {"ratio_median": round(statistics.median(r[v]["ratio"] for r in rounds), 3),
                          "ratio_min": min(r[v]["ratio"] for r in rounds),
                          "texts_per_s_median": statistics.median(r[v]["texts_per_s"] for r in rounds),
                          "min_cosine_to_st": min(r[v]["min_cosine_to_st"] for r in rounds), "graph": out["graphs"][v]}
        if "int8" in variants:
            summary["int8"]["cosine_to_fp32_min"] = min(r["int8"]["cosine_to_fp32_min"] for r in rounds)
            summary["int8"]["cosine_to_fp32_mean"] = statistics.mean(r["int8"]["cosine_to_fp32_mean"] for r in rounds)
            summary["int8"]["library_gate"] = out.get("int8_library_gate", {})
        out["a_throughput"] = summary
        print(f"(a) median of {args.rounds} rounds on {cpu['model']} [{', '.join(cpu['extensions'])}], load {summary['load_median']}: "
              + ", ".join(f"{v} {summary[v]['ratio_median']}x ST.encode ({summary[v]['texts_per_s_median']}/s)" for v in variants)
              + f"; ST.encode {summary['st_texts_per_s_median']}/s", flush=True)
        out["rss_mb"]["after_a"] = round(_rss_mb(), 1)

    # ------------------------------------------------------------------ (d) co-watch recall gate for int8
    if args.cowatch:
        load_d = load_now()
        t = time.perf_counter()
        x32 = E.embed_texts(texts, cfg.replace(backend="onnx"), log=log)
        t32 = time.perf_counter() - t
        t = time.perf_counter()
        x8 = E.embed_texts(texts, cfg.replace(backend="onnx", quantize="int8"), log=log)
        t8 = time.perf_counter() - t
        c = _cos(x32, x8)
        d = cowatch_check(ids, x32, x8, args.cowatch_preset)
        d.update(texts=len(texts), fp32_s=round(t32, 1), int8_s=round(t8, 1), cosine_mean=round(float(c.mean()), 5),
                 cosine_min=round(float(c.min()), 5), load_start=load_d, load_end=load_now())
        out["d_cowatch"] = d
        print(f"(d) {len(texts)} texts: fp32 {t32:.0f}s, int8 {t8:.0f}s; int8 cosine to fp32 mean {d['cosine_mean']}, "
              f"min {d['cosine_min']}; co-watch recall@{d['k']} of {d['preset']} semantic IDs: fp32 "
              f"{d['fp32']['recall_semantic_id']:.4f}, int8 {d['int8']['recall_semantic_id']:.4f} "
              f"({100 * d['relative_change']:+.2f}%, gate within -1%: {'passed' if d['passed'] else 'FAILED'}) "
              f"[load {d['load_start']} -> {d['load_end']}]", flush=True)

    out["rss_mb"]["end"] = round(_rss_mb(), 1)
    out["rss_mb"]["peak"] = round(_peak_rss_mb(), 1)
    out["machine"]["loadavg_end"] = os.getloadavg()
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"(c) RSS MB: {out['rss_mb']} [load {load_now()}]")
    print(json.dumps(out, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
