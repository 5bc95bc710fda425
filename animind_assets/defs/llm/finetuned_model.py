"""``finetuned_model``: a causal LM that reads and writes semantic IDs.

Thin layer over ``animind_assets.lib.llm.finetune``: tokenizer extended with the semantic-ID tokens
used by ``llm_prep_dataset`` plus the special tokens, new embeddings warm-started from the RQ-VAE
codebooks (``<artifacts>/rqvae_model/model.pt``), two TRL SFT phases (linking, then
recommendation/reasoning), English-retention perplexity before/after, metrics + model in MLflow.
With ``distill_weight > 0`` an EASE model fitted on the lists of the users outside validation/test is
the teacher of knowledge distillation (``lib/llm/distill.py``; set completion, "sequence" form rows).

Output: one atomic folder ``<artifacts>/finetuned_model/`` (model, tokenizer, ``sid_lookup.parquet``,
``animind_llm.json``, ``history.json``) read by ``recommendation_eval`` and ``python -m
animind_assets.recommend``. Phase checkpoints live in ``<artifacts>/finetuned_model_work/`` (a
re-run with the same inputs and config resumes there).
"""

import time

import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.llm.data import model_lookup
from animind_assets.lib.llm.finetune import FinetuneConfig
from animind_assets.lib.llm.id_input_rows import INFO_KEY as ID_INPUT_KEY
from animind_assets.meta import lines_plot, markdown_table, scalar_metadata
from animind_assets.lib.semantic_ids.tokens import SPECIAL_TOKENS
from animind_assets.resources import ArtifactStoreResource, MlflowResource

from animind_assets.defs.llm.shared import (
    FINETUNE_DESCRIPTIONS, GROUP, MODEL_DIR, WORK_DIR, load_codebooks, phase_losses, semantic_ids_provenance, train_and_publish,
)
from animind_assets.launchpad import derive_config


FinetunedModelConfig = derive_config(
    FinetuneConfig,
    name="FinetunedModelConfig",
    asset="finetuned_model",
    extra={
        "rqvae_checkpoint": (str, Field("", description="quantizer checkpoint; '' = <artifacts>/rqvae_model/model.pt")),
        "lookup_scope": (str, Field("dataset", description="anime the model can name: 'dataset' (in llm_prep_dataset) | 'all'")),
        "log_model_to_mlflow": (bool, Field(True, description="log the model folder as MLflow artifacts")),
        "distill_ease_lambda": (float, Field(500.0, description="distill_weight > 0: L2 weight of the EASE teacher, fitted "
                                             "on the lists of the users outside validation/test")),
    },
    descriptions=FINETUNE_DESCRIPTIONS,
)


def _device() -> str:
    from animind_assets.lib.common.device import describe_device

    return describe_device("auto")


@dg.asset(
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    deps=["rqvae_model"],
    kinds={"pytorch", "mlflow"},
    description="Causal LM fine-tuned (TRL SFT, two phases) to speak semantic IDs; folder at "
    "<artifacts>/finetuned_model/ with the semantic-ID lookup.",
)
def finetuned_model(
    context: dg.AssetExecutionContext,
    config: FinetunedModelConfig,
    artifacts: ArtifactStoreResource,
    mlflow: MlflowResource,
    llm_prep_dataset: pl.DataFrame,
    semantic_ids: pl.DataFrame,
    anime_prep: pl.DataFrame,
    user_interactions: pl.DataFrame,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    store = artifacts.store()
    store.sweep(log=context.log.info)  # half-written model folders of killed runs (.finetuned_model.tmp-p<pid>-*)
    cfg = config.to_lib()
    lookup = model_lookup(anime_prep, semantic_ids, llm_prep_dataset, config.lookup_scope)
    context.log.info(f"model lookup: {lookup.height} anime ({config.lookup_scope})")
    teacher, teacher_items, teacher_fp = None, None, ""
    if cfg.distill_weight > 0:  # knowledge distillation from EASE on the training users' lists (lib/llm/distill.py)
        from animind_assets.lib.llm.distill import ease_teacher, teacher_fingerprint
        from animind_assets.lib.llm.evaluation import baseline_training_users
        from animind_assets.lib.retrieval.item_baselines import EASE

        users = baseline_training_users(llm_prep_dataset, user_interactions)
        ease = EASE(user_interactions, users, config.distill_ease_lambda)
        teacher_items = int(max(int(ease.items.max()), int(lookup["anime_id"].max()))) + 1
        teacher = ease_teacher(ease, teacher_items)
        teacher_fp = teacher_fingerprint(ease.items, ease.B, ease_lambda=config.distill_ease_lambda)
        context.log.info(f"distillation teacher: EASE (lambda {config.distill_ease_lambda}) on {len(users)} training users' "
                         f"lists, {len(ease.items)} items")
    codebooks = (load_codebooks(store, config.rqvae_checkpoint, ("rqvae_model", "model.pt"), context.log.info)
                 if cfg.warm_start in ("rqvae", "projection") else None)
    result, files, run_id, run_link = train_and_publish(
        context, store, mlflow, cfg, llm_prep_dataset, lookup, codebooks=codebooks, special_tokens=SPECIAL_TOKENS,
        model_dir=MODEL_DIR, work_dir=WORK_DIR, log_model=config.log_model_to_mlflow, tags={"base_model": cfg.base_model},
        teacher=teacher, teacher_items=teacher_items, teacher_fingerprint=teacher_fp,
    )
    elapsed = time.perf_counter() - t0
    m = result.metrics
    info = result.info
    md: dict = {
        **scalar_metadata(
            {
                "base_model": cfg.base_model,
                "method": info["method"],
                "device": _device(),
                "new_tokens_added": info["new_tokens_added"],
                "sid_tokens": info["sid_tokens"],
                "lookup_anime": lookup.height,
                "phase1_steps": cfg.phase1_max_steps,
                "phase2_steps": cfg.phase2_max_steps,
                "phase1_train_loss": m.get("phase1_train_loss"),
                "phase2_train_loss": m.get("phase2_train_loss"),
                "phase1_val_loss": m.get("phase1_val_loss"),
                "phase2_val_loss": m.get("phase2_val_loss"),
                "phase1_tokens_per_s": m.get("phase1_tokens_per_s"),
                "phase2_tokens_per_s": m.get("phase2_tokens_per_s"),
                "english_ppl_before": m.get("english_ppl_before"),
                "english_ppl_after": m.get("english_ppl_after"),
                "english_ppl_ratio": m.get("english_ppl_ratio"),
                "replay_ratio": cfg.replay_ratio,
                "phase1_sid_to_title_exact": m.get("phase1_sid_to_title_exact"),
                "phase1_sid_to_title_retrieval@1": m.get("phase1_sid_to_title_retrieval@1"),
                "phase1_title_to_sid_exact": m.get("phase1_title_to_sid_exact"),
                "phase1_title_to_sid_retrieval@1": m.get("phase1_title_to_sid_retrieval@1"),
                "phase2_sid_to_title_exact": m.get("phase2_sid_to_title_exact"),
                "phase2_sid_to_title_retrieval@1": m.get("phase2_sid_to_title_retrieval@1"),
                "phase2_title_to_sid_exact": m.get("phase2_title_to_sid_exact"),
                "phase2_title_to_sid_retrieval@1": m.get("phase2_title_to_sid_retrieval@1"),
                "warm_start": (result.warm_start.mode if result.warm_start else "none"),
                "distill_weight": cfg.distill_weight,
                "distill_temperature": m.get("distill_temperature_fitted", cfg.distill_temperature),
                "distill_temperature_fit": cfg.distill_temperature_fit if cfg.distill_temperature == 0 else "fixed",
                "distill_positions": m.get("distill_positions"),
                # input-side ID rows (FinetuneConfig.id_input_rows): the block they enter at and their mean L2 norm
                "id_input_rows_layer": (info.get(ID_INPUT_KEY) or {}).get("layer"),
                "id_input_rows_norm_mean": m.get("id_input_rows_norm_mean"),
                "materialize_seconds": round(elapsed, 1),
            }
        ),
        "model_folder": dg.MetadataValue.path(str(store.path(MODEL_DIR))),
        "files": dg.MetadataValue.json(files),
        "phase_mix": dg.MetadataValue.json(info["phase_mix"]),
        **semantic_ids_provenance(context, "finetuned_model"),
    }
    if result.warm_start:
        md["warm_start_ridge_r2"] = dg.MetadataValue.json(result.warm_start.ridge_r2)
    if run_id:
        md["mlflow_run_id"] = dg.MetadataValue.text(run_id)
        md["mlflow_run"] = dg.MetadataValue.url(run_link)
    losses = phase_losses(result.history)
    if losses:
        md.update(lines_plot("loss_plot", losses, "training loss (completion tokens)", xlabel="log step", ylabel="loss"))
        hist = pl.DataFrame([{k: h.get(k) for k in ("phase", "step", "loss", "mean_token_accuracy", "learning_rate")} for h in result.history if "loss" in h])
        md["history_tail"] = dg.MetadataValue.md(markdown_table(hist.tail(10)))
    context.log.info(
        f"finetuned_model: {cfg.phase1_max_steps}+{cfg.phase2_max_steps} steps in {elapsed:.0f}s on {_device()}, "
        f"English ppl {m.get('english_ppl_before', float('nan')):.2f} -> {m.get('english_ppl_after', float('nan')):.2f}"
    )
    return dg.MaterializeResult(metadata=md)
