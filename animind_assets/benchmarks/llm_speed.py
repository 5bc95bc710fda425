"""CPU speed of the semantic-ID LM: fine-tune tokens/s and beam-search users/s, before and after.

    python -m animind_assets.benchmarks.llm_speed                       # 12 steps per variant, 16 users, 1 thread
    python -m animind_assets.benchmarks.llm_speed --steps 20 --users 32 --threads 2

Same data as ``benchmarks.llm_linking`` (embedded demo catalog, simulated users, the project's quantizer),
same embedded SmolLM2-135M-Instruct. Every variant trains the **same rows for the same number of steps**
(phase 1 only, batch ``--batch-size``) in this one process, one after the other, so their ratios are
comparable; absolute figures depend on the machine's load, printed before and after.

Fine-tune variants (each adds one change to the one before):

1. ``before``: every transformer block trained, LM head over every position, random batch order
   (the 22 Nov 2026 configuration: 0.29 steps/s at batch 8 on 2 threads).
2. ``+length-grouped batches``: ``group_by_length`` (less padding per batch).
3. ``+LM head at completion positions``: ``fast_loss`` (the 49k-row head only where the loss is taken).
4. ``+top 2 blocks``: ``train_layers=2`` (no backward pass through the 28 frozen blocks; the setting of
   the LM benchmarks; ``finetuned_model``'s demo preset trains the top 4).
5. ``+bf16 autocast``: ``bf16=True`` (the benchmarks' ``--bf16``): matrix products in bfloat16, weights and
   loss in float32. Fast only where the CPU has AMX-BF16 (printed first); elsewhere bf16 is
   emulated and slower.
6. variant 5 with ``gradient_checkpointing=True``: TRL's ``SFTConfig`` default, which every fine-tune used
   until 1 Dec 2026 (the project now passes ``FinetuneConfig.gradient_checkpointing``, default off). With the
   lower blocks frozen it recomputes and back-propagates through all of them. Not in the default list.
7. variant 5 with ``bf16_frozen_weights=False``: autocast casts the float32 weights of the 28 frozen blocks to
   bfloat16 at every step (its cast cache keeps only tensors that require grad). Variant 5 holds them in
   bfloat16 while a phase trains (``lib/llm/finetune.FrozenLinearsInBf16``; the same products). Not in the
   default list: run ``--variants 5,7``.
8. variant 5 with ``train_base_token_rows=False`` (the benchmarks' ``--freeze-base-token-rows``): only the new
   ID-token rows of the tied embedding/head train, as their own parameter
   (``lib/llm/new_token_rows.NewTokenRowsOnly``): no (V, d) gradient, clipping or AdamW update of the ~49k base rows
   at every step. Not the same training (the base rows stay); not in the default list: run ``--variants 5,8``.
9. variant 8 with ``frozen_blocks_no_grad=False``: the 28 frozen blocks run with autograd's normal mode, as before
   3 Dec 2026 (since then they run under ``torch.no_grad`` while a phase trains; the same updates,
   ``lib/llm/block_speed.FrozenBlocksNoGrad``). Not in the default list: run ``--variants 9,8``.
10. variant 8 with ``compile_blocks=True`` (the benchmarks' ``--compile-blocks``): every decoder block compiled
   with ``torch.compile(dynamic=True)`` while a phase trains (``lib/llm/block_speed.CompiledBlocks``); its
   first steps include the compilation, so use ``--steps`` of 40 or more. Not in the default list.

Tokens/s counts the tokens of the training examples (prompt + completion, no padding) per second of
training steps. Beam search: the fine-tuned model of the last variant ranks the top 10 for ``--users``
prompts of the dataset's test rows with both engines of ``lib/llm/infer.rank_items`` (``hf``:
``model.generate`` with ``prefix_allowed_tokens_fn``; ``cached``: the prompt's KV cache shared by the
beams, constrained to the trie of valid IDs), 20 beams; the agreement of the two top-10 lists is printed.
With ``--profile``, a ``torch.profiler`` table (top operators by self CPU time) of 3 training steps of
variant 4, Trainer loop included.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = [
    ("before: every block, full LM head, random order", dict(train_layers=0, fast_loss=False, group_by_length=False)),
    ("+ length-grouped batches", dict(train_layers=0, fast_loss=False, group_by_length=True)),
    ("+ LM head at completion positions", dict(train_layers=0, fast_loss=True, group_by_length=True)),
    ("+ top 2 blocks only (the benchmarks' setting)", dict(train_layers=2, fast_loss=True, group_by_length=True)),
    ("+ bf16 autocast (--bf16)", dict(train_layers=2, fast_loss=True, group_by_length=True, bf16=True)),
    ("5 with gradient checkpointing (TRL's SFTConfig default; on before 1 Dec)",
     dict(train_layers=2, fast_loss=True, group_by_length=True, bf16=True, gradient_checkpointing=True)),
    ("5 with the frozen blocks re-cast to bf16 by autocast at every step (before 2 Dec 2026, evening)",
     dict(train_layers=2, fast_loss=True, group_by_length=True, bf16=True, bf16_frozen_weights=False)),
    ("5 with the base vocabulary's rows frozen (train_base_token_rows=False: the new rows are their own parameter)",
     dict(train_layers=2, fast_loss=True, group_by_length=True, bf16=True, train_base_token_rows=False)),
    ("8 with autograd's normal mode in the frozen blocks (frozen_blocks_no_grad=False: before 3 Dec 2026)",
     dict(train_layers=2, fast_loss=True, group_by_length=True, bf16=True, train_base_token_rows=False,
          frozen_blocks_no_grad=False)),
    ("8 with every decoder block compiled (compile_blocks=True: torch.compile, dynamic shapes)",
     dict(train_layers=2, fast_loss=True, group_by_length=True, bf16=True, train_base_token_rows=False,
          compile_blocks=True)),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "animind_llm_speed"))
    ap.add_argument("--catalog-limit", type=int, default=500)
    ap.add_argument("--users", type=int, default=16, help="test prompts ranked by each beam-search engine")
    ap.add_argument("--n-examples", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=12, help="training steps per variant")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--variants", default="1,2,3,4,5", help="comma list of variant numbers (1-8) to run")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of 3 training steps of --profile-variant")
    ap.add_argument("--profile-variant", type=int, default=4, choices=range(1, len(VARIANTS) + 1),
                    help="variant profiled with --profile (4 = the benchmarks' float32 setting, 5 = bf16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)

    import polars as pl
    import torch

    torch.set_num_threads(args.threads)
    from animind_assets.benchmarks.finetune_mal import build_semantic_ids
    from animind_assets.benchmarks.llm_linking import load_demo
    from animind_assets.lib.llm.data import LlmDataConfig, build_llm_dataset, sid_lookup_frame
    from animind_assets.lib.llm.finetune import FinetuneConfig, codebooks_from_checkpoint, run_finetune
    from animind_assets.lib.common.device import cpu_info
    from animind_assets.lib.llm.infer import make_sid_model, rank_items

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cpus']} logical CPUs); extensions: {', '.join(cpu['extensions']) or '-'}; "
          f"without: {', '.join(cpu['missing']) or '-'}", flush=True)
    cat, inter = load_demo(args.catalog_limit, 100)
    sids, _ = build_semantic_ids(cat, out / "artifacts", "rqvae", 10, out / "cache", log=lambda _m: None)
    ds = build_llm_dataset(cat, inter, sids, LlmDataConfig(n_examples=args.n_examples, seed=args.seed)).frame
    used = set(ds["target_anime_id"].drop_nulls().to_list()) | set(ds["history_anime_ids"].explode().drop_nulls().to_list())
    lookup = sid_lookup_frame(cat, sids).filter(pl.col("anime_id").is_in(list(used)))
    codebooks = codebooks_from_checkpoint(out / "artifacts" / "rqvae_model" / "model.pt")
    print(f"demo catalog {cat.height} anime, dataset {ds.height} rows, {lookup.height} IDs; {args.steps} steps x batch "
          f"{args.batch_size} per variant, {args.threads} thread(s); load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
          flush=True)

    chosen = [int(x) for x in args.variants.split(",") if x.strip()]
    rows = []
    last = None
    for n in chosen:
        label, over = VARIANTS[n - 1]
        cfg = FinetuneConfig(phase1_max_steps=args.steps, phase2_max_steps=0, batch_size=args.batch_size, english_ppl=False,
                             linking_eval_items=0, eval_examples=4, num_threads=args.threads, seed=args.seed, **over)
        res = run_finetune(ds, lookup, cfg, out / f"work{n}", codebooks=codebooks, log=lambda _m: None)
        m = res.metrics
        secs = m["phase1_seconds"]
        rows.append((n, label, m["phase1_steps_done"] / max(secs, 1e-9), m["phase1_tokens_per_s"], secs))
        print(f"variant {n} ({label}): {m['phase1_steps_done']:.0f} steps in {secs:.1f}s, "
              f"{m['phase1_steps_done'] / max(secs, 1e-9):.3f} steps/s, {m['phase1_tokens_per_s']:.1f} tokens/s", flush=True)
        last = res
    base_tps = rows[0][3] if rows else 1.0
    print("\n| # | fine-tune variant | steps/s | tokens/s | x first row |\n|---|---|---|---|---|")
    for n, label, sps, tps, _ in rows:
        print(f"| {n} | {label} | {sps:.3f} | {tps:.1f} | {tps / base_tps:.2f} |")

    if args.profile:
        _profile_default(ds, lookup, codebooks, out, args)

    # beam search: both engines on the same prompts with the last variant's model
    if last is not None and args.users > 0:
        sm = make_sid_model(last.model, last.tokenizer, lookup, last.info)
        test = ds.filter(pl.col("split") == "test").head(args.users)
        prompts = test["prompt"].to_list()
        res_e = {}
        for engine in ("hf", "cached"):
            t0 = time.perf_counter()
            ranked = rank_items(sm, prompts, k=10, num_beams=args.beams, batch_size=4, engine=engine)
            dt = time.perf_counter() - t0
            res_e[engine] = ([[a for a, _ in items] for items in ranked.items], dt)
        agree = sum(len(set(a) & set(b)) for a, b in zip(res_e["hf"][0], res_e["cached"][0])) / max(1, 10 * len(prompts))
        print(f"\n| beam search ({args.beams} beams, top 10, {len(prompts)} users) | seconds | users/s |\n|---|---|---|")
        for engine in ("hf", "cached"):
            print(f"| {engine} | {res_e[engine][1]:.1f} | {len(prompts) / res_e[engine][1]:.2f} |")
        print(f"top-10 overlap between the engines: {agree:.2f} (beam search is approximate; both constrained to valid IDs)")
    load1 = os.getloadavg()
    print(f"load average after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    return 0


def _profile_default(ds, lookup, codebooks, out: Path, args) -> None:
    """3 training steps of variant ``args.profile_variant`` (default 4) inside ``torch.profiler`` (the whole
    Trainer loop: data collation, forward, loss, backward, optimizer); prints the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from animind_assets.lib.llm.finetune import FinetuneConfig, run_finetune

    cfg = FinetuneConfig(phase1_max_steps=3, phase2_max_steps=0, batch_size=args.batch_size, english_ppl=False,
                         linking_eval_items=0, eval_examples=1, num_threads=args.threads, seed=args.seed,
                         **VARIANTS[args.profile_variant - 1][1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_finetune(ds, lookup, cfg, out / "work_profile", codebooks=codebooks, log=lambda _m: None)
    print(f"\nprofile of variant {args.profile_variant} ({VARIANTS[args.profile_variant - 1][0]}; 3 steps + model setup), "
          "top operators by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    sys.exit(main())
