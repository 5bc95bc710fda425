"""``rpg_model``: RPG (Hou et al., KDD 2025) on the Beauty leave-one-out split, over ``beauty_pq_codes``.

Thin layer over ``animind_assets.lib.retrieval.rpg``: item representation = mean of its code
embeddings, small causal transformer, all codes of the next item predicted at once (one softmax per
codebook), exact scoring of every item by the sum of its codes' log-probabilities. Trained on every
prefix of ``seq[:-2]``, early-stopped on validation NDCG@10 (seen items masked). Model folder
``<artifacts>/rpg_model/model/`` (weights incl. the codes, ``config.json``, ``extra.json``), read by
``beauty_eval``.
"""

import time

import dagster as dg
import numpy as np
import polars as pl

from animind_assets.defs.beauty.shared import GROUP, curve_metadata, load_sasrec_asset, split_from_interactions
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.retrieval.rpg import RPGConfig, save_rpg, train_rpg
from animind_assets.meta import scalar_metadata
from animind_assets.resources import ArtifactStoreResource
from animind_assets.launchpad import derive_config

ASSET = "rpg_model"


RpgModelConfig = derive_config(
    RPGConfig,
    name="RpgModelConfig",
    asset="rpg_model",
    nested=("train",),
    descriptions={
        "hidden": 'hidden size (paper: 448)',
        "layers": 'transformer layers',
        "heads": 'attention heads',
        "d_ff": 'feed-forward width',
        "emb_dropout": 'dropout on the input item representations',
        "attn_dropout": 'dropout on attention weights',
        "resid_dropout": 'dropout on residual branches',
        "temperature": 'softmax temperature of the cosine code logits',
        "distill_weight": 'knowledge distillation from sasrec_model: weight of its softmax in the item-level target (needs item_loss_weight > 0, item_negatives 0; not in the paper)',
        "distill_temperature": 'temperature of the teacher softmax',
    },
)


@dg.asset(
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch"},
    deps=["sasrec_model"],
    description="RPG: parallel prediction of long PQ semantic IDs, exact scoring of all items; early-stopped on val NDCG@10.",
)
def rpg_model(
    context: dg.AssetExecutionContext,
    config: RpgModelConfig,
    artifacts: ArtifactStoreResource,
    beauty_interactions: pl.DataFrame,
    beauty_pq_codes: pl.DataFrame,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    cfg = config.to_lib().validate()
    codes_df = beauty_pq_codes.sort("item_id")
    if codes_df["item_id"].to_list() != list(range(codes_df.height)):
        raise ValueError("beauty_pq_codes: item_id must be 0..n-1 without gaps")
    codes = np.asarray(codes_df["codes"].to_list(), dtype=np.int64)
    split, data_fp = split_from_interactions(beauty_interactions, n_items=codes_df.height)
    codebook_size = int(codes.max()) + 1
    codebook_size = 1 << (codebook_size - 1).bit_length()  # the PQ codebook size (a power of two)
    context.log.info(f"{ASSET}: {codes.shape[1]} codes x {codebook_size} per item; split {split.stats()}")
    teacher = None
    if cfg.distill_weight > 0:  # knowledge distillation from the sasrec_model (docs/beauty.md, fifth round)
        teacher, _ = load_sasrec_asset(artifacts, f"{ASSET}: distill_weight={cfg.distill_weight} (the teacher; or set distill_weight: 0)",
                                       data_fp=data_fp)
        context.log.info(f"{ASSET}: distilling from sasrec_model (weight {cfg.distill_weight}, T {cfg.distill_temperature})")
    res = train_rpg(split, codes, codebook_size, cfg, log=context.log.info, teacher=teacher)
    dest = str(artifacts.store().path(ASSET, "model"))
    save_rpg(res.model, dest, extra={"best": res.best, "stop_reason": res.stop_reason, "history": res.history,
                                     "data_fingerprint": data_fp, "positions_per_s": res.positions_per_s})
    md = {
        **scalar_metadata({
            "n_codebooks": int(codes.shape[1]), "codebook_size": codebook_size, "parameters": res.extra["parameters"],
            "epochs": res.epochs, "steps": res.steps, "stop_reason": res.stop_reason,
            "train_seconds": round(res.train_seconds, 1), "examples_per_s": round(res.positions_per_s, 1),
            "best_epoch": int(res.best.get("epoch", 0)), "best_val_ndcg@10": res.best.get("val_ndcg@10"),
            "best_val_recall@10": res.best.get("val_recall@10"), "val_users": res.extra["val_users"], "model_dir": dest,
            "distill_weight": cfg.distill_weight, "data_fingerprint": data_fp, "materialize_seconds": round(time.perf_counter() - t0, 1),
        }),
        "config": dg.MetadataValue.json(cfg.to_dict()),
        **curve_metadata(res.history, "RPG"),
    }
    return dg.MaterializeResult(metadata=md)
