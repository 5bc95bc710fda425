"""Bounded CPU run of the whole LLM chain on the real MAL 2020 data, through the Dagster assets.

    python -m animind_assets.benchmarks.finetune_mal                       # defaults (bounded, 2 shared cores)
    python -m animind_assets.benchmarks.finetune_mal --phase1-steps 4 --phase2-steps 4 --eval-users 20   # smoke
    python -m animind_assets.benchmarks.finetune_mal --baselines-only       # protocol + baselines, no LM (minutes)
    python -m animind_assets.benchmarks.finetune_mal --out DIR <DIR's flags> --eval-only --num-beams 20   # re-evaluate

Protocol (``--holdout``): ``random`` (default) = set completion, no time order: each test user's
held-out item is a seeded random item of the list (MAL 2020 has no timestamps); ``last`` = the last
row of the list, an ORDER ARTEFACT on MAL 2020 (the highest MAL id), kept to reproduce older figures.
Baselines on the same users: popularity, co-watch, cosine item-kNN, EASE (Steck 2019), EASE on the
full list (reference) and, for ``last`` only, last-item popularity.

Steps (every figure is printed):

1. ``anime_prep`` / ``user_interactions`` from ``../shared/data/mal2020/anilist.sqlite`` with the
   project's cleaning library (adult titles excluded).
2. Semantic IDs with the project's quantizer library (``lib/semantic_ids/quantizers``, its default preset;
   ``--quantizer-preset rqvae`` for the RQ-VAE) on TF-IDF/SVD-128 features of ``anime_text``
   (``--sids rqvae-minilm``: the offline MiniLM embeddings instead, cached under
   ``$TMPDIR/animind_bench``, tens of minutes on 2 shared cores), 3x256 codes,
   checkpoint at ``<out>/artifacts/rqvae_model/model.pt`` (the fine-tune's warm-start source),
   TIGER disambiguation level. ``--sids random`` uses random 3x256 codes instead (no RQ-VAE).
   ``--sids collab``: collaborative IDs, the same quantizer on PureSVD-64 vectors of the *training* users'
   lists (the dataset's user split, same seed) beside 0.3 x the TF-IDF/SVD vectors (labelled in the output).
3. ``dg.materialize`` of ``llm_prep_dataset`` -> ``finetuned_model`` -> ``recommendation_eval``
   (upstream tables injected as stub assets) with the default embedded SmolLM2-135M-Instruct,
   ``torch.set_num_threads(2)``, bounded steps; MLflow into ``<out>/mlflow.db``. ``--distill-weight W``:
   ``finetuned_model`` distils from EASE fitted on the training users' lists (``lib/llm/distill.py``;
   temperature fitted by the teacher's NLL unless ``--distill-temperature`` is given; "sequence" form rows).
4. ``python -m animind_assets.recommend`` on the produced model.

Shorter rows: ``--system-prompt '' --no-chat-template`` (the launchpad fields ``llm_prep_dataset.system_prompt``
and ``finetuned_model.use_chat_template``) leave each row's fixed sentence and its IDs; ``--lr`` is
``finetuned_model.phase2_lr``. ``build_run_config`` maps every flag to its launchpad field.

``--eval-only``: materialize only ``recommendation_eval`` in ``--out``, against the ``llm_prep_dataset`` and
``finetuned_model`` a finished run of the same command left there (e.g. with another ``--num-beams`` or
``--eval-users``). Only the evaluation's flags apply; the dataset and fine-tune are the stored run's. Refused when
the folder has no such run or when the semantic IDs this command builds differ from the ones stored there.

The CPU is shared: timings vary with the other processes on the machine (the load average is printed).
"""



import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from animind_assets.lib.llm.finetune_config import (
    add_distill_temperature_flags, add_row_sampling_flag, task_weight_flags_error, task_weights_from_text,
)
from animind_assets.quiet import VERBOSE_HELP, dagster_console_run_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shared_data() -> Path:
    env = os.environ.get("ANIMIND_SHARED_DATA")
    return Path(env) if env else (PROJECT_ROOT / "../shared/data").resolve()


def load_mal(db: Path):
    from animind_assets.lib.data.prep import catalog_ids, clean_anime, clean_interactions
    from animind_assets.lib.data.sources import read_sqlite_catalog, read_sqlite_interactions

    raw_cat = read_sqlite_catalog(db)
    cat = clean_anime(raw_cat).frame
    raw = read_sqlite_interactions(db)
    all_ids = catalog_ids(raw_cat)
    kept = set(cat["anime_id"].to_list())
    inter = clean_interactions(raw, known_anime=all_ids, excluded_anime=all_ids - kept).frame
    return cat, inter, raw.has_timestamps


def collaborative_vectors(cat, inter, seed: int | None, text: "np.ndarray", dim: int = 64, text_weight: float = 0.3, log=print):
    """``--sids collab`` features: PureSVD-``dim`` item vectors of the *training* users' lists (the user split of
    ``llm_prep_dataset`` with the same seed: every user outside validation/test, as the baselines; no held-out
    item shapes the IDs), each row L2-normalised, beside the row-normalised TF-IDF/SVD text vector x ``text_weight`` (so the
    items no training user listed still get distinct, content-based codes). Returns float32 (n_items, dim + 128)."""
    import numpy as np

    from animind_assets.lib.llm.data import LlmDataConfig, split_users
    from animind_assets.lib.retrieval.item_baselines import pure_svd_item_vectors

    dcfg = LlmDataConfig(**({"seed": seed} if seed is not None else {}))
    known = inter.filter(pl.col("anime_id").is_in(cat["anime_id"].to_list())).unique(["user_id", "anime_id"])
    counts = known.group_by("user_id").len()
    eligible = counts.filter(pl.col("len") >= dcfg.min_user_items)["user_id"].to_list()
    held = {u for u, sp in split_users(eligible, dcfg).items() if sp != "train"}
    train = sorted(set(known["user_id"].to_list()) - held)  # as the baselines: every user outside validation/test
    cf = pure_svd_item_vectors(known, train, cat["anime_id"].to_list(), dim=dim, seed=0)
    norms = np.linalg.norm(cf, axis=1, keepdims=True)
    cf = np.where(norms > 0, cf / np.maximum(norms, 1e-12), 0.0)
    log(f"collaborative features: PureSVD-{cf.shape[1]} of {len(train)} training users' lists "
        f"({int((norms[:, 0] > 0).sum())} of {len(cf)} items listed) + TF-IDF/SVD x {text_weight}")
    return np.hstack([cf, text_weight * text]).astype(np.float32)


def build_semantic_ids(cat, artifacts_root: Path, mode: str, epochs: int, cache_dir: Path, preset: str = "default", log=print,
                       inter=None, seed: int | None = None):
    import numpy as np
    import polars as pl

    from animind_assets.lib.semantic_ids.assign import assign_semantic_ids, semantic_id_strings

    ids = cat["anime_id"].to_numpy()
    t0 = time.perf_counter()
    if mode == "random":
        rng = np.random.default_rng(0)
        codes = rng.integers(0, 256, size=(len(ids), 3))
        note = "random 3x256 codes (no RQ-VAE)"
    else:
        from animind_assets.lib.semantic_ids.quantizers import preset_config, train_quantizer

        if mode == "rqvae-minilm":
            from animind_assets.benchmarks.semantic_ids import embed

            x = embed(cat["anime_text"].to_list(), cache_dir, log=log)
        else:  # TF-IDF + SVD: seconds instead of the MiniLM embedding's tens of minutes on 2 shared cores
            from sklearn.decomposition import TruncatedSVD
            from sklearn.feature_extraction.text import TfidfVectorizer

            tf = TfidfVectorizer(max_features=30000, min_df=2, stop_words="english", sublinear_tf=True)
            m = tf.fit_transform(cat["anime_text"].to_list())
            x = TruncatedSVD(128, random_state=0).fit_transform(m).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-9
            log(f"TF-IDF ({m.shape[1]} terms) + SVD-128 features: {time.perf_counter() - t0:.0f}s")
            if mode == "collab":
                x = collaborative_vectors(cat, inter, seed, x, log=log)
        cfg = preset_config(preset, epochs=epochs, num_threads=2)
        ckpt_dir = artifacts_root / "rqvae_model"
        res = train_quantizer(x, cfg, checkpoint_dir=str(ckpt_dir))
        codes = res.codes
        feats = {"rqvae-minilm": "MiniLM", "collab": "collaborative (PureSVD of training lists + 0.3 x TF-IDF/SVD)"}.get(mode, "TF-IDF/SVD")
        note = (f"{feats} features, quantizer preset {preset!r} "
                f"({cfg.quantizer} {cfg.levels}x{cfg.codebook_size}, {res.epochs_run} epochs), checkpoint {ckpt_dir / 'model.pt'}")
    full = assign_semantic_ids(codes, order_key=ids)
    sids = pl.DataFrame({"anime_id": ids, "codes": full.tolist(), "semantic_id": semantic_id_strings(full)},
                        schema={"anime_id": pl.Int64, "codes": pl.List(pl.Int64), "semantic_id": pl.Utf8})
    unique_before = len({tuple(r) for r in np.asarray(codes).tolist()}) / len(ids)
    log(f"semantic IDs: {note}; unique before disambiguation {unique_before:.4f}; {time.perf_counter() - t0:.0f}s")
    return sids, note


def build_run_config(args: argparse.Namespace) -> dict:
    """Dagster run config (``{"ops": {asset: {"config": ...}}}``) of ``llm_prep_dataset``, ``finetuned_model`` and
    ``recommendation_eval`` for the parsed command line ``args`` (every flag maps to one launchpad field)."""
    return {
        "ops": {
            "llm_prep_dataset": {"config": {"n_examples": args.n_examples, "max_history": args.max_history,
                                            "c_max_liked": args.c_max_liked, "list_end_prob": args.list_end_prob,
                                            "holdout": args.holdout, "next_id_format": args.next_id_format,
                                            "sequence_window": args.sequence_window,
                                            **({"system_prompt": args.system_prompt} if args.system_prompt is not None else {}),
                                            **({"seed": args.seed} if args.seed is not None else {})}},
            "finetuned_model": {
                "config": {
                    "phase1_max_steps": args.phase1_steps,
                    "phase2_max_steps": args.phase2_steps,
                    "batch_size": args.batch_size,
                    "max_seq_length": args.max_seq_length,
                    "train_layers": args.train_layers, "keep_layers": args.keep_layers,
                    "num_threads": args.threads,
                    "bf16": args.bf16,
                    "eval_examples": args.eval_examples,
                    **({"seed": args.seed} if args.seed is not None else {}),
                    "phase2_weights": task_weights_from_text(args.phase2_weights, "--phase2-weights"),
                    "phase1_weights": task_weights_from_text(args.phase1_weights, "--phase1-weights"),
                    "phase1_lr": args.phase1_lr,
                    "phase2_lr": args.lr,
                    "use_chat_template": not args.no_chat_template,
                    "phase1_new_rows_lr_mult": args.phase1_new_rows_lr_mult,
                    "phase2_new_rows_lr_mult": args.phase2_new_rows_lr_mult,
                    "warm_start": args.warm_start,
                    "max_train_seconds": args.train_seconds,
                    "replay_ratio": args.replay_ratio,
                    "replay_prompts": args.replay_prompts,
                    "replay_max_new_tokens": args.replay_max_new_tokens,
                    "train_base_token_rows": not args.freeze_base_token_rows,
                    "row_sampling": args.row_sampling,
                    "linking_eval_items": args.linking_items,
                    "distill_weight": args.distill_weight,
                    "distill_temperature": args.distill_temperature,
                    "distill_temperature_fit": args.distill_temperature_fit,
                    "distill_ease_lambda": args.ease_lambda,
                    "sid_softmax": args.sid_softmax,
                    "lr_decay_frac": args.lr_decay_frac,
                    # with the decay: constant after warm-up, then linear to 0 (warmup-stable-decay), as beauty_llm
                    **({"lr_scheduler": "constant_with_warmup"} if args.lr_decay_frac > 0 else {}),
                }
            },
            "recommendation_eval": {"config": {"max_users": args.eval_users, "num_beams": args.num_beams, "num_threads": args.threads,
                                               "ease_lambda": args.ease_lambda, "title_items": args.linking_items}},
        }
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line of this benchmark (``main`` parses it; ``build_run_config`` maps it to launchpad fields)."""
    from animind_assets.lib.llm.finetune_config import FinetuneConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "animind_finetune_mal"))
    ap.add_argument("--sids", choices=["rqvae", "rqvae-minilm", "collab", "random"], default="rqvae",
                    help="rqvae: project RQ-VAE on TF-IDF/SVD features; rqvae-minilm: on MiniLM embeddings (slow on CPU)")
    ap.add_argument("--quantizer-epochs", type=int, default=10)
    ap.add_argument("--quantizer-preset", default="default", help="lib.rqvae preset (project default; 'rqvae' = RQ-VAE)")
    ap.add_argument("--n-examples", type=int, default=20000)
    ap.add_argument("--phase1-steps", type=int, default=40)
    ap.add_argument("--phase2-steps", type=int, default=260)
    ap.add_argument("--max-history", type=int, default=6, help="list items in a task-B prompt")
    ap.add_argument("--list-end-prob", type=float, default=0.5,
                    help="training B rows at the end of the user's list (the evaluated position)")
    ap.add_argument("--phase2-weights", default="0.1,0.8,0.1", help="phase 2 task shares A,B,C")
    ap.add_argument("--c-max-liked", type=int, default=4, help="liked anime in a task-C prompt")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-length", type=int, default=192)
    ap.add_argument("--train-layers", type=int, default=2)
    ap.add_argument("--keep-layers", type=int, default=0,
                    help="layer pruning: keep the first N-1 blocks of the base model and its last (0 = all; FinetuneConfig.keep_layers)")
    ap.add_argument("--eval-examples", type=int, default=8, help="validation rows per task for the phase validation loss")
    ap.add_argument("--eval-users", type=int, default=0, help="test users evaluated (0 = all)")
    ap.add_argument("--num-beams", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast during training (fast on CPUs with AMX-BF16 and on GPUs; 0.61x float32 measured with AVX512-BF16 alone)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the dataset (user split, sampling) and the fine-tune "
                    "(default: the assets' defaults)")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "animind_bench"))
    ap.add_argument("--holdout", choices=["random", "last"], default="random",
                    help="random: set completion (seeded random held-out item); last: last row = ORDER ARTEFACT on MAL")
    ap.add_argument("--distill-weight", type=float, default=0.0,
                    help="knowledge distillation from EASE on the training users' lists (lib/llm/distill.py; the "
                         "'sequence' form's rows): weight of the teacher's targets (0 = off)")
    add_distill_temperature_flags(ap, 0.0, "the EASE scores")
    ap.add_argument("--sid-softmax", action="store_true",
                    help="semantic-ID targets normalised over the ID tokens only (FinetuneConfig.sid_softmax)")
    ap.add_argument("--lr-decay-frac", type=float, default=0.0,
                    help="warmup-stable-decay: the learning rate is constant after warm-up (lr_scheduler constant_with_warmup instead of "
                         "cosine over the steps) and falls linearly to 0 over the last fraction of --train-seconds "
                         "(FinetuneConfig.lr_decay_frac; needs --train-seconds)")
    ap.add_argument("--replay-ratio", type=float, default=0.0, help="English-retention replay share (self-distilled)")
    ap.add_argument("--replay-prompts", type=int, default=0, help="shipped replay prompts used (0 = all 150)")
    ap.add_argument("--replay-max-new-tokens", type=int, default=96)
    add_row_sampling_flag(ap)
    ap.add_argument("--freeze-base-token-rows", action="store_true",
                    help="only the new ID-token rows of the tied embedding/head train, the base vocabulary's stay "
                         "(FinetuneConfig.train_base_token_rows false)")
    ap.add_argument("--phase1-weights", default="0.8,0.1,0.1", help="phase 1 task shares A,B,C")
    ap.add_argument("--phase1-lr", type=float, default=FinetuneConfig.phase1_lr)
    ap.add_argument("--lr", type=float, default=FinetuneConfig.phase2_lr, help="phase-2 peak learning rate (FinetuneConfig.phase2_lr)")
    ap.add_argument("--system-prompt", default=None, help="system message of every row (default: LlmDataConfig's; '' = none)")
    ap.add_argument("--no-chat-template", action="store_true",
                    help="render prompts as plain '### Question: / ### Answer:' text (FinetuneConfig.use_chat_template "
                         "false); with --system-prompt '' the rows' tokens go to the IDs, not to the template")
    ap.add_argument("--phase1-new-rows-lr-mult", type=float, default=1.0)
    ap.add_argument("--phase2-new-rows-lr-mult", type=float, default=1.0)
    ap.add_argument("--next-id-format", choices=["question", "sequence"], default="question",
                    help="task B: masked-item question, or the list itself as the answer (set completion only)")
    ap.add_argument("--sequence-window", type=int, default=0,
                    help="sequence form: list items per training row (0 = max history + 1, as evaluated)")
    ap.add_argument("--warm-start", default="rqvae", choices=["rqvae", "projection", "centroid", "mean", "none"])
    ap.add_argument("--train-seconds", type=float, default=0.0, help="wall-clock budget of the fine-tune (0 = the step counts only)")
    ap.add_argument("--linking-items", type=int, default=30, help="items per direction for ID <-> title accuracy")
    ap.add_argument("--ease-lambda", type=float, default=500.0)
    ap.add_argument("--baselines-only", action="store_true",
                    help="build the dataset and print the baseline table on all test users (no LM)")
    ap.add_argument("--eval-only", action="store_true",
                    help="re-run only recommendation_eval on the dataset and model a finished run left in --out "
                         "(only the evaluation's flags apply: --num-beams, --eval-users, --linking-items)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.lr_decay_frac and args.train_seconds <= 0:
        ap.error("--lr-decay-frac decays over the wall-clock budget: add --train-seconds")
    if args.eval_users < 0 or args.threads < 1:
        ap.error("--eval-users must be >= 0 (0 = all test users) and --threads >= 1")
    weights_error = task_weight_flags_error(args.phase1_weights, args.phase2_weights)
    if weights_error:
        ap.error(weights_error)
    if args.num_beams < 10:
        ap.error(f"--num-beams {args.num_beams}: Hit@10 / NDCG@10 read the top 10 of the beams, so at least 10")

    from animind_assets.quiet import quiet_command

    with quiet_command(args.verbose, Path(args.out) / "library-warnings.txt"):
        return _run(args)


def finetune_line(args: argparse.Namespace, seconds: float, model_card: Path) -> str:
    """The closing line's fine-tune part. With ``--eval-only`` the steps, batch and stop reason are the stored run's,
    read from its model card ``model_card`` (``animind_llm.json``: ``metrics.phase{1,2}_steps_done``,
    ``config.batch_size``), not the current flags (which did not train anything)."""
    if not args.eval_only:
        return (f"fine-tune (two phases, {args.phase1_steps}+{args.phase2_steps} steps at most, batch {args.batch_size}): "
                f"{seconds / 60:.1f} min")
    try:
        info = json.loads(model_card.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"fine-tune: not run (--eval-only; the stored run's model card {model_card} is unreadable: {exc})"
    m, cfg = info.get("metrics") or {}, info.get("config") or {}
    steps = "+".join(str(int(m[k])) for k in ("phase1_steps_done", "phase2_steps_done") if k in m) or "?"
    return (f"fine-tune: not run (--eval-only); the stored run trained {steps} steps at batch {cfg.get('batch_size', '?')} "
            f"({info.get('stop_reason', 'stop reason not recorded')})")


def _run(args: argparse.Namespace) -> int:
    db = shared_data() / "mal2020" / "anilist.sqlite"
    if not db.exists():
        print(f"../shared/data/mal2020/anilist.sqlite not found: {db} ($ANIMIND_SHARED_DATA points elsewhere?): "
              "nothing measured", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    if not args.eval_only:  # --eval-only reads a finished run: a missing folder is refused below, not created
        out.mkdir(parents=True, exist_ok=True)
    os.environ["ANIMIND_DATA_DIR"] = str(out)
    t_all = time.perf_counter()
    print(f"load average at start: {os.getloadavg()}; torch threads {torch.get_num_threads()}; cuda {torch.cuda.is_available()}")

    t0 = time.perf_counter()
    cat, inter, has_ts = load_mal(db)
    print(f"MAL: {cat.height} anime (adult excluded), {inter.height} interactions, {inter['user_id'].n_unique()} users, "
          f"has timestamps {has_ts} ({time.perf_counter() - t0:.1f}s)")
    stored = stored_tables(out / "animind.duckdb", ["semantic_ids", "llm_prep_dataset"]) if args.eval_only else {}
    model_card = out / "artifacts" / "finetuned_model" / "animind_llm.json"
    if args.eval_only and (len(stored) < 2 or not model_card.exists()):
        print(f"--eval-only: {out} holds no finished run (tables in animind.duckdb: {sorted(stored) or 'none'}; "
              f"{model_card} {'present' if model_card.exists() else 'missing'}); run the command without --eval-only first",
              file=sys.stderr)
        return 2
    # --eval-only builds the IDs in a scratch folder: a refused run never overwrites the stored run's quantizer checkpoint
    sid_root = Path(tempfile.mkdtemp(prefix="animind-eval-only-")) if args.eval_only else out / "artifacts"
    try:
        sids, sid_note = build_semantic_ids(cat, sid_root, args.sids, args.quantizer_epochs, Path(args.cache_dir),
                                            args.quantizer_preset, inter=inter, seed=args.seed)
        if args.eval_only:
            require_same_semantic_ids(stored["semantic_ids"], sids, out / "animind.duckdb")
    finally:
        if args.eval_only:
            shutil.rmtree(sid_root, ignore_errors=True)

    import dagster as dg
    import polars as pl

    from animind_assets.defs.llm.finetuned_model import finetuned_model
    from animind_assets.defs.llm.llm_prep_dataset import llm_prep_dataset
    from animind_assets.defs.llm.recommendation_eval import recommendation_eval
    from animind_assets.resources import AniMindDuckDBIOManager, ArtifactStoreResource, MlflowResource, ParquetExports

    @dg.asset(name="anime_prep")
    def anime_prep_stub() -> pl.DataFrame:
        return cat

    @dg.asset(name="user_interactions", metadata={"has_timestamps": has_ts})
    def user_interactions_stub() -> pl.DataFrame:
        return inter

    @dg.asset(name="semantic_ids")
    def semantic_ids_stub() -> pl.DataFrame:
        return sids

    @dg.asset(name="rqvae_model")
    def rqvae_stub() -> None:
        return None

    resources = {
        "io_manager": AniMindDuckDBIOManager(database=str(out / "animind.duckdb"), schema="main"),
        "artifacts": ArtifactStoreResource(root=str(out / "artifacts")),
        "exports": ParquetExports(root=str(out / "exports")),
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{out / 'mlflow.db'}", artifact_location=str(out / "mlartifacts")),
    }
    stubs = [anime_prep_stub, user_interactions_stub, semantic_ids_stub, rqvae_stub]
    quiet_events = dagster_console_run_config(args.verbose)  # Dagster's event lines only with --verbose
    dg.materialize(stubs, resources=resources, selection=["anime_prep", "user_interactions", "semantic_ids"],
                   run_config=quiet_events)
    ours = [llm_prep_dataset, finetuned_model, recommendation_eval]
    run_config = build_run_config(args)
    timings = {}
    if args.baselines_only:
        return _baselines_only(args, stubs, ours, resources, run_config)
    for asset in ours:
        name = asset.key.path[-1]
        if args.eval_only and name != "recommendation_eval":
            continue
        t0 = time.perf_counter()
        res = dg.materialize([*stubs, *ours], resources=resources, selection=[name],
                             run_config={**quiet_events, "ops": {name: run_config["ops"][name]}})
        timings[name] = time.perf_counter() - t0
        mats = res.asset_materializations_for_node(name)
        md = mats[0].metadata if mats else {}
        print(f"\n=== {name}: {timings[name]:.0f}s (load average {os.getloadavg()[0]:.1f})")
        if name == "llm_prep_dataset":
            s = md["summary"].value
            print(f"rows {md['dagster/row_count'].value}; counts {s['counts']}; duplicates dropped {s['duplicates_dropped']}")
            print(f"users by split {s['users_by_split']}; leakage {s['leakage']}; {s['order_note']}")
            print(f"protocol {s['protocol']}: {s['protocol_note']}")
            print(f"task B form {s['next_id_format']}: {s['b_targets_per_row']} next-item targets per training row")
            print(f"token lengths ({s['token_length_method']}): {s['token_lengths']}")
        elif name == "finetuned_model":
            for k in ("device", "method", "new_tokens_added", "warm_start", "phase1_train_loss", "phase1_val_loss",
                      "phase2_train_loss", "phase2_val_loss", "phase1_tokens_per_s", "phase2_tokens_per_s",
                      "english_ppl_before", "english_ppl_after", "english_ppl_ratio", "replay_ratio",
                      "phase1_sid_to_title_exact", "phase1_sid_to_title_retrieval@1", "phase1_title_to_sid_exact",
                      "phase1_title_to_sid_retrieval@1", "phase2_sid_to_title_exact", "phase2_sid_to_title_retrieval@1",
                      "phase2_title_to_sid_exact", "phase2_title_to_sid_retrieval@1", "materialize_seconds"):
                if k in md:
                    print(f"  {k}: {md[k].value}")
            if "warm_start_ridge_r2" in md:
                print(f"  warm_start_ridge_r2: {md['warm_start_ridge_r2'].value}")
        else:
            print(md["protocol"].value)
            print(md["metrics"].value)
            for k in ("valid_id_rate", "unconstrained_valid_id_rate", "sid_to_title_exact", "sid_to_title_fuzzy_ge_0_8",
                      "sid_to_title_retrieval@1", "title_to_sid_exact", "title_to_sid_retrieval@1",
                      "lm_beats_popularity", "lm_beats_item_knn", "lm_over_ease", "users", "catalog_size", "users_per_s"):
                if k in md:
                    print(f"  {k}: {md[k].value}")
            print(f"  examples: {md['examples'].value}")
        sys.stdout.flush()
    print(f"\nsemantic IDs: {sid_note}")
    print(f"{finetune_line(args, timings.get('finetuned_model', 0.0), model_card)}; "
          f"eval {timings['recommendation_eval'] / 60:.1f} min; total {(time.perf_counter() - t_all) / 60:.1f} min")
    cmd = [sys.executable, "-m", "animind_assets.recommend", "--artifacts", str(out / "artifacts"),
           "--history", "Cowboy Bebop", "Trigun", "-k", "10"]
    print("\n$ python " + shlex.join(cmd[1:]))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT)
    print(r.stdout + r.stderr)
    print(f"(recommend CLI: {time.perf_counter() - t0:.1f}s, exit {r.returncode})")
    return 0


def stored_tables(database: Path, names: list[str]) -> dict[str, pl.DataFrame]:
    """The tables of ``names`` that the DuckDB file ``database`` holds in schema ``main`` (missing ones, or a missing
    file, are left out). Used by ``--eval-only`` to find what an earlier run left."""
    import duckdb

    if not Path(database).exists():
        return {}
    con = duckdb.connect(str(database), read_only=True)
    try:
        have = {r[0] for r in con.execute("select table_name from information_schema.tables where table_schema = 'main'").fetchall()}
        return {n: pl.from_arrow(con.execute(f'select * from main."{n}"').arrow()) for n in names if n in have}
    finally:
        con.close()


def require_same_semantic_ids(stored: pl.DataFrame, built: pl.DataFrame, where: Path) -> None:
    """Raise ``ValueError`` unless ``built`` (the semantic IDs this command just built) equals ``stored`` (the
    ``semantic_ids`` table of an earlier run in ``where``) row for row on ``anime_id`` and ``semantic_id``: a model
    is never evaluated against IDs it was not trained with. The message names the first differing anime."""
    cols = ["anime_id", "semantic_id"]
    a, b = stored.select(cols).sort("anime_id"), built.select(cols).sort("anime_id")
    if a.equals(b):
        return
    joined = a.join(b, on="anime_id", how="full", suffix="_built", coalesce=True)
    diff = joined.filter(pl.col("semantic_id").ne_missing(pl.col("semantic_id_built"))).sort("anime_id")
    first = diff.row(0, named=True) if diff.height else {}
    raise ValueError(
        f"--eval-only: the semantic IDs built now differ from table main.semantic_ids of {where} for {diff.height} anime "
        f"(first: anime_id {first.get('anime_id')}: stored {first.get('semantic_id')!r}, built {first.get('semantic_id_built')!r}); "
        "pass the flags of the run that wrote the folder (--sids, --seed, --quantizer-*)")


def _baselines_only(args, stubs, ours, resources, run_config) -> int:
    """Materialize llm_prep_dataset, then print the baselines of ``recommendation_eval`` on every
    test user of the chosen protocol (no model is loaded)."""
    import dagster as dg
    import numpy as np

    from animind_assets.lib.retrieval.item_baselines import EASE, CoWatch, ItemKNN, popularity_counts, popularity_ranking
    from animind_assets.lib.llm.evaluation import PROTOCOLS, baseline_training_users, last_item_counts, metrics_frame
    from animind_assets.lib.llm.model_folder import list_order_of
    from animind_assets.lib.common.metrics import ranking_metrics
    from animind_assets.meta import markdown_table

    t0 = time.perf_counter()
    res = dg.materialize([*stubs, *ours], resources=resources, selection=["llm_prep_dataset"],
                         run_config={**dagster_console_run_config(args.verbose),
                                     "ops": {"llm_prep_dataset": run_config["ops"]["llm_prep_dataset"]}})
    md = res.asset_materializations_for_node("llm_prep_dataset")[0].metadata
    s = md["summary"].value
    print(f"\n=== llm_prep_dataset: {time.perf_counter() - t0:.0f}s; users by split {s['users_by_split']}; leakage {s['leakage']}")
    print(f"protocol {s['protocol']}: {s['protocol_note']}")
    from animind_assets.resources import AniMindDuckDBIOManager  # noqa: F401 - the table lives in DuckDB

    import duckdb

    con = duckdb.connect(str(Path(os.environ["ANIMIND_DATA_DIR"]) / "animind.duckdb"), read_only=True)
    ds = pl.from_arrow(con.execute("select * from main.llm_prep_dataset").arrow())
    inter = pl.from_arrow(con.execute("select * from main.user_interactions").arrow())
    con.close()
    test = ds.filter((pl.col("task") == "B") & pl.col("is_heldout") & (pl.col("split") == "test")).sort("user_id")
    protocol, note = PROTOCOLS[list_order_of(test["prompt"].to_list())]
    train_users = baseline_training_users(ds, inter)
    t1 = time.perf_counter()
    pop = popularity_counts(inter, train_users)
    models = {"cowatch": CoWatch(inter, train_users), "item_knn": ItemKNN(inter, train_users),
              "ease": EASE(inter, train_users, args.ease_lambda)}
    print(f"baselines fitted on {len(train_users)} training users, {len(models['ease'].items)} items: {time.perf_counter() - t1:.0f}s")
    pop_list = popularity_ranking(pop, set(), 5000)
    users, targets, windows = test["user_id"].to_list(), test["target_anime_id"].to_list(), test["history_anime_ids"].to_list()
    lists: dict[int, list[int]] = {}
    for u, a in inter.filter(pl.col("user_id").is_in(users)).select("user_id", "anime_id").iter_rows():
        lists.setdefault(int(u), []).append(int(a))
    excludes = [(set(lists.get(u, [])) - {t}) | set(w) for u, t, w in zip(users, targets, windows)]
    metrics = {"popularity": ranking_metrics([popularity_ranking(pop, ex, 10) for ex in excludes], targets, [1, 5, 10])}
    for name, m in models.items():
        metrics[name] = ranking_metrics([m.ranking(w, ex, 10, pop_list) for w, ex in zip(windows, excludes)], targets, [1, 5, 10])
    metrics["ease_full_history"] = ranking_metrics(
        [models["ease"].ranking([a for a in lists.get(u, []) if a != t], ex, 10, pop_list) for u, t, ex in zip(users, targets, excludes)],
        targets, [1, 5, 10])
    if protocol != "set_completion":
        last = last_item_counts(inter, train_users)
        metrics["last_item_popularity"] = ranking_metrics([popularity_ranking(last, ex, 10) for ex in excludes], targets, [1, 5, 10])
    print(f"\n{protocol}: {note}; {len(users)} test users (all), history shown {np.mean([len(w) for w in windows]):.1f} items; "
          f"exclude_seen for every method; ties: higher score then smaller anime_id; EASE lambda {args.ease_lambda}")
    print(markdown_table(metrics_frame(metrics)))
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min; load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
