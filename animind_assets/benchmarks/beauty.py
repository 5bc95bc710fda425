"""Amazon Beauty benchmark: popularity, SASRec, RPG and TIGER on one leave-one-out evaluation.

    python -m animind_assets.benchmarks.beauty                          # CPU, everything (see budgets)
    python -m animind_assets.benchmarks.beauty --models sasrec,rpg      # a subset
    python -m animind_assets.benchmarks.beauty --gpu                    # GPU command (= --device cuda)
    python -m animind_assets.benchmarks.beauty --out DIR --reuse        # re-print the table from DIR

Data: the prepared split in ``../shared/data/beauty`` (``inter.json`` order by default; ``--order
user_sequence`` = P5's), 22,363 users, 12,101 items. Protocol (``lib.retrieval.evaluation``): last item
= test target, second-to-last = validation target, training on every prefix of ``seq[:-2]``; full
ranking over all 12,101 items, ties by ascending item id; Recall/NDCG@5/10 with 95% bootstrap
intervals over users; every model is reported with and without masking of already-seen items; all
22,363 test users unless ``--test-users``. Published rows are printed in a separate table, labelled
"published", never mixed with ours.

Every model's result is written to ``<out>/<model>.json`` (metrics, intervals, speed, config,
training curve) as soon as it is done, so ``--reuse`` can assemble the table from models run by
separate invocations of this command. Speed: ``examples/s`` = training targets (positions) per second
of training time. The machine load (``uptime``) is printed at start and end.

RPG's default here (fifth round, docs/beauty.md) is the RPG architecture on PQ codes of the SASRec item
vectors trained with an exact item-level softmax only, whose target mixes the true next item with the
SASRec's softmax (distillation weight 0.5), sum/sqrt(m) pooling and dot-product code logits: four choices
that are not in the RPG paper and are named in the row's label. The paper's recipe:
``--rpg-code-loss-weight 1 --rpg-item-loss-weight 0 --rpg-distill-weight 0 --rpg-logits cosine --rpg-pooling mean``.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy/faiss BLAS: spinning threads cost 10-40x on a busy shared CPU

ALL_MODELS = ("popularity", "sasrec", "rpg", "tiger")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma list of {ALL_MODELS}")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--gpu", action="store_true", help="GPU command: --device cuda with GPU-sized batches")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--order", default="inter_json", choices=["inter_json", "user_sequence"])
    p.add_argument("--out", default="", help="result folder (default: a new temp folder)")
    p.add_argument("--reuse", action="store_true", help="load <out>/<model>.json instead of training when present")
    p.add_argument("--test-users", type=int, default=0, help="0 = all test users; >0 = seeded subset (same for every model)")
    p.add_argument("--val-users", type=int, default=5000, help="validation users for early stopping (seeded subset; 0 = all)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=42)
    # SASRec
    p.add_argument("--sasrec-loss", default="ce", choices=["ce", "bce"])
    p.add_argument("--sasrec-seconds", type=float, default=2400.0, help="SASRec training budget (0 = none)")
    p.add_argument("--sasrec-lr", type=float, default=3e-3)
    p.add_argument("--sasrec-batch", type=int, default=128)
    p.add_argument("--sasrec-patience", type=int, default=5)
    p.add_argument("--sasrec-early-stop", default="ndcg@10", choices=["ndcg@10", "nll"],
                   help="SASRec's early-stopping metric on the validation users: masked NDCG@10 (default) or the held-out "
                        "items' NLL under its softmax (lower; for a SASRec used as a distillation teacher)")
    p.add_argument("--sasrec-init", default="", help="continue from a saved sasrec_model folder (a second budget leg)")
    # RPG
    p.add_argument("--rpg-seconds", type=float, default=2400.0, help="RPG training budget (0 = none)")
    p.add_argument("--rpg-lr", type=float, default=1e-2, help="RPG's Beauty LR; at 3e-3 training stayed near the code-frequency loss")
    p.add_argument("--rpg-hidden", type=int, default=64, help="RPG's Beauty config: 448 (64 for CPU)")
    p.add_argument("--rpg-ff", type=int, default=256, help="feed-forward width of the RPG transformer (RPG's Beauty config: 1024)")
    p.add_argument("--rpg-codebooks", type=int, default=32)
    p.add_argument("--rpg-temperature", type=float, default=0.03)
    p.add_argument("--rpg-batch", type=int, default=128)
    p.add_argument("--rpg-patience", type=int, default=0, help="validations without gain before stopping; 0 = off (the cosine schedule ends at --rpg-epochs)")
    p.add_argument("--rpg-epochs", type=int, default=20, help="maximum RPG epochs (the cosine schedule decays to 0 at this epoch)")
    p.add_argument("--rpg-schedule", default="cosine", choices=["constant", "cosine"],
                   help="LR after warm-up: constant, or cosine to 0 at --rpg-epochs (RPG's reference schedule)")
    p.add_argument("--rpg-warmup", type=int, default=300, help="RPG linear warm-up steps")
    p.add_argument("--rpg-grad-clip", type=float, default=1.0, help="RPG gradient-norm clip (reference: 1.0; 0 = off)")
    p.add_argument("--rpg-item-loss-weight", type=float, default=1.0,
                   help="this x an item-level softmax on the mean code log-probs (not in the RPG paper, labelled in the "
                        "model name); 0 = off (then set --rpg-code-loss-weight > 0 and --rpg-distill-weight 0)")
    p.add_argument("--rpg-logits", default="dot", choices=["cosine", "dot"],
                   help="code logits: cos/temperature (RPG) or an unnormalised dot product (labelled)")
    p.add_argument("--rpg-pooling", default="sqrt", choices=["mean", "sqrt"],
                   help="item representation: mean of its code embeddings (RPG) or sum / sqrt(m) (labelled)")
    p.add_argument("--rpg-code-loss-weight", type=float, default=0.0,
                   help="weight of RPG's own loss (mean code cross-entropy); 0 = item-level loss only (labelled)")
    p.add_argument("--rpg-item-negatives", type=int, default=0,
                   help="uniform negatives per batch of the item-level loss; 0 = exact softmax over all items")
    p.add_argument("--rpg-item-loss-positions", type=int, default=0,
                   help="target positions per batch (random) that get the item-level loss; 0 = all")
    p.add_argument("--rpg-distill-weight", type=float, default=0.5,
                   help="alpha: the item-level target = (1-alpha) one-hot + alpha x the softmax of <out>/sasrec_model's logits "
                        "(knowledge distillation from the SASRec; not in the RPG paper, labelled; default 0.5; 0 = off)")
    p.add_argument("--rpg-distill-temperature", type=float, default=1.0, help="temperature of the teacher's softmax")
    p.add_argument("--pq-method", default="pq", choices=["pq", "opq"])
    p.add_argument("--rpg-embeddings", default="sasrec", choices=["text", "text+sasrec", "sasrec"],
                   help="what PQ quantizes: MiniLM item-text vectors, SASRec item embeddings (default; the ~5-word titles give codes without next-item signal, docs/beauty.md), or both (sasrec: run --models sasrec first, same --out)")
    # TIGER
    p.add_argument("--tiger-seconds", type=float, default=600.0)
    p.add_argument("--tiger-ids", default="sasrec", choices=["rqkmeans", "rqvae", "sasrec"],
                   help="rqkmeans / rqvae: the reference ID file index_<ids>.json (text IDs); sasrec: RQ-KMeans (3 x 256 + a "
                        "disambiguation code) of the SASRec item embeddings of <out>/sasrec_model (collaborative IDs, labelled)")
    p.add_argument("--tiger-beams", type=int, default=20)
    p.add_argument("--tiger-lr", type=float, default=1e-2, help="peak AdamW LR (the 22 Nov benchmark used 5e-3, constant)")
    p.add_argument("--tiger-schedule", default="cosine_time", choices=["constant", "cosine_time", "inverse_sqrt"],
                   help="LR after warm-up; cosine_time decays to 5%% at --tiger-seconds")
    p.add_argument("--tiger-warmup", type=int, default=200)
    p.add_argument("--tiger-dropout", type=float, default=0.0, help="22 Nov: 0.1")
    p.add_argument("--tiger-batch", type=int, default=256)
    p.add_argument("--tiger-layers", type=int, default=1, help="encoder and decoder layers each (TIGER paper: 4; 22 Nov: 2)")
    p.add_argument("--tiger-d-model", type=int, default=64, help="TIGER paper: 128")
    p.add_argument("--tiger-ff", type=int, default=256, help="TIGER paper: 1024")
    p.add_argument("--tiger-history", type=int, default=5, help="most recent items in the encoder input (22 Nov: 20)")
    p.add_argument("--tiger-patience", type=int, default=0, help="validations (every 700 steps) without gain; 0 = off")
    return p.parse_args(argv)


def load_avg() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # pragma: no cover - uptime missing
        return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _rows(ev, extra: dict) -> list[dict]:
    return [{**ev.row(mode), **extra} for mode in ("masked", "unmasked") if mode in ev.metrics]


def run_model(name: str, split, rows, args, data, out: Path, log, previous: dict) -> dict:
    """Train (when needed) and evaluate one model on the test rows; -> JSON-able result dict."""
    import numpy as np

    from animind_assets.lib.retrieval.evaluation import evaluate_scorer, popularity_scorer

    if name == "popularity":
        ev = evaluate_scorer(popularity_scorer(split, "test"), split, "test", "popularity (train+valid counts)", rows=rows,
                             n_boot=args.n_boot, seed=args.seed, log=log)
        return {"rows": _rows(ev, {}), "eval_seconds": ev.seconds, "train_seconds": 0.0, "examples_per_s": None,
                "stop_reason": "no training"}
    if name == "sasrec":
        from animind_assets.lib.retrieval.sasrec import SASRecConfig, save_sasrec, train_sasrec
        from animind_assets.lib.retrieval.seqtrain import SeqTrainConfig, make_scorer

        tcfg = SeqTrainConfig(
            max_len=50, batch_size=args.sasrec_batch * (2 if args.gpu else 1), lr=args.sasrec_lr, epochs=200,
            patience=args.sasrec_patience, early_stop_metric=args.sasrec_early_stop, val_users=args.val_users, max_train_seconds=args.sasrec_seconds,
            seed=args.seed, num_threads=args.threads, device=args.device,
        )
        cfg = SASRecConfig(hidden=64, blocks=2, heads=1, dropout=0.5, loss=args.sasrec_loss, train=tcfg)
        init = None
        if args.sasrec_init:
            from animind_assets.lib.retrieval.sasrec import load_sasrec

            init, _ = load_sasrec(args.sasrec_init)
            log(f"sasrec: starting from {args.sasrec_init}")
        res = train_sasrec(split, cfg, log=log, init=init)
        save_sasrec(res.model, str(out / "sasrec_model"), extra={"best": res.best, "stop_reason": res.stop_reason})
        label = f"SASRec-{args.sasrec_loss.upper()} (ours)"
        ev = evaluate_scorer(make_scorer(res.model, tcfg.max_len), split, "test", label, rows=rows, n_boot=args.n_boot,
                             seed=args.seed, log=log)
        return {"rows": _rows(ev, {}), "eval_seconds": ev.seconds, "train_seconds": res.train_seconds,
                "examples_per_s": res.positions_per_s, "stop_reason": res.stop_reason, "epochs": res.epochs,
                "best_val": res.best, "history": res.history, "config": cfg.to_dict(), "extra": res.extra,
                "init": args.sasrec_init or None}
    if name == "rpg":
        return run_rpg(split, rows, args, data, out, log)
    if name == "tiger":
        return run_tiger(split, rows, args, data, out, log)
    raise ValueError(name)


def item_vectors(kind: str, data, out: Path, log) -> "np.ndarray":
    """Item vectors for PQ: MiniLM text embeddings (cached in ``<out>/text_embeddings.npy``), the
    SASRec item embeddings of ``<out>/sasrec_model``, or both concatenated (each standardized by PQ)."""
    import numpy as np

    parts = []
    if "text" in kind:
        cache = out / "text_embeddings.npy"
        if cache.exists():
            vec = np.load(cache)
        else:
            from animind_assets.lib.embeddings import EmbeddingConfig, embed_texts

            items = data.items
            texts = [t if (t or "").strip() else f"Amazon beauty product {a}" for t, a in zip(items["text"].to_list(), items["asin"].to_list())]
            vec = embed_texts(texts, EmbeddingConfig(), log=log)
            np.save(cache, vec)
        parts.append(vec)
    if "sasrec" in kind:
        from animind_assets.lib.retrieval.sasrec import sasrec_item_vectors

        parts.append(sasrec_item_vectors(out_sasrec(out, f"{kind} item vectors")))
    from animind_assets.lib.retrieval.pq import combine_item_vectors

    return combine_item_vectors(parts)


def out_sasrec(out: Path, need: str):
    """The SASRec saved in ``<out>/sasrec_model`` (eval mode) for ``need`` (PQ vectors, the distillation teacher,
    TIGER's collaborative IDs, the diagnostic). Raises ``FileNotFoundError`` saying what to run when absent."""
    from animind_assets.lib.retrieval.sasrec import load_sasrec

    if not (out / "sasrec_model").exists():
        raise FileNotFoundError(f"{need} need(s) {out / 'sasrec_model'}: run --models sasrec first (same --out)")
    return load_sasrec(str(out / "sasrec_model"))[0]


def rpg_config(args, train=None):
    """``RPGConfig`` from the ``--rpg-*`` flags (``train``: its ``SeqTrainConfig``; default: the library's)."""
    from animind_assets.lib.retrieval.rpg import RPGConfig

    return RPGConfig(hidden=args.rpg_hidden, d_ff=args.rpg_ff, temperature=args.rpg_temperature, train=train,
                     item_loss_weight=args.rpg_item_loss_weight, item_negatives=args.rpg_item_negatives,
                     item_loss_positions=args.rpg_item_loss_positions, code_loss_weight=args.rpg_code_loss_weight,
                     logits=args.rpg_logits, pooling=args.rpg_pooling, distill_weight=args.rpg_distill_weight,
                     distill_temperature=args.rpg_distill_temperature)


def rpg_label(args) -> str:
    """The RPG row's name: the codes, and every choice that departs from the RPG paper (loss, positions that
    get the item loss, distillation, pooling, logits)."""
    kind = "exact" if args.rpg_item_negatives == 0 else f"{args.rpg_item_negatives} sampled negatives"
    parts = [f"RPG, {args.pq_method.upper()} {args.rpg_codebooks}x256 on {args.rpg_embeddings} vectors"]
    if args.rpg_code_loss_weight == 0:
        parts.append(f"item-level softmax only ({kind}; not RPG's code loss)")
    else:
        if args.rpg_code_loss_weight != 1.0:
            parts.append(f"code loss x{args.rpg_code_loss_weight:g}")
        if args.rpg_item_loss_weight > 0:
            parts.append(f"+ item-level loss x{args.rpg_item_loss_weight:g}, {kind}")
    if args.rpg_item_loss_weight > 0 and args.rpg_item_loss_positions > 0:
        parts.append(f"item loss on {args.rpg_item_loss_positions} positions per batch")
    if args.rpg_distill_weight > 0:
        parts.append(f"distilled from the SASRec (weight {args.rpg_distill_weight:g}, T {args.rpg_distill_temperature:g})")
    if args.rpg_pooling != "mean":
        parts.append(f"{args.rpg_pooling} pooling")
    if args.rpg_logits != "cosine":
        parts.append(f"{args.rpg_logits} logits")
    return ", ".join(parts) + " (ours)"


def run_rpg(split, rows, args, data, out: Path, log) -> dict:
    from animind_assets.lib.retrieval.evaluation import evaluate_scorer
    from animind_assets.lib.retrieval.pq import PQConfig, next_item_code_gain, product_quantize
    from animind_assets.lib.retrieval.rpg import save_rpg, train_rpg
    from animind_assets.lib.retrieval.seqtrain import SeqTrainConfig, make_scorer

    vec = item_vectors(args.rpg_embeddings, data, out, log)
    pq = product_quantize(vec, PQConfig(n_codebooks=args.rpg_codebooks, codebook_size=256, pca_dim=128, method=args.pq_method,
                                        num_threads=args.threads, seed=args.seed), log=log)
    # how predictable each codebook is from the previous item (held out: last training item -> validation item)
    gain = next_item_code_gain(pq.codes, split.train, np.array([t[-1] for t in split.train]), split.valid_targets, 256)
    pq.stats.update({"next_code_gain_mean_nats": round(float(gain.mean()), 4),
                     "codebooks_with_gain_over_0.01": int((gain > 0.01).sum())})
    log(f"pq codes: next-item code information gain {gain.mean():.4f} nats per codebook (random codes: ~0); "
        f"{int((gain > 0.01).sum())}/{len(gain)} codebooks above 0.01")
    tcfg = SeqTrainConfig(max_len=50, batch_size=args.rpg_batch, lr=args.rpg_lr, lr_schedule=args.rpg_schedule,
                          warmup_steps=args.rpg_warmup, grad_clip=args.rpg_grad_clip, epochs=args.rpg_epochs,
                          patience=args.rpg_patience, val_users=args.val_users, max_train_seconds=args.rpg_seconds,
                          seed=args.seed, num_threads=args.threads, device=args.device)
    cfg = rpg_config(args, train=tcfg)
    teacher = out_sasrec(out, "--rpg-distill-weight (the teacher)") if args.rpg_distill_weight > 0 else None
    res = train_rpg(split, pq.codes, 256, cfg, log=log, teacher=teacher)
    save_rpg(res.model, str(out / "rpg_model"), extra={"best": res.best, "pq": pq.stats})
    label = rpg_label(args)
    ev = evaluate_scorer(make_scorer(res.model, tcfg.max_len), split, "test", label, rows=rows, n_boot=args.n_boot,
                         seed=args.seed, log=log)
    return {"rows": _rows(ev, {}), "eval_seconds": ev.seconds, "train_seconds": res.train_seconds,
            "examples_per_s": res.positions_per_s, "stop_reason": res.stop_reason, "epochs": res.epochs,
            "invalid_id_rate": 0.0, "best_val": res.best, "history": res.history, "config": cfg.to_dict(),
            "pq": pq.stats, "extra": res.extra, "diagnostic": marginal_diagnostic(split, rows, args, out, pq.codes, log)}


def marginal_diagnostic(split, rows, args, out: Path, codes, log) -> dict | None:
    """Not a model: RPG's ranking rule (summed per-codebook code log-probabilities) fed with the SASRec's
    own per-codebook marginals on these codes. Near SASRec's figures = the codes and the scoring family
    are not what limits RPG; the learned code distributions are. Only when ``<out>/sasrec_model`` exists."""
    if "sasrec" not in args.rpg_embeddings or not (out / "sasrec_model").exists():
        return None
    from animind_assets.lib.retrieval.evaluation import evaluate_scorer
    from animind_assets.lib.retrieval.rpg import marginal_product_scorer
    from animind_assets.lib.retrieval.seqtrain import make_scorer

    sas = out_sasrec(out, "the diagnostic")
    ev = evaluate_scorer(marginal_product_scorer(make_scorer(sas, sas.cfg.train.max_len), codes, 256), split, "test",
                         "diagnostic: RPG ranking rule with SASRec's per-codebook marginals", rows=rows,
                         n_boot=args.n_boot, seed=args.seed, log=log)
    log(f"diagnostic (not a model): RPG's ranking rule on SASRec's per-codebook marginals of these codes: "
        f"R@10 {ev.metrics['masked']['recall@10']:.4f} / N@10 {ev.metrics['masked']['ndcg@10']:.4f} (masked)")
    return {"rows": _rows(ev, {})}


import numpy as np  # noqa: E402  (after the env defaults above)


def run_tiger(split, rows, args, data, out: Path, log) -> dict:
    """TIGER under a wall-clock budget: by default on collaborative IDs (RQ-KMeans, 3 x 256 + a disambiguation
    code, of the SASRec item embeddings of ``<out>/sasrec_model``; fifth round: R@10 0.0638 vs 0.0526 with the
    reference text IDs in the same 600 s; SASRec's training is outside TIGER's budget, as the RQ-VAE of text
    IDs is), ``--tiger-ids rqkmeans|rqvae`` = the reference ID files; constrained beam
    search with ``beams >= 10``, and the CPU recipe measured side by side on 30 Nov 2026 (docs/beauty.md):
    a 1+1-layer T5 (d_model 64), no dropout, the 5 most recent items, AdamW 1e-2 with ``cosine_time``
    decay over the budget (2.02x the 22 Nov recipe's Recall@10 in the same 600 s, side by side)."""
    from animind_assets.lib.data.amazon import beauty_dir
    from animind_assets.lib.retrieval.tiger import (
        SidCodec, TigerConfig, evaluate_on_split, leave_one_out, load_reference_index, train_tiger,
    )

    id_stats = None
    if args.tiger_ids == "sasrec":
        from animind_assets.lib.retrieval.tiger_data import rqkmeans_ids

        codes, id_stats = rqkmeans_ids(item_vectors("sasrec", data, out, log), seed=args.seed, log=log)
        log(f"tiger: RQ-KMeans IDs of the SASRec item embeddings: {id_stats}")
        codec = SidCodec.from_mapping({i: row for i, row in enumerate(codes.tolist())})
    else:
        codec = SidCodec.from_mapping(load_reference_index(beauty_dir() / f"index_{args.tiger_ids}.json"))
    sequences = {int(u): list(np.append(t, [v, te])) for u, t, v, te in
                 zip(split.users, split.train, split.valid_targets, split.test_targets)}
    tsplit = leave_one_out(sequences, max_history=args.tiger_history)
    cfg = TigerConfig(d_model=args.tiger_d_model, d_kv=args.tiger_d_model // 4, num_heads=4, d_ff=args.tiger_ff,
                      num_layers=args.tiger_layers, num_decoder_layers=args.tiger_layers, dropout=args.tiger_dropout,
                      max_history=args.tiger_history, batch_size=args.tiger_batch * (2 if args.gpu else 1), lr=args.tiger_lr,
                      warmup_steps=args.tiger_warmup, lr_schedule=args.tiger_schedule, epochs=200,
                      max_train_seconds=args.tiger_seconds, eval_every_steps=700, val_users=1000, val_beams=20, patience=args.tiger_patience,
                      num_threads=args.threads, device=args.device, seed=args.seed)
    res = train_tiger(tsplit, codec, cfg, log=log)
    label = ("TIGER, RQ-KMeans IDs of the SASRec item embeddings (ours)" if args.tiger_ids == "sasrec"
             else f"TIGER, reference {args.tiger_ids} IDs (ours)")
    ev = evaluate_on_split(res.model, codec, split, rows, max_history=cfg.max_history, beams=args.tiger_beams,
                           n_boot=args.n_boot, seed=args.seed, label=label, log=log)
    steps = res.steps
    return {"rows": _rows(ev, {"invalid_id_rate": ev.extra["invalid_id_rate"]}), "eval_seconds": ev.seconds,
            "train_seconds": res.train_seconds, "examples_per_s": steps * cfg.batch_size / max(1e-9, res.train_seconds),
            "stop_reason": res.stop_reason, "steps": steps, "invalid_id_rate": ev.extra["invalid_id_rate"],
            "best_val": res.best, "history": res.history, "config": cfg.to_dict(), "ids": args.tiger_ids, "id_stats": id_stats}


def setup_problem(args, models: list[str], out: Path) -> str:
    """What would make a selected model fail after minutes of work, found before any training: an
    invalid RPG configuration, or a model that needs ``<out>/sasrec_model`` (PQ codes of the SASRec vectors,
    the distillation teacher, TIGER's collaborative IDs) when SASRec is neither selected nor saved there.
    Returns '' when fine, else the message."""
    if "rpg" in models:
        try:
            rpg_config(args).validate()
        except ValueError as exc:
            return f"RPG flags: {exc}"
    if "sasrec" in models or (out / "sasrec_model").exists():
        return ""
    needs = []
    if "rpg" in models and "sasrec" in args.rpg_embeddings:
        needs.append(f"--rpg-embeddings {args.rpg_embeddings}")
    if "rpg" in models and args.rpg_distill_weight > 0:
        needs.append(f"--rpg-distill-weight {args.rpg_distill_weight:g} (teacher)")
    if "tiger" in models and args.tiger_ids == "sasrec":
        needs.append("--tiger-ids sasrec (collaborative IDs; --tiger-ids rqkmeans uses the reference text IDs)")
    if needs:
        return (f"{', '.join(needs)} need(s) {out / 'sasrec_model'}: add sasrec to --models, or run --models sasrec "
                "first with the same --out")
    return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gpu:
        args.device = "cuda"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ALL_MODELS]
    if bad:
        print(f"unknown model(s) {bad}; expected {ALL_MODELS}", file=sys.stderr)
        return 2
    from animind_assets.lib.data.amazon import beauty_dir, sequences_from_interactions
    from animind_assets.lib.data.amazon_split import load_prepared_split

    folder = beauty_dir()
    if not (folder / "inter.json").exists():
        print(f"Beauty split not found at {folder}: nothing to run", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="animind-beauty-")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from animind_assets.lib.retrieval.evaluation import PUBLISHED_BEAUTY, SequenceSplit, format_table, protocol, subset_note

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    problem = setup_problem(args, models, out)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    load_start = load_avg()
    print(f"results folder: {out}\nload at start: {load_start}\ndevice {args.device}, threads {args.threads}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}", flush=True)
    data = load_prepared_split(folder, order=args.order)
    sequences = sequences_from_interactions(data.interactions)
    split = SequenceSplit.from_sequences(sequences, n_items=data.items.height)
    rows = split.subset(args.test_users, seed=args.seed)
    print(f"split: {split.stats()}; order: {data.order}; {subset_note(args.test_users, len(split))}", flush=True)
    t_all = time.perf_counter()
    results: dict[str, dict] = {}
    for name in models:
        path = out / f"{name}.json"
        if args.reuse and path.exists():
            results[name] = json.loads(path.read_text(encoding="utf-8"))
            print(f"[{name}] reused {path}", flush=True)
            continue
        t0 = time.perf_counter()
        res = run_model(name, split, rows, args, data=data, out=out, log=lambda s: print(s, flush=True), previous=results)
        res["wall_seconds"] = round(time.perf_counter() - t0, 1)
        res["load_after"] = load_avg()
        path.write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
        results[name] = res
        print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {res['wall_seconds']:.0f}s -> {path}", flush=True)
    total = time.perf_counter() - t_all

    print("\n== ours: Amazon Beauty 5-core, leave-one-out test, full ranking over "
          f"{split.n_items:,} items, {len(rows):,} test users ==")
    table_rows = [r for name in models for r in results[name]["rows"]]
    print(format_table(table_rows, with_ci=True))
    print("\nspeed and budget:")
    for name in models:
        r = results[name]
        print(f"  {name:<11} examples/s {r.get('examples_per_s') or 0:>9,.0f}  train {r.get('train_seconds') or 0:>7.0f}s  "
              f"eval {r.get('eval_seconds') or 0:>6.0f}s  stop: {r.get('stop_reason', '-')}  "
              f"invalid-ID rate: {r.get('invalid_id_rate', '-')}  load after: {r.get('load_after', '-')}")
    diag = [r for name in models for r in (results[name].get("diagnostic") or {}).get("rows", [])]
    if diag:
        print("\ndiagnostic (not a model; same users):")
        print(format_table(diag, with_ci=True))
    print("\n== published (not measured here; other code, other machines) ==")
    print(format_table([{"model": k, "masking": "as published", **v} for k, v in PUBLISHED_BEAUTY.items()], with_ci=False))
    print("\nprotocol:", json.dumps({**protocol(split, "test", rows), "sequence_order": data.order}, indent=1))
    print(f"\ntotal wall time {total:.0f}s ({total / 60:.1f} min); load at end: {load_avg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
