"""``beauty_finetuned_model``: the semantic-ID LM fine-tuned on ``beauty_llm_prep_dataset``.

Thin layer over ``animind_assets.lib.llm.finetune.run_finetune`` (the same library, knobs and
launchpad fields as the anime ``finetuned_model``): tokenizer extended with the Beauty semantic-ID
tokens, new rows warm-started from the ``beauty_semantic_ids`` quantizer codebooks
(``<artifacts>/beauty_semantic_ids/quantizer/model.pt``; title centroids without it), two TRL SFT
phases (phase 1 linking-weighted, phase 2 next-item-weighted). With ``distill_weight > 0`` the materialized
``sasrec_model`` is the teacher of knowledge distillation (``lib/llm/distill.py``; it must score the same
items and have been trained on the same ``beauty_interactions``). The model can name every Beauty item
with an ID (the leave-one-out evaluation ranks the whole catalog). One atomic folder
``<artifacts>/beauty_finetuned_model/`` read by ``beauty_llm_eval``; metrics in MLflow.
"""

import time

import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.defs.beauty.shared import GROUP, load_sasrec_asset, split_from_interactions
from animind_assets.defs.llm.shared import FINETUNE_DESCRIPTIONS, load_codebooks, phase_losses, train_and_publish
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.launchpad import derive_config
from animind_assets.lib.llm.finetune import FinetuneConfig
from animind_assets.lib.llm.id_input_rows import INFO_KEY as ID_INPUT_KEY
from animind_assets.lib.llm.sequence_data import item_lookup
from animind_assets.meta import lines_plot, scalar_metadata
from animind_assets.resources import ArtifactStoreResource, MlflowResource

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


@dg.asset(
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "mlflow"},
    deps=["sasrec_model"],  # the distillation teacher (read only with distill_weight > 0)
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
    beauty_interactions: pl.DataFrame,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    store = artifacts.store()
    store.sweep(log=context.log.info)
    cfg = config.to_lib()
    lookup = item_lookup(beauty_items, beauty_semantic_ids, "item_id", "text")
    codebooks = (load_codebooks(store, config.quantizer_checkpoint, QUANTIZER_CKPT, context.log.info)
                 if cfg.warm_start in ("rqvae", "projection") else None)
    teacher, teacher_fp = None, ""
    if cfg.distill_weight > 0:  # knowledge distillation from the sasrec_model (docs/beauty.md)
        from animind_assets.lib.llm.distill import model_teacher

        _, data_fp = split_from_interactions(beauty_interactions, n_items=beauty_items.height)
        sasrec, _ = load_sasrec_asset(artifacts, f"{ASSET}: distill_weight={cfg.distill_weight} (the teacher; or set "
                                      "distill_weight: 0)", data_fp=data_fp)
        if sasrec.n_items != beauty_items.height:
            raise ValueError(f"{ASSET}: sasrec_model scores {sasrec.n_items} items, beauty_items has {beauty_items.height}: "
                             "rematerialize sasrec_model")
        teacher, teacher_fp = model_teacher([sasrec], data_fingerprint=data_fp)
        context.log.info(f"{ASSET}: distilling from sasrec_model (weight {cfg.distill_weight}, T {cfg.distill_temperature})")
    result, files, _, run_link = train_and_publish(
        context, store, mlflow, cfg, beauty_llm_prep_dataset, lookup, codebooks=codebooks, special_tokens=(),
        teacher=teacher, teacher_items=beauty_items.height, teacher_fingerprint=teacher_fp,
        model_dir=MODEL_DIR, work_dir=WORK_DIR, log_model=config.log_model_to_mlflow,
        tags={"base_model": cfg.base_model, "dataset": "amazon_beauty"},
    )
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
            "distill_weight": cfg.distill_weight, "distill_positions": m.get("distill_positions"),
            # input-side ID rows (FinetuneConfig.id_input_rows): the block they enter at and their mean L2 norm
            "id_input_rows_layer": (info.get(ID_INPUT_KEY) or {}).get("layer"),
            "id_input_rows_norm_mean": m.get("id_input_rows_norm_mean"),
            "distill_temperature": m.get("distill_temperature_fitted", cfg.distill_temperature),
            "distill_temperature_fit": cfg.distill_temperature_fit if cfg.distill_temperature == 0 else "fixed",
            "materialize_seconds": round(time.perf_counter() - t0, 1), "mlflow_run": run_link,
        }),
        "model_folder": dg.MetadataValue.path(str(store.path(MODEL_DIR))),
        "files": dg.MetadataValue.json(files),
        "phase_mix": dg.MetadataValue.json(info["phase_mix"]),
    }
    losses = phase_losses(result.history)
    if losses:
        md.update(lines_plot("loss_plot", losses, "training loss (completion tokens)",
                             xlabel="log step", ylabel="loss"))
    return dg.MaterializeResult(metadata=md)
