"""``beauty_finetuned_model``: the semantic-ID LM fine-tuned on ``beauty_llm_prep_dataset``.

Thin layer over ``animind_assets.lib.llm.finetune.run_finetune`` (the same library, knobs and
launchpad fields as the anime ``finetuned_model``): tokenizer extended with the Beauty semantic-ID
tokens, new rows warm-started from the ``beauty_semantic_ids`` quantizer codebooks
(``<artifacts>/beauty_semantic_ids/quantizer/model.pt``; title centroids without it), two TRL SFT
phases (phase 1 linking-weighted, phase 2 next-item-weighted). The model can name every Beauty item
with an ID (the leave-one-out evaluation ranks the whole catalog). One atomic folder
``<artifacts>/beauty_finetuned_model/`` read by ``beauty_llm_eval``; metrics in MLflow.
"""

import time
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.defs.beauty.shared import GROUP
from animind_assets.defs.llm.shared import FINETUNE_DESCRIPTIONS
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.launchpad import derive_config
from animind_assets.lib.llm.finetune import FinetuneConfig, codebooks_from_checkpoint, run_finetune, save_model_folder
from animind_assets.lib.llm.sequence_data import item_lookup
from animind_assets.meta import lines_plot, scalar_metadata
from animind_assets.resources import ArtifactStoreResource, MlflowResource, data_dir

ASSET = "beauty_finetuned_model"
MODEL_DIR = ASSET
WORK_DIR = f"{ASSET}_work"
QUANTIZER_CKPT = ("beauty_semantic_ids", "quantizer", "model.pt")

BeautyFinetunedModelConfig = derive_config(
    FinetuneConfig,
    name="BeautyFinetunedModelConfig",
    asset=ASSET,
    extra={
        "quantizer_checkpoint": (str, Field("", description="codebooks for the warm start; '' = <artifacts>/beauty_semantic_ids/quantizer/model.pt")),
        "log_model_to_mlflow": (bool, Field(False, description="log the model folder as MLflow artifacts")),
    },
    descriptions=FINETUNE_DESCRIPTIONS,
)


def _codebooks(store, path: str, log):
    try:
        if path:
            return codebooks_from_checkpoint(path)
        if store.exists(*QUANTIZER_CKPT):
            with store.local_copy(*QUANTIZER_CKPT) as local:
                return codebooks_from_checkpoint(str(local))
        log(f"no {'/'.join(QUANTIZER_CKPT)} in the artifact store: warm start falls back to title centroids")
    except Exception as exc:  # noqa: BLE001 - the warm start is an optimisation, never a blocker
        log(f"could not read the quantizer codebooks ({type(exc).__name__}: {exc}); falling back to title centroids")
    return None


@dg.asset(
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "mlflow"},
    description="Causal LM fine-tuned (TRL SFT, two phases) to speak Beauty semantic IDs; folder at "
    "<artifacts>/beauty_finetuned_model/.",
)
def beauty_finetuned_model(
    context: dg.AssetExecutionContext,
    config: BeautyFinetunedModelConfig,
    artifacts: ArtifactStoreResource,
    mlflow: MlflowResource,
    beauty_llm_prep_dataset: pl.DataFrame,
    beauty_semantic_ids: pl.DataFrame,
    beauty_items: pl.DataFrame,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    store = artifacts.store()
    store.sweep(log=context.log.info)
    cfg = config.to_lib()
    lookup = item_lookup(beauty_items, beauty_semantic_ids, "item_id", "text")
    codebooks = _codebooks(store, config.quantizer_checkpoint, context.log.info) if cfg.warm_start == "rqvae" else None
    local_root = Path(store.root.path) if str(getattr(store.root, "protocol", "") or "") in ("", "file", "local") else data_dir()
    with mlflow.start_run(context, tags={"base_model": cfg.base_model, "dataset": "amazon_beauty"}) as run:
        result = run_finetune(beauty_llm_prep_dataset, lookup, cfg, local_root / WORK_DIR, codebooks=codebooks,
                              special_tokens=(), log=context.log.info, run=run)
        with store.atomic_dir(MODEL_DIR) as tmp:
            files = save_model_folder(result, lookup, tmp)
            if config.log_model_to_mlflow:
                for f in sorted(Path(tmp).iterdir()):
                    run.log_artifact(str(f), artifact_path="model")
        run.log_metrics(result.metrics)
        run_link = run.link
    m, info = result.metrics, result.info
    md = {
        **scalar_metadata({
            "base_model": cfg.base_model, "method": info["method"], "new_tokens_added": info["new_tokens_added"],
            "lookup_items": lookup.height, "phase1_steps_done": m.get("phase1_steps_done"),
            "phase2_steps_done": m.get("phase2_steps_done"), "stop_reason": info["stop_reason"],
            "phase1_train_loss": m.get("phase1_train_loss"), "phase2_train_loss": m.get("phase2_train_loss"),
            "phase1_val_loss": m.get("phase1_val_loss"), "phase2_val_loss": m.get("phase2_val_loss"),
            "phase2_tokens_per_s": m.get("phase2_tokens_per_s"),
            "english_ppl_ratio": m.get("english_ppl_ratio"),
            "phase2_sid_to_title_retrieval@1": m.get("phase2_sid_to_title_retrieval@1"),
            "phase2_title_to_sid_retrieval@1": m.get("phase2_title_to_sid_retrieval@1"),
            "warm_start": result.warm_start.mode if result.warm_start else "none",
            "materialize_seconds": round(time.perf_counter() - t0, 1), "mlflow_run": run_link,
        }),
        "model_folder": dg.MetadataValue.path(str(store.path(MODEL_DIR))),
        "files": dg.MetadataValue.json(files),
        "phase_mix": dg.MetadataValue.json(info["phase_mix"]),
    }
    losses = {p: [h["loss"] for h in result.history if h.get("phase") == p and "loss" in h] for p in ("phase1", "phase2")}
    if any(losses.values()):
        md.update(lines_plot("loss_plot", {k: v for k, v in losses.items() if v}, "training loss (completion tokens)",
                             xlabel="log step", ylabel="loss"))
    return dg.MaterializeResult(metadata=md)
