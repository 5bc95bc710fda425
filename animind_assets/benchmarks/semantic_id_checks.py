"""Distributions behind the ``semantic_ids`` check thresholds and the ``rqvae_model`` drift thresholds.

    python -m animind_assets.benchmarks.semantic_id_checks --embeddings-npz emb.npz --seeds 0,1,2
    python -m animind_assets.benchmarks.semantic_id_checks --seeds 0,1,2      # embeds the catalog first

Vectors: the ``anime_embeddings`` of the real MAL 2020 catalog, i.e. ``anime_prep.anime_text`` (the
``lib.data.sources.read_sqlite_catalog`` + ``lib.data.prep.clean_anime`` path of
``benchmarks.embeddings``, adult titles excluded) embedded with the default model
(``lib.embeddings.embed_texts``), or an ``.npz`` with ``anime_id`` and ``emb`` arrays made that way.

Prints, for the ``rqvae_model`` preset (default ``default``):

1. per quantizer seed, fitted on the whole catalog: share of items in collisions before
   disambiguation (``collision_rate_before_disambiguation``), largest collision group, per-level
   usage of min(items, codebook_size) codes (``level_usage_floor``) and perplexity;
2. drift: fit on a random ``--drift-fit-fraction`` of the items, then measure on all items as a
   rebuild would: relative reconstruction-error increase and code-usage shift (largest per-level
   total-variation distance), next to the same figures for the fit items alone (no drift);
3. stability: change ``--changed`` vectors (replace each by another item's vector plus noise) and
   re-encode with the same quantizer: how many IDs a stable rebuild changes.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_vectors(npz: str) -> tuple[np.ndarray, np.ndarray]:
    if npz:
        d = np.load(npz)
        ids, x = np.asarray(d["anime_id"], dtype=np.int64), np.asarray(d["emb"], dtype=np.float32)
    else:
        from animind_assets.benchmarks.embeddings import load_catalog
        from animind_assets.lib import embeddings as E

        aid, texts, origin = load_catalog(None)
        print(f"embedding {len(texts)} anime_text from {origin} (slow on a busy CPU)", flush=True)
        x = np.asarray(E.embed_texts(texts, E.EmbeddingConfig(device="cpu")), dtype=np.float32)
        ids = np.asarray(aid, dtype=np.int64)
    order = np.argsort(ids)
    return ids[order], x[order]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embeddings-npz", default="")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sizes", default="1.0", help="comma-separated fractions of the items (seeded subsamples) for part 1")
    ap.add_argument("--drift-fit-fraction", default="0.9", help="comma-separated fractions of items the drift fits see")
    ap.add_argument("--changed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from animind_assets.lib.semantic_ids.quantizers import encode_codes, preset_config, train_quantizer
    from animind_assets.lib.semantic_ids.quantizers.metrics import code_stats
    from animind_assets.lib.semantic_ids.stable import drift_from_codes, fit_reference, vector_hashes
    from animind_assets.lib.semantic_ids.id_registry import stable_assign

    ids, x = load_vectors(args.embeddings_npz)
    print(f"{len(ids)} items, dim {x.shape[1]}; load {os.getloadavg()}; torch threads {torch.get_num_threads()}", flush=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = []
    for frac in [float(f) for f in args.sizes.split(",") if f.strip()]:
        n = int(round(frac * len(ids)))
        sub = np.sort(np.random.default_rng(123).choice(len(ids), size=n, replace=False)) if n < len(ids) else np.arange(len(ids))
        for seed in seeds:
            cfg = preset_config(args.preset, seed=seed)
            t = time.perf_counter()
            res = train_quantizer(x[sub], cfg)
            secs = time.perf_counter() - t
            k = res.config.codebook_size
            st = code_stats(res.codes, k)
            usable = min(n, k)
            usage = [len(np.unique(res.codes[:, lv])) / usable for lv in range(res.config.levels)]
            ppl = [st[f"perplexity_l{lv + 1}"] for lv in range(res.config.levels)]
            rows.append((n, seed, st["items_in_collisions"], st["largest_collision_group"], usage, ppl, secs))
            print(f"{n} items, seed {seed}: items in collisions {st['items_in_collisions']:.4f}, largest group "
                  f"{st['largest_collision_group']}, usage of min(N, K) {[round(u, 3) for u in usage]}, perplexity "
                  f"{[round(p, 1) for p in ppl]}, {secs:.0f}s", flush=True)
    for n in sorted({r[0] for r in rows}):
        sel = [r for r in rows if r[0] == n]
        col = np.array([r[2] for r in sel])
        minu = np.array([min(r[4]) for r in sel])
        print(f"{n} items over {len(sel)} seeds: collision rate min {col.min():.4f} mean {col.mean():.4f} max {col.max():.4f}; "
              f"largest group max {max(r[3] for r in sel)}; min level usage {minu.min():.3f}..{minu.max():.3f}", flush=True)

    # drift: fit on a fraction, measure on everything (a rebuild with new items)
    rng = np.random.default_rng(0)
    for frac in [float(f) for f in args.drift_fit_fraction.split(",") if f.strip()]:
        pick = np.sort(rng.choice(len(ids), size=int(round(frac * len(ids))), replace=False))
        cfg = preset_config(args.preset, seed=seeds[0] if seeds else 42)
        res = train_quantizer(x[pick], cfg)
        ref = fit_reference(res.codes, res.metrics["recon_loss"], res.config.codebook_size, cfg.to_dict())
        ev_fit = res.model.evaluate(torch.as_tensor(x[pick]))
        same = drift_from_codes(ref, ev_fit["codes"].numpy(), float(ev_fit["recon"]), res.config.codebook_size)
        ev_all = res.model.evaluate(torch.as_tensor(x))
        d = drift_from_codes(ref, ev_all["codes"].numpy(), float(ev_all["recon"]), res.config.codebook_size)
        ev_new = res.model.evaluate(torch.as_tensor(np.delete(x, pick, axis=0)))
        dn = drift_from_codes(ref, ev_new["codes"].numpy(), float(ev_new["recon"]), res.config.codebook_size)
        print(f"drift, fit on {frac:.0%} ({len(pick)} items): same items recon {same.recon_increase:+.3%} usage shift {same.usage_shift:.4f}; "
              f"all {len(ids)} items recon {d.recon_increase:+.3%} usage shift {d.usage_shift:.4f}; "
              f"only the {len(ids) - len(pick)} unseen items recon {dn.recon_increase:+.3%} usage shift {dn.usage_shift:.4f}", flush=True)

        # stability: 3 changed vectors, same quantizer
        codes0 = encode_codes(res.model, x)
        a0 = stable_assign(ids, codes0, vector_hashes(x), "q", None)
        x2 = x.copy()
        ch = rng.choice(len(ids), size=args.changed, replace=False)
        for i in ch:
            j = int(rng.integers(len(ids)))
            v = x[j] + 0.01 * rng.standard_normal(x.shape[1]).astype(np.float32)
            x2[i] = v / np.linalg.norm(v)
        a1 = stable_assign(ids, encode_codes(res.model, x2), vector_hashes(x2), "q", a0.registry)
        print(f"stability: {args.changed} vectors changed -> {a1.counts}", flush=True)
    print(f"load at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
