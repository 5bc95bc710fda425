"""The semantic-ID LM on Amazon Beauty, on the evaluation of the Beauty table (``beauty_eval``).

    python -m animind_assets.benchmarks.beauty_llm                          # CPU: 30-minute fine-tune budget, 500 test users
    python -m animind_assets.benchmarks.beauty_llm --train-seconds 300 --test-users 200   # a short CPU run
    python -m animind_assets.benchmarks.beauty_llm --gpu                    # GPU scale: Beauty, then the MAL LM benchmark
    python -m animind_assets.benchmarks.beauty_llm --cpu-recipe --test-users 0   # the best CPU recipe (P, docs/beauty.md), all test users

What it runs (the library functions the assets ``beauty_llm_prep_dataset`` -> ``beauty_finetuned_model``
-> ``beauty_llm_eval`` call):

1. The prepared Beauty split (``../shared/data/beauty``: ``inter.json`` order by default, ``items.csv``
   item words) and semantic IDs: ``--sids reference`` (default, as the TIGER benchmark: tiger-cf's
   ``index_rqkmeans.json``, 3 RQ-KMeans codes + a collision code) or ``--sids own`` (the project's
   quantizer, default preset, on the offline MiniLM vectors of the item words, + TIGER's
   disambiguation level, as ``beauty_semantic_ids`` builds them; the embedding is cached).
   ``--sids sasrec``: collaborative IDs, RQ-KMeans 3x256 (+ collision code) of the item embeddings of a
   saved SASRec (``--sasrec-dir``), as the TIGER benchmark's default.
2. ``build_next_item_dataset``: LC-Rec-style rows (ID <-> item words, next ID from ID history, word
   history -> next ID) from the leave-one-out split; training rows only from prefixes of ``seq[:-2]``.
   ``--next-id-format sequence``: task B written as the ID sequence itself (every item a target given
   its prefix; ``lib/llm/sequence_data.py``).
3. ``run_finetune`` on the embedded SmolLM2-135M-Instruct (two SFT phases), stopped by the wall-clock
   budget ``--train-seconds`` (default 1800 = the issue's 30 minutes; the model at the stop is evaluated).
   ``--distill-weight W`` (with ``--sasrec-dir``): knowledge distillation from that SASRec, or from the mean
   of several (``--teacher-ensemble`` / ``--teacher-sasrec-dir``, below) (``lib/llm/distill.py``): at the ID
   tokens of every item after the first of a "sequence"-form answer, the target is ``(1 - W)`` one-hot + ``W`` x
   the SASRec's next-item softmax as that level's code distribution.
4. ``evaluate_next_item_lm`` on a seeded subset of test users (``--test-users``, the subset
   ``benchmarks.beauty --test-users`` draws): full-catalog beam search constrained to the trie of
   valid IDs, Recall/NDCG@5/10 masked and unmasked with 95% bootstrap intervals, popularity on the
   same users, valid-ID rate.

It prints the table rows (ours), the ratio LM / popularity R@10 (target >= 3x on CPU within a 30-minute
fine-tune), throughput, ``uptime`` load at start and end, the published reference rows separately, and
the protocol. Results go to ``<out>/beauty_llm.json``.

``--train-sasrec``: train that SASRec first (``benchmarks.beauty --models popularity,sasrec`` on the same test
users, budget ``--sasrec-seconds``) into ``<out>/sasrec``; its rows join the table. ``--teacher-ensemble N``
(with it): N SASRecs (seeds ``--seed`` .. ``--seed + N - 1``, the extra ones in ``<out>/sasrec_seed<S>``) and a
distillation teacher that is the mean of their next-item probabilities (``distill.ensemble_teacher``); the IDs still
come from the first. With saved SASRecs: ``--sasrec-dir A --teacher-sasrec-dir B [--teacher-sasrec-dir C ...]``.

``--gpu``: device cuda and the D30 recipe of the CPU runs (``--sids sasrec``, ``--next-id-format sequence``,
``--distill-weight 0.5``; without ``--sasrec-dir`` a SASRec is trained first on the GPU, 90 s budget), every
block trained, batch 32, bf16, a 4-minute fine-tune budget, 20-item prompts, 2,000 test users, no English
perplexity (the MAL part measures it), then
``benchmarks.finetune_mal`` at GPU scale (collaborative IDs, the sequence form with 24-item training rows,
every block trained, batch 32, bf16); estimated at about 10 minutes on one H100/H200-class GPU, not measured
(no GPU was available where this was written). An explicit flag wins over each GPU default; the distillation
default applies only to a run that trains in the sequence form; ``--gpu --model-dir`` evaluates only (no MAL).

``--cpu-recipe``: the best CPU recipe measured (``docs/beauty.md``: the plain one command
``--cpu-recipe --test-users 0`` at its default ``--seed 0``, P (session 35), 3.03x popularity's R@10 on all 22,363
test users (0.0540, 13 hits over the 3x line) with 4,598 steps in the 30 minutes; I2, the same flags on the same
SASRec, 3.03x with 4,342 steps; since session 34 the top 4 blocks are trained with input-side ID rows
(``--train-layers 4 --id-input-rows``); before them X1, the one command at its default seed, 2.94x with 4,734 steps; C2, 3.26x with 5,139 steps,
its SASRec trained apart with ``benchmarks.beauty``'s default seed 42 and RQ-KMeans seed 0; the one command with
``--seed 1`` (C3: SASRec and RQ-KMeans seed 1) 2.81x; C1, the same flags on
a host that ran half the steps, 2.97x; Z1, without compiled blocks: 2.85x): collaborative IDs of a SASRec trained first (``--train-sasrec``, unless ``--sasrec-dir``), the sequence form
with 20-item rows and 9-token prompts (no system prompt, instruction ``IDs:``, no chat template), 30 phase-1 steps,
phase-2 mix 0.1/0.8/0.1, lr 2e-3 falling to 0 over the last 25 % of the 30-minute budget, distillation from the
SASRec at 0.8, the base vocabulary's rows frozen, the top 4 decoder blocks trained (``--train-layers 4``) with
input-side ID rows (``--id-input-rows``), the decoder blocks compiled while training (``--compile-blocks``;
needs a C++ compiler), 2 threads, bf16 autocast where the CPU has AMX-BF16, the search in
bf16 in 2 processes of 1 thread each (``--eval-processes 2``), training rows drawn with replacement as in Z1
(``--row-sampling replacement``; the library's default is rows in passes, measured as P1: the same 2.85x on all
test users). An explicit flag wins over each of these.

``--eval-processes N`` (CPU): the search runs in N spawned processes of ``--threads / N`` threads each, merged into
one table (``sequence_eval.evaluate_saved_model_in_processes``); on a 2-core CPU two 1-thread processes searched
about twice as many users/s as one 2-thread process.

``--model-dir DIR``: evaluate a saved ``beauty_finetuned_model`` folder (e.g. on more ``--test-users``) without
fine-tuning; the IDs and the task-B form the flags build must be the folder's.

``--shard I/N`` (with ``--model-dir``): evaluate only shard I (0-based) of N of the seeded test users
(``evaluation.shard_rows``: every N-th user), one ``--out`` per shard, on as many processes or machines as there are
shards; then ``--merge-ranks OUT0 OUT1 ...`` checks that the shards are one evaluation (same folder, users, seed,
beams, masking, dtype; each shard once, every seeded user once) and prints the table of all of them, with the same
means and bootstrap intervals an unsharded run reports (``sequence_eval.merge_shard_ranks``)::

    python -m animind_assets.benchmarks.beauty_llm --cpu-recipe --model-dir M --test-users 0 --threads 1 --shard 0/2 --out /tmp/s0 &
    python -m animind_assets.benchmarks.beauty_llm --cpu-recipe --model-dir M --test-users 0 --threads 1 --shard 1/2 --out /tmp/s1
    wait; python -m animind_assets.benchmarks.beauty_llm --merge-ranks /tmp/s0 /tmp/s1 --out /tmp/all
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from animind_assets.lib.llm.finetune_config import (
    add_distill_temperature_flags, add_row_sampling_flag, task_weight_flags_error, task_weights_from_text,
)
from animind_assets.quiet import VERBOSE_HELP

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_avg() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # pragma: no cover - uptime missing
        return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# C1/C2/C3/X1 (docs/beauty.md, 3-4 Dec 2026, sessions 26-31): R@10 2.97x (2,570 steps) / 3.26x, 2.81x, 2.94x (~5,000 steps, a faster host)
# popularity on all test users after a 30-minute fine-tune on 2 CPU threads = Z1's recipe (2.85x) with the decoder
# blocks compiled (1.35x the steps on the same host); with the top 4 blocks + input-side ID rows (sessions 34-35):
# I2 3.03x, P (the plain one command) 3.03x
CPU_RECIPE = {
    "sids": "sasrec", "next_id_format": "sequence", "max_history": 20, "phase1_steps": 30, "phase2_steps": 8000,
    "phase2_weights": "0.1,0.8,0.1", "lr": 2e-3, "lr_decay_frac": 0.25, "distill_weight": 0.8, "threads": 2,
    "system_prompt": "", "sequence_instruction": "IDs:", "no_chat_template": True, "freeze_base_token_rows": True,
    "eval_dtype": "bfloat16", "train_seconds": 1800.0, "row_sampling": "replacement", "eval_processes": 2,
    "compile_blocks": True, "train_layers": 4, "id_input_rows": True,
}


def _fmt(value, spec: str) -> str:
    """``format(value, spec)`` for a number; ``-`` where the metric was not measured (None)."""
    return "-" if value is None else format(float(value), spec)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""


def _shard_arg(text: str) -> tuple[int, int]:
    """``--shard I/N`` -> (I, N), 0 <= I < N (argparse type)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 0/2") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need N >= 1 and 0 <= I < N")
    return i, n


def _given_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """Destinations written on the command line, also those equal to their default (parsed again without defaults)."""
    import copy

    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def parse_args(argv=None) -> argparse.Namespace:
    from animind_assets.lib.llm.infer import INFERENCE_DTYPE_HELP, INFERENCE_DTYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "animind_beauty_llm"),
                   help="results folder: beauty_llm.json, ranks.parquet, the model folder")
    p.add_argument("--data", default="", help="prepared split folder ('' = ../shared/data/beauty)")
    p.add_argument("--order", default="inter_json", choices=["inter_json", "user_sequence"],
                   help="sequence order: inter.json (tiger-cf, chronological) or user_sequence.txt")
    p.add_argument("--sids", default="reference", choices=["reference", "own", "sasrec"],
                   help="reference: tiger-cf index_rqkmeans.json; own: project quantizer on MiniLM vectors of the item words; "
                        "sasrec: collaborative IDs, RQ-KMeans 3x256 of the item embeddings of --sasrec-dir (as TIGER's "
                        "collaborative partition)")
    p.add_argument("--sasrec-dir", default="", help="with --sids sasrec: a saved SASRec (benchmarks.beauty --models sasrec "
                   "writes <out>/sasrec_model)")
    p.add_argument("--next-id-format", default="question", choices=["question", "sequence"],
                   help="task B: 'question' (history IDs in the prompt, one target per row) or 'sequence' (the ID sequence "
                        "is the answer, every item a target given its prefix)")
    p.add_argument("--sequence-window", type=int, default=0, help="'sequence' form: items per training row (0 = max_history + 1)")
    p.add_argument("--system-prompt", default=None, help="system message of every row (default: SeqLlmDataConfig's)")
    p.add_argument("--sequence-instruction", default="",
                   help="'sequence' form: the fixed task-B prompt ('' = SeqLlmDataConfig's default sentence)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="render prompts as plain '### Question: / ### Answer:' text (FinetuneConfig.use_chat_template false; "
                        "SmolLM2's template adds its own system prompt when the system message is empty)")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "animind_bench"),
                   help="cache of the item-word embeddings (--sids own)")
    p.add_argument("--n-examples", type=int, default=60000, help="training rows generated (A+B+C, before dedup)")
    p.add_argument("--max-history", type=int, default=10, help="items shown as IDs in a next-ID prompt (--gpu: 20, as TIGER)")
    p.add_argument("--title-history", type=int, default=5, help="items shown as words in a word-history prompt")
    p.add_argument("--base-model", default="", help="'' = the embedded SmolLM2-135M-Instruct")
    p.add_argument("--train-seconds", type=float, default=1800.0, help="wall-clock budget of the whole fine-tune")
    p.add_argument("--phase1-steps", type=int, default=60, help="steps of phase 1 (ID <-> item words linking)")
    p.add_argument("--phase2-steps", type=int, default=3000, help="upper bound (rows for it are drawn and tokenized up "
                   "front); the time budget usually stops first")
    p.add_argument("--linking-items", type=int, default=10, help="items per direction for ID <-> words accuracy (0 = off)")
    p.add_argument("--phase1-weights", default="0.8,0.1,0.1", help="phase-1 task mix A,B,C (ID<->words, next ID, words history)")
    p.add_argument("--phase2-weights", default="0.1,0.7,0.2", help="phase-2 task mix A,B,C")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warm-start", default="rqvae", choices=["rqvae", "projection", "centroid", "mean", "none"],
                   help="new ID rows: rqvae = ridge from the codebooks to the item words (title centroids without "
                        "codebooks); projection = the codebooks projected into the token space (--sids sasrec/own)")
    p.add_argument("--phase1-new-rows-lr-mult", type=float, default=1.0, help="learning-rate multiplier of the new ID rows, phase 1")
    p.add_argument("--phase2-new-rows-lr-mult", type=float, default=1.0, help="the same, phase 2")
    p.add_argument("--train-sasrec", action="store_true",
                   help="first train a SASRec with benchmarks.beauty (--models popularity,sasrec, the same test users) into "
                        "<out>/sasrec and use <out>/sasrec/sasrec_model as --sasrec-dir; its rows join the LM table")
    p.add_argument("--sasrec-seconds", type=float, default=2400.0,
                   help="with --train-sasrec: its training budget; early stopping on validation NDCG@10 usually ends it first "
                        "(5-9 min on 2 CPU threads, 3 Dec 2026) (--gpu: 90)")
    p.add_argument("--sasrec-early-stop", default="ndcg@10", choices=["ndcg@10", "nll"],
                   help="with --train-sasrec: the SASRec's early-stopping metric on its validation users (benchmarks.beauty "
                        "--sasrec-early-stop): masked NDCG@10, or the held-out items' NLL under its softmax (the "
                        "distribution the LM is distilled from)")
    p.add_argument("--teacher-ensemble", type=int, default=1,
                   help="with --train-sasrec and --distill-weight: train this many SASRecs (seeds --seed, --seed + 1, ...; the "
                        "extra ones into <out>/sasrec_seed<S>; N x the SASRec time, each member early-stopped on "
                        "its own seed's validation users) and distil from the mean of their next-item probabilities "
                        "(lib/llm/distill.ensemble_teacher); the IDs still come from the first")
    p.add_argument("--teacher-sasrec-dir", action="append", default=[], metavar="DIR",
                   help="with --sasrec-dir and --distill-weight: one more saved SASRec (repeatable) whose next-item "
                        "probabilities are averaged with --sasrec-dir's into the teacher; the IDs still come from --sasrec-dir")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="knowledge distillation from the SASRec of --sasrec-dir, or the mean of several with "
                        "--teacher-ensemble / --teacher-sasrec-dir (lib/llm/distill.py): weight of its next-item "
                        "softmax in the targets of the sequence form's ID tokens (0 = off)")
    add_distill_temperature_flags(p, 1.0, "the teacher's logits")
    p.add_argument("--sid-softmax", action="store_true",
                   help="semantic-ID targets normalised over the ID tokens only (FinetuneConfig.sid_softmax; the "
                        "evaluation's beam search scores them the same way)")
    p.add_argument("--freeze-base-token-rows", action="store_true",
                   help="only the new ID-token rows of the tied embedding/head train, the base vocabulary's stay "
                        "(FinetuneConfig.train_base_token_rows false; with the top blocks trained the new rows are their own "
                        "parameter: no dense gradient or optimizer state for the ~49k base rows)")
    p.add_argument("--replay-ratio", type=float, default=0.0,
                   help="English-retention replay share of each phase's rows: answers the base model writes itself for the "
                        "shipped general prompts (FinetuneConfig.replay_ratio; 0 = off)")
    p.add_argument("--replay-prompts", type=int, default=0, help="shipped replay prompts used (0 = all 150)")
    add_row_sampling_flag(p)
    p.add_argument("--lr-decay-frac", type=float, default=0.0,
                   help="the learning rate falls linearly to 0 over the last fraction of --train-seconds (warmup-stable-decay "
                        "over time; FinetuneConfig.lr_decay_frac; 0 = constant after warm-up)")
    p.add_argument("--compile-blocks", action="store_true",
                   help="torch.compile each decoder block while a phase trains (FinetuneConfig.compile_blocks; ~1 min of "
                        "compilation inside --train-seconds, needs a C++ compiler)")
    p.add_argument("--id-input-rows", action=argparse.BooleanOptionalAction, default=False,
                   help="each new ID token also gets a trained input-side row added at the first trained block "
                        "(FinetuneConfig.id_input_rows; needs 0 < --train-layers < the block count; set by --cpu-recipe)")
    p.add_argument("--batch-size", type=int, default=8, help="training rows per step")
    p.add_argument("--max-seq-length", type=int, default=192, help="tokens per training row (longer rows are skipped, counted)")
    p.add_argument("--train-layers", type=int, default=2, help="top blocks trained + embeddings/head (0 = all)")
    p.add_argument("--keep-layers", type=int, default=0,
                   help="layer pruning: keep the first N-1 blocks of the base model and its last (0 = all 30; FinetuneConfig.keep_layers)")
    p.add_argument("--test-users", type=int, default=500, help="seeded subset of test users (0 = all 22,363)")
    p.add_argument("--beams", type=int, default=20, help="beam width of the constrained search (>= 10: the top 10 are read from it)")
    p.add_argument("--masking", default="filter", choices=["filter", "trie"],
                   help="history items: filter = dropped from the beam list (TIGER's rule); trie = never generated")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the 95%% intervals")
    p.add_argument("--seed", type=int, default=0,
                   help="user subset / bootstrap seed (as benchmarks.beauty); also seeds the RQ-KMeans of --sids sasrec and "
                        "the SASRec of --train-sasrec")
    p.add_argument("--finetune-seed", type=int, default=42,
                   help="seed of the fine-tune (FinetuneConfig.seed: row draws, data order, new-row init); apart from --seed "
                        "so that a run can repeat the same IDs and teacher with another fine-tune")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (split over --eval-processes in the search)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast during training on CPU (fast only on CPUs with AMX-BF16, 0.61x float32 measured with AVX512-BF16 alone; --gpu sets it)")
    p.add_argument("--eval-dtype", default="float32", choices=list(INFERENCE_DTYPES),
                   help=f"{INFERENCE_DTYPE_HELP}; printed with the protocol (lib/llm/infer.load_sid_model)")
    p.add_argument("--model-dir", default="",
                   help="evaluate this saved beauty_finetuned_model folder (e.g. <out>/beauty_finetuned_model of an earlier "
                        "run, on more --test-users) instead of fine-tuning; the dataset flags must be that run's (its "
                        "IDs are checked against the folder's sid_lookup.parquet)")
    p.add_argument("--shard", type=_shard_arg, default=(0, 1), metavar="I/N",
                   help="with --model-dir: evaluate only shard I (0-based) of N of the seeded test users (every N-th), "
                        "e.g. one process per core; merge the shards' --out folders with --merge-ranks")
    p.add_argument("--eval-processes", type=int, default=1,
                   help="CPU: search the test users in this many spawned processes of --threads / N threads each, merged "
                        "into one table (sequence_eval.evaluate_saved_model_in_processes; --cpu-recipe: 2)")
    p.add_argument("--merge-ranks", nargs="+", default=[], metavar="OUT",
                   help="merge the --out folders of the --shard I/N runs of one evaluation into one table (written to "
                        "--out); nothing is trained or searched")
    p.add_argument("--gpu", action="store_true", help="GPU scale (see the module docstring), then the MAL LM benchmark")
    p.add_argument("--skip-mal", action="store_true", help="with --gpu: Beauty only")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("--cpu-recipe", action="store_true",
                   help="the best CPU recipe measured (P: 3.03x popularity, docs/beauty.md; see the module docstring); explicit flags win")
    args = p.parse_args(argv)
    args.shard, args.num_shards = args.shard
    if args.merge_ranks:
        if args.num_shards > 1 or args.model_dir or args.gpu or args.cpu_recipe:
            p.error("--merge-ranks only reads the shards' folders: leave out --shard, --model-dir, --gpu and --cpu-recipe")
        return args
    if args.eval_processes < 1:
        p.error("--eval-processes must be >= 1")
    if args.num_shards > 1 and not args.model_dir:
        p.error(f"--shard {args.shard}/{args.num_shards} evaluates a saved model: add --model-dir (each shard would "
                "otherwise fine-tune a model of its own)")
    weights_error = task_weight_flags_error(args.phase1_weights, args.phase2_weights)
    if weights_error:
        p.error(weights_error)
    if args.beams < 10:
        p.error(f"--beams {args.beams}: Recall@10 / NDCG@10 read the top 10 of the beams, so at least 10")
    if args.test_users < 0 or args.threads < 1:
        p.error("--test-users must be >= 0 (0 = all test users) and --threads >= 1")
    given = _given_flags(p, argv)  # what the command line wrote (a preset fills only the rest)

    def _preset(k):  # " (set by <preset>)" for a value a preset filled in, for error messages
        return "" if k in given else " (set by --cpu-recipe)" if args.cpu_recipe else " (set by --gpu)" if args.gpu else ""
    if args.cpu_recipe:
        if args.gpu:
            p.error("--cpu-recipe and --gpu are two recipes: pick one")
        if args.next_id_format == "question" and "next_id_format" in given:
            p.error("--cpu-recipe is a sequence-form recipe (its prompts, distillation and rows): drop "
                    "--next-id-format question, or use the plain flags without --cpu-recipe")
        if args.data and not args.sasrec_dir and not args.model_dir:
            p.error("--cpu-recipe with --data: its IDs and teacher come from a SASRec trained on that split; train one "
                    "(benchmarks.beauty --data ...) and pass --sasrec-dir")
        for k, v in CPU_RECIPE.items():
            if k not in given:
                setattr(args, k, v)
        if "bf16" not in given:  # bf16 autocast pays only with AMX-BF16 (0.61x float32 with AVX512-BF16 alone)
            from animind_assets.lib.common.device import cpu_info

            args.bf16 = "AMX-BF16" in cpu_info()["extensions"]
        if not args.sasrec_dir and not args.model_dir:
            args.train_sasrec = True
        if args.model_dir and "distill_weight" not in given:
            args.distill_weight = 0.0  # evaluation only: nothing is distilled
    if args.gpu:
        gpu_defaults = {"train_seconds": 240.0, "batch_size": 32, "train_layers": 0, "test_users": 2000, "phase1_steps": 200,
                        "n_examples": 200000, "threads": 8, "max_history": 20, "phase2_steps": 8000, "linking_items": 30,
                        "sids": "sasrec", "next_id_format": "sequence"}
        for k, v in gpu_defaults.items():
            if k not in given:
                setattr(args, k, v)
        # the D30 recipe: distillation from a SASRec trained first (also the IDs' source), where it applies: a run that
        # trains (not --model-dir) on the shared split (not --data) in the sequence form
        if not args.model_dir and args.next_id_format == "sequence":
            for k, v in {"distill_weight": 0.5, "sasrec_seconds": 90.0}.items():
                if k not in given:
                    setattr(args, k, v)
        if not args.sasrec_dir and not args.model_dir and (args.sids == "sasrec" or args.distill_weight > 0):
            if args.data:
                p.error("--gpu with --data: pass --sasrec-dir (a SASRec trained on that split), or --sids reference "
                        "--distill-weight 0")
            args.train_sasrec = True
    if args.sequence_instruction and args.next_id_format != "sequence":
        p.error("--sequence-instruction is the sequence form's prompt: add --next-id-format sequence")
    if args.distill_weight > 0 and args.next_id_format != "sequence":
        p.error(f"--distill-weight {args.distill_weight:g} distils the sequence form: add --next-id-format sequence")
    if args.num_shards > 1 and args.eval_processes > 1:
        if "eval_processes" in _given_flags(p, argv):
            p.error("--shard runs one shard in this process: leave out --eval-processes (or run more shards)")
        args.eval_processes = 1  # the recipe's 2 processes would shard the shard
    if args.keep_layers < 0 or args.train_layers < 0:
        p.error("--keep-layers and --train-layers must be >= 0")
    if args.lr_decay_frac and args.train_seconds <= 0:
        p.error("--lr-decay-frac decays over the wall-clock budget: set --train-seconds > 0")
    if args.teacher_ensemble < 1:
        p.error("--teacher-ensemble must be >= 1 (1 = one SASRec)")
    extra_teachers = args.teacher_ensemble > 1 or bool(args.teacher_sasrec_dir)
    trained_by = " (set by --cpu-recipe without --sasrec-dir)" if args.cpu_recipe else " (set by --gpu)" if args.gpu else ""
    if extra_teachers and args.model_dir:
        p.error("--model-dir evaluates a trained folder: --teacher-ensemble / --teacher-sasrec-dir build a fine-tune's "
                "teacher and do not apply")
    if extra_teachers and args.distill_weight <= 0:
        p.error("--teacher-ensemble / --teacher-sasrec-dir build the distillation teacher: "
                + ("set --distill-weight > 0" if args.next_id_format == "sequence" else
                   "it distils the sequence form: add --next-id-format sequence and --distill-weight > 0"))
    if args.teacher_ensemble > 1 and not args.train_sasrec:
        p.error("--teacher-ensemble trains the extra SASRecs beside the one --train-sasrec trains; with --sasrec-dir "
                "pass each extra saved one as --teacher-sasrec-dir")
    if args.teacher_sasrec_dir and args.train_sasrec:
        p.error(f"--teacher-sasrec-dir adds saved SASRecs to --sasrec-dir's, but this run trains its own "
                f"(--train-sasrec{trained_by}): pass --sasrec-dir too, or use --teacher-ensemble N instead")
    if args.teacher_sasrec_dir and not args.sasrec_dir:
        p.error("--teacher-sasrec-dir adds saved SASRecs to --sasrec-dir's: pass --sasrec-dir too")
    if args.teacher_sasrec_dir:
        resolved = [Path(d).resolve() for d in [args.sasrec_dir, *args.teacher_sasrec_dir]]
        twice = sorted({str(d) for d in resolved if resolved.count(d) > 1})
        if twice:
            p.error(f"the teacher would count the same SASRec twice ({', '.join(twice)}): pass each folder once "
                    "(--sasrec-dir and every --teacher-sasrec-dir)")
    if args.train_sasrec and args.sasrec_dir:
        p.error("--train-sasrec writes <out>/sasrec/sasrec_model: leave --sasrec-dir out, or drop --train-sasrec")
    if args.model_dir and (args.train_sasrec or args.distill_weight > 0):
        p.error("--model-dir evaluates a trained folder: --train-sasrec and --distill-weight do not apply")
    if args.train_sasrec and args.data:
        p.error("--train-sasrec trains on ../shared/data/beauty (benchmarks.beauty); with --data, train the SASRec on that "
                "split yourself and pass --sasrec-dir")
    if args.id_input_rows and not args.model_dir:  # rows need frozen blocks below the trained ones: refused before
        # the SASRec, the data and the base model (minutes) rather than at the fine-tune's start
        from animind_assets.lib.llm.base_model import block_count
        from animind_assets.lib.llm.finetune_config import EMBEDDED_MODEL, blocks_after_pruning

        # the base's config (GGUF header / config.json, no weights; None for a hub id not in the local cache)
        blocks = block_count(args.base_model or EMBEDDED_MODEL) if args.train_layers > 0 else None
        n = blocks_after_pruning(args.keep_layers, blocks)
        limit = ("the block count" if n is None else f"the base model's {n} blocks" if n == blocks
                 else f"--keep-layers {n}{_preset('keep_layers')}")
        if args.train_layers == 0 or (n is not None and args.train_layers >= n):
            p.error(f"--id-input-rows{_preset('id_input_rows')} adds rows below the trained blocks, so --train-layers "
                    f"{args.train_layers}{_preset('train_layers')} must be > 0 and below {limit}: pass "
                    f"--no-id-input-rows, or --train-layers N with 0 < N < {'the block count' if n is None else n}")
    try:  # FinetuneConfig's own checks (e.g. --replay-ratio in [0, 1)) before any data is read
        build_finetune_config(args).validate()
    except ValueError as exc:
        p.error(f"fine-tune flags: {exc}")
    if args.sids == "sasrec" and not args.sasrec_dir and not args.train_sasrec:
        recipe = " (set by --cpu-recipe)" if args.cpu_recipe else " (set by --gpu)" if args.gpu else ""
        p.error(f"--sids sasrec{recipe} builds the IDs from a SASRec's item embeddings: pass --sasrec-dir (with "
                "--model-dir: the SASRec that run used, e.g. <its out>/sasrec/sasrec_model)")
    return args


def load_sids(args, items, log):
    import numpy as np
    import polars as pl

    from animind_assets.lib.data.amazon import beauty_dir
    from animind_assets.lib.semantic_ids.assign import assign_semantic_ids, semantic_id_strings

    ids = items["item_id"].to_numpy()
    if args.sids == "sasrec":
        from animind_assets.lib.retrieval.sasrec import load_sasrec, sasrec_item_vectors
        from animind_assets.lib.retrieval.tiger_data import rqkmeans_ids

        try:
            vec = sasrec_item_vectors(load_sasrec(args.sasrec_dir)[0])
        except FileNotFoundError as exc:
            raise SystemExit(f"--sids sasrec needs --sasrec-dir with a saved SASRec ({exc}); run: python -m "
                             "animind_assets.benchmarks.beauty --models sasrec --out DIR, then pass DIR/sasrec_model") from None
        if vec.shape[0] != len(ids) or not (ids == np.arange(len(ids))).all():
            raise ValueError(f"{args.sasrec_dir}: {vec.shape[0]} item vectors for {len(ids)} items (item ids must be 0..N-1)")
        full, stats, books = rqkmeans_ids(vec, seed=args.seed, log=log, with_codebooks=True)
        codebooks = books if args.warm_start == "projection" else None  # rqvae: title centroids, as before (R1)
        note = f"collaborative IDs: RQ-KMeans 3x256 of the SASRec item embeddings of {args.sasrec_dir} + collision code ({stats})"
    elif args.sids == "reference":
        from animind_assets.lib.retrieval.tiger_data import load_reference_index

        path = (Path(args.data) if args.data else beauty_dir()) / "index_rqkmeans.json"
        mapping = load_reference_index(path)
        full = np.array([mapping[int(i)] for i in ids], dtype=np.int64)
        note = f"reference IDs {path.name} (tiger-cf RQ-KMeans 3x256 + collision code; LLaMA-7B text embeddings)"
        codebooks = None
    else:
        from animind_assets.benchmarks.semantic_ids import embed
        from animind_assets.lib.semantic_ids.quantizers import preset_config, train_quantizer
        from animind_assets.lib.llm.warm_start import codebooks_from_checkpoint

        texts = [t if t else f"Amazon beauty product {a}" for t, a in zip(items["text"].to_list(), items["asin"].to_list())]
        x = embed(texts, Path(args.cache_dir), log=log)
        cfg = preset_config("default", num_threads=args.threads)
        ckpt = Path(args.out) / "quantizer"
        res = train_quantizer(x, cfg, checkpoint_dir=str(ckpt))
        full = assign_semantic_ids(res.codes, order_key=ids)
        note = f"own IDs: {cfg.quantizer} {cfg.levels}x{cfg.codebook_size} on MiniLM vectors of the item words + disambiguation"
        codebooks = codebooks_from_checkpoint(str(ckpt / "model.pt"))
    sids = pl.DataFrame({"item_id": ids, "semantic_id": semantic_id_strings(full)}, schema={"item_id": pl.Int64, "semantic_id": pl.Utf8})
    if sids["semantic_id"].n_unique() != sids.height:
        raise ValueError(f"{note}: semantic IDs are not unique")
    return sids, note, codebooks


def _finetune(args, fcfg, ds, lookup, items, codebooks, out: Path, log):
    """The fine-tune (with the SASRec teacher when ``--distill-weight``) into ``<out>/beauty_finetuned_model``;
    -> (folder, metrics, stop reason, warm-start mode, seconds)."""
    from animind_assets.lib.llm.finetune import run_finetune, save_model_folder

    teacher, teacher_fp = None, ""
    if args.distill_weight > 0:
        if not args.sasrec_dir:
            raise SystemExit("--distill-weight needs --sasrec-dir (the teacher): python -m animind_assets.benchmarks.beauty "
                             "--models sasrec --out DIR, then pass DIR/sasrec_model")
        dirs = [args.sasrec_dir, *args.teacher_sasrec_dir]
        teacher, teacher_fp = sasrec_teacher(dirs, items.height)
        t_text = (f"T {args.distill_temperature:g}" if args.distill_temperature else
                  f"T fitted on the {args.distill_temperature_fit} rows")
        what = (f"SASRec of {dirs[0]}" if len(dirs) == 1 else
                f"the mean next-item probabilities of {len(dirs)} SASRecs ({', '.join(dirs)})")
        log(f"distillation teacher: {what} (weight {args.distill_weight}, {t_text})")
    t0 = time.perf_counter()
    ft = run_finetune(ds.frame, lookup, fcfg, out / "work", codebooks=codebooks, special_tokens=(), log=log,
                      teacher=teacher, teacher_items=items.height, teacher_fingerprint=teacher_fp)
    ft_seconds = time.perf_counter() - t0
    model_dir = out / "beauty_finetuned_model"
    if model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    save_model_folder(ft, lookup, model_dir)
    m = ft.metrics
    log(f"fine-tune: {int(m.get('total_steps', 0))} steps in {ft_seconds:.0f}s ({ft.info['stop_reason']}); phase2 {m.get('phase2_tokens_per_s', 0):.0f} "
        f"tokens/s; val loss {_fmt(m.get('phase2_val_loss'), '.3f')}; English ppl ratio {_fmt(m.get('english_ppl_ratio'), '.2f')}")
    stop_reason = ft.info["stop_reason"]
    ws_mode = ft.warm_start.mode if ft.warm_start else "none"
    return model_dir, m, stop_reason, ws_mode, ft_seconds


def sasrec_teacher(dirs: list[str], n_items: int):
    """The distillation teacher of saved SASRec folders ``dirs`` (``benchmarks.beauty``'s ``sasrec_model``), with
    its fingerprint: ``distill.model_teacher`` of the loaded models (one SASRec's logits, or the mean of several's
    next-item probabilities; for one folder the fingerprint of earlier runs, for several an order-free one).
    Raises ``SystemExit`` naming the folder when a SASRec scores other than ``n_items`` items."""
    from animind_assets.lib.llm.distill import model_teacher
    from animind_assets.lib.retrieval.sasrec import load_sasrec

    members = []
    for d in dirs:
        sas = load_sasrec(d)[0]
        if sas.n_items != n_items:
            raise SystemExit(f"SASRec {d} scores {sas.n_items} items, the split has {n_items}")
        members.append(sas)
    return model_teacher(members)


def _train_teacher_members(args, out: Path) -> list[str]:
    """``--teacher-ensemble N``: train the N - 1 extra SASRecs, seeds ``--seed + 1`` .. ``--seed + N - 1``, each into
    ``out/sasrec_seed<S>`` with :func:`_train_sasrec`; -> their saved models' folders, in seed order (none for N = 1).
    Raises ``SystemExit`` as :func:`_train_sasrec` does."""
    dirs = []
    for k in range(1, args.teacher_ensemble):
        seed = args.seed + k
        print(f"\n=== SASRec, teacher member {k + 1} of {args.teacher_ensemble} (seed {seed}): benchmarks.beauty", flush=True)
        dirs.append(_train_sasrec(args, out / f"sasrec_seed{seed}", seed, "sasrec"))
    return dirs


def _train_sasrec(args, sas_out: Path, seed: int, models: str) -> str:
    """``--train-sasrec`` / ``--teacher-ensemble``: ``benchmarks.beauty --models <models>`` with this run's test users,
    threads, order, budget and device and ``seed``, into ``sas_out``; -> the saved model's folder
    (``<sas_out>/sasrec_model``). SystemExit when it fails or saves no model."""
    from animind_assets.benchmarks import beauty as beauty_bench

    rc = beauty_bench.main(["--models", models, "--out", str(sas_out), "--test-users", str(args.test_users),
                            "--seed", str(seed), "--threads", str(args.threads), "--order", args.order,
                            "--sasrec-seconds", str(args.sasrec_seconds), "--sasrec-early-stop", args.sasrec_early_stop,
                            *(["--gpu"] if args.gpu else [])])
    if rc != 0 or not (sas_out / "sasrec_model").is_dir():
        raise SystemExit(f"SASRec (seed {seed}): benchmarks.beauty returned {rc} without {sas_out / 'sasrec_model'}")
    return str(sas_out / "sasrec_model")


def _saved_folder(args, lookup, log, dcfg: SeqLlmDataConfig | None = None):
    """``--model-dir``: a trained folder whose IDs, task-B form and prompts (system message, chat template, the
    sequence form's instruction; ``dcfg`` = the data config the flags build) must equal those these flags build; its
    own settings (blocks, batch, distillation, base) replace the flags' in ``args`` for the report; -> (folder, its
    metrics, stop reason, warm-start mode). SystemExit when any of them differs (another run's flags or split)."""
    from animind_assets.lib.llm.id_input_rows import check_saved, saved_entry
    from animind_assets.lib.llm.model_folder import read_folder_files
    from animind_assets.lib.llm.sequence_data import SeqLlmDataConfig, sequence_prompt

    dcfg = dcfg or SeqLlmDataConfig(next_id_format=args.next_id_format)
    system_prompt = dcfg.system_prompt

    folder = Path(args.model_dir)
    info, saved = read_folder_files(folder)
    ours = dict(zip(lookup["anime_id"].to_list(), lookup["semantic_id"].to_list()))
    theirs = dict(zip(saved["anime_id"].to_list(), saved["semantic_id"].to_list()))
    if ours != theirs:
        differ = sum(ours.get(k) != v for k, v in theirs.items()) + len(set(ours) - set(theirs))
        raise SystemExit(f"--model-dir {folder}: its sid_lookup.parquet differs from the IDs these flags build ({differ} "
                         "items): pass the flags of the run that trained it")
    trained_form = info.get("next_id_format", "question")
    if trained_form != args.next_id_format:
        raise SystemExit(f"--model-dir {folder}: trained on task B's {trained_form!r} form, these flags build the "
                         f"{args.next_id_format!r} form: pass --next-id-format {trained_form}")
    ours_prompt = {"use_chat_template": not getattr(args, "no_chat_template", False), "system_prompt": system_prompt,
                   **({"sequence_prompt": sequence_prompt(dcfg)} if trained_form == "sequence" else {})}
    theirs_prompt = {k: info.get(k, True if k == "use_chat_template" else "") for k in ours_prompt}
    if ours_prompt != theirs_prompt:
        raise SystemExit(f"--model-dir {folder}: trained with prompts {theirs_prompt}, these flags build {ours_prompt}: "
                         "pass --system-prompt / --sequence-instruction / --no-chat-template as that run did")
    cfg = info.get("config") or {}  # the folder's own settings replace the flags' in what is printed and saved
    for k in ("train_layers", "keep_layers", "batch_size", "distill_weight", "distill_temperature", "bf16", "base_model",
              "replay_ratio", "row_sampling"):
        if k in cfg:
            setattr(args, k, cfg[k])
    try:  # input-side ID rows: what the folder holds (not a recipe's flag), checked before any search starts
        entry = saved_entry(folder, info)
        if entry is not None:
            check_saved(folder, entry)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--model-dir {folder}: {exc}") from exc
    args.id_input_rows = entry is not None
    if cfg:  # folders from before these fields: rows drawn with replacement, base rows as the folder's config says
        args.row_sampling = cfg.get("row_sampling", "replacement")
        args.freeze_base_token_rows = not cfg.get("train_base_token_rows", True)
    args.sid_softmax = bool(info.get("sid_softmax", False))  # how the folder scores IDs (older folders: full vocabulary)
    m = dict(info.get("metrics") or {})
    log(f"--model-dir {folder}: {int(m.get('total_steps', 0))} steps trained there; evaluating only")
    ws = info.get("warm_start") if isinstance(info.get("warm_start"), dict) else {}
    return folder, m, f"--model-dir: trained there, {info.get('stop_reason', '?')}", str(ws.get("mode", "n/a"))


def build_finetune_config(args: argparse.Namespace):
    """The ``FinetuneConfig`` (``lib/llm/finetune_config.py``) of the parsed command line ``args``: every fine-tune flag
    maps to one field (the same fields the asset ``beauty_finetuned_model`` shows in the launchpad)."""
    from animind_assets.lib.llm.finetune_config import FinetuneConfig

    w1 = task_weights_from_text(args.phase1_weights, "--phase1-weights")
    w2 = task_weights_from_text(args.phase2_weights, "--phase2-weights")
    return FinetuneConfig(
        **({"base_model": args.base_model} if args.base_model else {}),
        train_layers=args.train_layers, keep_layers=args.keep_layers, phase1_max_steps=args.phase1_steps, phase2_max_steps=args.phase2_steps,
        phase1_weights=w1, phase2_weights=w2, phase1_lr=args.lr, phase2_lr=args.lr, batch_size=args.batch_size,
        max_seq_length=args.max_seq_length, num_threads=args.threads, max_train_seconds=args.train_seconds,
        english_ppl=not args.gpu, linking_eval_items=args.linking_items, eval_examples=16, bf16=args.gpu or args.bf16, lr_scheduler="constant_with_warmup",
        warmup_frac=0.02, warm_start=args.warm_start, phase1_new_rows_lr_mult=args.phase1_new_rows_lr_mult,
        phase2_new_rows_lr_mult=args.phase2_new_rows_lr_mult, distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature, distill_temperature_fit=args.distill_temperature_fit, sid_softmax=args.sid_softmax, use_chat_template=not args.no_chat_template,
        lr_decay_frac=args.lr_decay_frac, train_base_token_rows=not args.freeze_base_token_rows,
        replay_ratio=args.replay_ratio, replay_prompts=args.replay_prompts, row_sampling=args.row_sampling,
        compile_blocks=args.compile_blocks, id_input_rows=args.id_input_rows, seed=args.finetune_seed,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from animind_assets.quiet import quiet_command

    if args.merge_ranks:
        return merge_main(args)
    with quiet_command(args.verbose, Path(args.out) / "library-warnings.txt"):
        return _run(args)


#: what every shard of one evaluation must share (its beauty_llm.json "args"); the shard index is what differs
SHARD_KEYS = ("model_dir", "test_users", "seed", "beams", "masking", "eval_dtype", "num_shards", "data", "order", "sids",
              "next_id_format")


def merge_main(args: argparse.Namespace) -> int:
    """``--merge-ranks``: read ``beauty_llm.json`` + ``ranks.parquet`` of each shard folder, check they are the shards
    of one evaluation (``SHARD_KEYS`` equal, shard indices exactly ``0..N-1``, users exactly the seeded subset:
    ``merge_shard_ranks``), print the table of all users and write ``<out>/ranks.parquet`` + ``<out>/beauty_llm.json``.
    Returns 2 with a message naming the folder for a missing, mismatched or doubled shard, or for the folder of a run
    that fine-tuned (not a ``--model-dir`` shard)."""
    import polars as pl

    from animind_assets.lib.llm.sequence_eval import merge_shard_ranks, results_from_ranks
    from animind_assets.lib.retrieval.evaluation import format_table

    runs = []
    for d in args.merge_ranks:
        d = Path(d)
        try:
            meta = json.loads((d / "beauty_llm.json").read_text(encoding="utf-8"))
            runs.append((d, meta, pl.read_parquet(d / "ranks.parquet")))
        except (OSError, ValueError) as exc:
            print(f"--merge-ranks {d}: not a finished beauty_llm --shard run ({exc})", file=sys.stderr)
            return 2
        if not meta.get("args", {}).get("model_dir"):
            print(f"--merge-ranks {d}: not a --model-dir --shard run (a run that fine-tuned has its whole table in "
                  f"{d / 'beauty_llm.json'} already; shards come from --model-dir M --shard I/N)", file=sys.stderr)
            return 2
    first = runs[0][1]["args"]
    for d, meta, _ in runs[1:]:
        theirs = meta["args"]
        diff = [f"{k}: {theirs.get(k)!r} vs {first.get(k)!r}" for k in SHARD_KEYS if theirs.get(k) != first.get(k)]
        if diff:
            print(f"--merge-ranks {d}: not a shard of the same evaluation as {runs[0][0]} (differs in "
                  f"{', '.join(diff)})", file=sys.stderr)
            return 2
    n = int(first.get("num_shards", 1))
    got = sorted(int(meta["args"].get("shard", 0)) for _, meta, _ in runs)
    if got != list(range(n)):
        print(f"--merge-ranks: shards {got} given, an evaluation in {n} shards needs each of 0..{n - 1} once", file=sys.stderr)
        return 2
    total = int(runs[0][1]["protocol"]["users_total"])
    try:
        merged = merge_shard_ranks([f for _, _, f in runs], total, int(first["test_users"]), int(first["seed"]))
    except ValueError as exc:
        print(f"--merge-ranks: {exc}", file=sys.stderr)
        return 2
    lm, pop = results_from_ranks(merged, n_boot=int(first.get("n_boot", 1000)), seed=int(first["seed"]))
    gen_s = sum(float(meta["summary"].get("generation_seconds", 0.0)) for _, meta, _ in runs)
    steps = runs[0][1]["rows"][-1].get("steps")
    valid = min(float(meta["summary"].get("valid_id_rate", 0.0)) for _, meta, _ in runs)
    lm_rows = [{**lm.row(mode), "steps": steps, "valid-ID": valid} for mode in ("masked", "unmasked")]
    rows = [pop.row(mode) for mode in ("masked", "unmasked")] + lm_rows
    pop_r10 = pop.metrics["masked"]["recall@10"]
    ratio = lm.metrics["masked"]["recall@10"] / pop_r10 if pop_r10 > 0 else float("nan")
    print(f"=== Beauty, leave-one-out test (ours): {n} shards of {first['model_dir']} merged, {len(merged):,} of {total:,} test users")
    print(format_table(rows, extra_cols=("users", "steps", "valid-ID")))
    print(f"\nLM / popularity R@10 (masked): {f'{ratio:.2f}x' if pop_r10 > 0 else 'n/a (popularity hit none of these users)'} "
          "(target >= 3x on CPU within a 30-minute fine-tune)")
    print(f"search: {gen_s / 60:.1f} process-minutes over the shards; load at the shards' ends: "
          + "; ".join(str(meta.get("load_end")) for _, meta, _ in runs))
    print(f"protocol: {json.dumps(runs[0][1]['protocol'] | {'users_evaluated': len(merged)})}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    merged.write_parquet(out / "ranks.parquet")
    result = {"rows": rows, "ratio_r10_masked": ratio, "shards": [str(d) for d, _, _ in runs], "args": first | {"shard": 0, "num_shards": 1},
              "protocol": runs[0][1]["protocol"] | {"users_evaluated": len(merged)},
              "summary": {"generation_seconds": gen_s, "valid_id_rate": valid, "users": len(merged)}}
    (out / "beauty_llm.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    print(f"merged ranks: {out / 'ranks.parquet'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from animind_assets.lib.data.amazon import beauty_dir

    folder = Path(args.data) if args.data else beauty_dir()
    if not (folder / "inter.json").exists():
        print(f"prepared Beauty split not found: {folder / 'inter.json'} (see ../shared/data/beauty/README.md; "
              "--data or $ANIMIND_SHARED_DATA point elsewhere): nothing measured", file=sys.stderr)
        return 2
    if args.model_dir:  # before the dataset build: a wrong folder fails in a second, not after minutes of work
        from animind_assets.lib.llm.model_folder import read_folder_files

        try:
            read_folder_files(args.model_dir)
        except (FileNotFoundError, ValueError) as exc:
            print(f"--model-dir {args.model_dir}: {exc}", file=sys.stderr)
            return 2
    import polars as pl
    import torch

    from animind_assets.lib.data.amazon import sequences_from_interactions
    from animind_assets.lib.data.amazon_split import load_prepared_split
    from animind_assets.lib.llm.infer import load_sid_model
    from animind_assets.lib.llm.sequence_data import SeqLlmDataConfig, build_next_item_dataset, item_lookup
    from animind_assets.lib.llm.sequence_eval import (
        SeqEvalConfig,
        evaluate_next_item_lm,
        evaluate_saved_model_in_processes,
        ranks_frame,
    )
    from animind_assets.lib.retrieval.evaluation import PUBLISHED_BEAUTY, SequenceSplit, format_table, protocol, shard_rows, subset_note

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device visible; nothing run")
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_start = load_avg()
    print(f"start: {load_start}; torch threads {torch.get_num_threads()}; cuda {torch.cuda.is_available()}")
    t_all = time.perf_counter()
    sasrec_rows: list[dict] = []
    if args.train_sasrec:
        print("\n=== SASRec (the collaborative IDs' source and the distillation teacher): benchmarks.beauty", flush=True)
        args.sasrec_dir = _train_sasrec(args, out / "sasrec", args.seed, "popularity,sasrec")
        sasrec_rows = json.loads((out / "sasrec" / "sasrec.json").read_text(encoding="utf-8"))["rows"]
        args.teacher_sasrec_dir += _train_teacher_members(args, out)
    data = load_prepared_split(folder, order=args.order)
    items, inter = data.items, data.interactions
    sids, sid_note, codebooks = load_sids(args, items, log)
    log(f"Beauty: {items.height} items, {inter.height} interactions, {inter['user_id'].n_unique()} users; {sid_note}")
    split = SequenceSplit.from_sequences(sequences_from_interactions(inter), n_items=items.height)
    log(subset_note(args.test_users, len(split)))
    dcfg = SeqLlmDataConfig(n_examples=args.n_examples, max_history=args.max_history, title_history=args.title_history,
                            next_id_format=args.next_id_format, sequence_window=args.sequence_window,
                            sequence_instruction=args.sequence_instruction,
                            **({"system_prompt": args.system_prompt} if args.system_prompt is not None else {}))
    t0 = time.perf_counter()
    ds = build_next_item_dataset(items, inter, sids, dcfg, log=log)
    log(f"dataset: {ds.frame.height} rows in {time.perf_counter() - t0:.0f}s; counts {ds.summary['counts']}; "
        f"leakage {ds.summary['leakage']}")
    lookup = item_lookup(items, sids)
    fcfg = build_finetune_config(args)
    if args.model_dir:
        model_dir, m, stop_reason, ws_mode = _saved_folder(args, lookup, log, dcfg)
        steps, ft_seconds = int(m.get("total_steps", 0)), float(m.get("total_seconds", 0.0))
        fcfg.base_model = args.base_model or fcfg.base_model
    else:
        model_dir, m, stop_reason, ws_mode, ft_seconds = _finetune(args, fcfg, ds, lookup, items, codebooks, out, log)
        steps = int(m.get("total_steps", 0))
    ecfg = SeqEvalConfig(test_users=args.test_users, seed=args.seed, num_beams=args.beams, masking=args.masking,
                         n_boot=args.n_boot, linking_items=args.linking_items)
    if args.num_shards > 1:
        n, i = args.num_shards, args.shard
        log(f"shard {i} of {n}: the seeded users at positions {i}, {i + n}, {i + 2 * n}, ... of their sorted list "
            "(merge the shards with --merge-ranks)")
    if args.eval_processes > 1 and not args.gpu:  # parse_args sets 1 with --shard
        # fresh processes of one thread each: on this 2-core CPU twice the users/s of one 2-thread search (docs/beauty.md)
        ev = evaluate_saved_model_in_processes(str(model_dir), ds.frame, split, ecfg, args.eval_processes,
                                               threads=max(1, args.threads // args.eval_processes), dtype=args.eval_dtype, log=log,
                                               quiet=not args.verbose)
    else:
        sm = load_sid_model(model_dir, num_threads=args.threads, device="cuda" if args.gpu else "cpu", dtype=args.eval_dtype)
        ev = evaluate_next_item_lm(sm, ds.frame, split, ecfg, log=log, shard=args.shard, num_shards=args.num_shards)
    load_end = load_avg()
    extra = {"train s": round(ft_seconds), "steps": steps, "users/s": round(ev.summary["users_per_s"], 2)}
    lm_rows = [{**ev.lm.row(mode), **extra, "valid-ID": ev.summary["valid_id_rate"]} for mode in ("masked", "unmasked")]
    pop_rows = [ev.popularity.row(mode) for mode in ("masked", "unmasked")]
    rows = pop_rows + sasrec_rows + lm_rows  # SASRec rows (--train-sasrec): the same seeded test users
    pop_r10 = ev.popularity.metrics["masked"]["recall@10"]
    ratio = ev.lm.metrics["masked"]["recall@10"] / pop_r10 if pop_r10 > 0 else float("nan")  # nan: popularity hit no user
    print("\n=== Beauty, leave-one-out test (ours)")
    print(format_table(rows, extra_cols=("users", "train s", "steps", "valid-ID")))
    print(f"\nLM / popularity R@10 (masked): "
          f"{f'{ratio:.2f}x' if pop_r10 > 0 else 'n/a (popularity hit none of these users)'} "
          "(target >= 3x on CPU within a 30-minute fine-tune)")
    print(f"valid-ID rate (constrained) {ev.summary['valid_id_rate']:.4f}; unconstrained greedy "
          f"{ev.summary.get('unconstrained_valid_id_rate')}; ID->words retrieval@1 {ev.summary.get('sid_to_title_retrieval@1')}; "
          f"words->ID retrieval@1 {ev.summary.get('title_to_sid_retrieval@1')}")
    print(f"fine-tune: {steps} steps x batch {args.batch_size} in {ft_seconds / 60:.1f} min ({stop_reason}; "
          f"phase2 {m.get('phase2_tokens_per_s', 0):.0f} tokens/s); eval {ev.summary['generation_seconds'] / 60:.1f} min "
          f"({ev.summary['users_per_s']:.2f} users/s, {ev.summary.get('processes', 1)} process(es)); total {(time.perf_counter() - t_all) / 60:.1f} min")
    print(f"task B form {args.next_id_format}: {ds.summary['b_targets_per_row']} next-item targets per training row; "
          f"{ds.summary['counts']['B']['train']} B training rows")
    print(f"load at start: {load_start}\nload at end:   {load_end}")
    print("\n=== published reference rows (NOT measured here; other code, machines, masking rules)")
    print(format_table([{"model": k, "masking": "as published", **v} for k, v in PUBLISHED_BEAUTY.items()], with_ci=False))
    print("  LC-Rec-style SFT, 1.7B base, R@10 0.0704; OneRec-style SFT, 1.7B base, R@10 0.0925 (as cited in issue 15)")
    proto = protocol(split, "test", shard_rows(split.subset(args.test_users, seed=args.seed), args.shard, args.num_shards))
    print(f"\nprotocol: {json.dumps(proto)}; generative masking rule '{args.masking}' ({args.beams} beams); order {args.order}; "
          f"IDs: {sid_note}; evaluated in {args.eval_dtype}; base {fcfg.base_model}{f' pruned to {args.keep_layers} blocks' if args.keep_layers else ''}, top {args.train_layers or 'all'} blocks trained{' + input-side ID rows' if args.id_input_rows else ''}; prompts: last {args.max_history} "
          f"IDs / {args.title_history} word titles; task B form {args.next_id_format}; warm start "
          f"{ws_mode}; new-row lr x{args.phase1_new_rows_lr_mult}/x{args.phase2_new_rows_lr_mult}; lr constant after warm-up"
          f"{f', linear decay to 0 over the last {args.lr_decay_frac:.0%} of the budget' if args.lr_decay_frac else ''}; ID targets normalised over "
          f"{'the ID tokens only (--sid-softmax)' if args.sid_softmax else 'the full vocabulary'}; base vocabulary rows "
          f"{'frozen (--freeze-base-token-rows)' if args.freeze_base_token_rows else 'trained'}; English replay "
          f"{f'{args.replay_ratio:g} of the rows' if args.replay_ratio else 'off'}; training rows drawn "
          f"{'in passes (no repeat before a pool is used up)' if args.row_sampling == 'passes' else 'with replacement'}")
    result = {"rows": rows, "ratio_r10_masked": ratio, "summary": ev.summary, "finetune_metrics": m, "args": vars(args),
              "load_start": load_start, "load_end": load_end, "protocol": proto, "sids": sid_note, "warm_start": ws_mode}
    (out / "beauty_llm.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    ranks_frame(ev, split).write_parquet(out / "ranks.parquet")
    print(f"per-user ranks: {out / 'ranks.parquet'} (paired comparisons, subsets: ranks_frame)")
    if args.gpu and not args.skip_mal and not args.model_dir:
        from animind_assets.benchmarks import finetune_mal

        print("\n=== MAL 2020 LM benchmark at GPU scale (set completion)")
        finetune_mal.main(["--out", str(out / "mal"), "--sids", "collab", "--next-id-format", "sequence",
                           "--sequence-window", "24", "--phase1-steps", "150", "--phase2-steps", "1200",
                           "--batch-size", "32", "--train-layers", "0", "--eval-users", "0", "--threads", "8", "--bf16",
                           "--linking-items", "30", *(["--verbose"] if args.verbose else [])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
