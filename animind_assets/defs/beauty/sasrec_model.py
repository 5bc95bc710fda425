"""``sasrec_model``: ID-based SASRec (Kang & McAuley 2018) trained on the Beauty leave-one-out split.

Thin layer over ``animind_assets.lib.retrieval.sasrec``: full softmax cross-entropy over all items by
default (``loss='bce'`` = the original 1-negative variant), 2 blocks, 50 positions, dropout 0.5, every
prefix of ``seq[:-2]`` as a training target, early stopping on validation NDCG@10 (seen items
masked) or, with ``train.early_stop_metric: nll``, on the validation items' NLL (for a teacher). The model folder ``<artifacts>/sasrec_model/model/`` (``weights.pt`` + ``config.json`` +
``extra.json``) is written atomically and read by ``beauty_eval``.
"""

import time

import dagster as dg
import polars as pl

from animind_assets.defs.beauty.shared import GROUP, curve_metadata, split_from_interactions
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.retrieval.sasrec import SASRecConfig, save_sasrec, train_sasrec
from animind_assets.meta import scalar_metadata
from animind_assets.resources import ArtifactStoreResource
from animind_assets.launchpad import derive_config

ASSET = "sasrec_model"


SasrecModelConfig = derive_config(
    SASRecConfig,
    name="SasrecModelConfig",
    asset="sasrec_model",
    nested=("train",),
    descriptions={
        "loss": "'ce' (full softmax over all items) | 'bce' (1 sampled negative, original paper)",
        "hidden": 'hidden size',
        "blocks": 'self-attention blocks',
        "heads": 'attention heads',
        "dropout": 'dropout (embeddings, attention, residual/FFN)',
    },
)


@dg.asset(
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch"},
    description="SASRec (full-softmax CE by default) on the Beauty leave-one-out split; early-stopped on val NDCG@10 "
                "(or on val NLL: train.early_stop_metric).",
)
def sasrec_model(
    context: dg.AssetExecutionContext,
    config: SasrecModelConfig,
    artifacts: ArtifactStoreResource,
    beauty_interactions: pl.DataFrame,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    cfg = config.to_lib().validate()
    split, data_fp = split_from_interactions(beauty_interactions)
    context.log.info(f"{ASSET}: split {split.stats()}")
    res = train_sasrec(split, cfg, log=context.log.info)
    dest = str(artifacts.store().path(ASSET, "model"))
    save_sasrec(res.model, dest, extra={"best": res.best, "stop_reason": res.stop_reason, "history": res.history,
                                        "data_fingerprint": data_fp, "positions_per_s": res.positions_per_s})
    md = {
        **scalar_metadata({
            "loss": cfg.loss, "parameters": res.extra["parameters"], "epochs": res.epochs, "steps": res.steps,
            "stop_reason": res.stop_reason, "train_seconds": round(res.train_seconds, 1),
            "examples_per_s": round(res.positions_per_s, 1), "best_epoch": int(res.best.get("epoch", 0)),
            "best_val_ndcg@10": res.best.get("val_ndcg@10"), "best_val_recall@10": res.best.get("val_recall@10"),
            "best_val_nll": res.best.get("val_nll"), "early_stop_metric": cfg.train.early_stop_metric,
            "val_users": res.extra["val_users"], "model_dir": dest, "data_fingerprint": data_fp,
            "materialize_seconds": round(time.perf_counter() - t0, 1),
        }),
        "config": dg.MetadataValue.json(cfg.to_dict()),
        **curve_metadata(res.history, "SASRec"),
    }
    return dg.MaterializeResult(metadata=md)
