"""Shared Dagster-layer pieces of the LM assets (anime ``finetuned_model`` and ``beauty_finetuned_model``):
artifact-store folder names, launchpad descriptions, codebook loading, the train-and-publish step and the
loss plot."""

from pathlib import Path

GROUP = "llm"
MODEL_DIR = "finetuned_model"
WORK_DIR = "finetuned_model_work"

#: launchpad descriptions of the ``FinetuneConfig`` fields (shared by ``finetuned_model`` and ``beauty_finetuned_model``)
FINETUNE_DESCRIPTIONS: dict[str, str] = {
    "base_model": 'embedded SmolLM2-135M-Instruct GGUF | Hugging Face model id | local folder',
    "gguf_file": 'GGUF file name inside base_model (folder or repo)',
    "revision": 'model revision (Hugging Face ids); HF_TOKEN only from the environment',
    "method": "'auto' (full below lora_above_params, else LoRA) | 'full' | 'lora'",
    "lora_above_params": "parameter count from which 'auto' picks LoRA",
    "lora_r": 'LoRA rank',
    "lora_alpha": 'LoRA alpha',
    "lora_dropout": 'LoRA dropout',
    "train_layers": 'full method: train only the top N transformer blocks + tied embeddings/head (0 = every block; the default keeps the shared 2-core CPU run bounded)',
    "keep_layers": 'layer pruning: keep the first N-1 blocks of the base model and its last (0 = every block); '
    'faster training and decoding, English suffers; train_layers counts the kept blocks',
    "phase1_max_steps": 'optimizer steps of phase 1 (linking); demo-scale default, raise on a GPU',
    "phase2_max_steps": 'optimizer steps of phase 2 (recommendation/reasoning); demo-scale default, raise on a GPU',
    "phase1_lr": 'peak learning rate of phase 1',
    "phase2_lr": 'peak learning rate of phase 2',
    "warmup_frac": "warm-up share of each phase's steps",
    "lr_scheduler": 'transformers lr scheduler name',
    "weight_decay": 'AdamW weight decay',
    "batch_size": 'examples per device step (on a 2-core CPU within a 30-minute budget batch 8 beat 32: the figure follows the number of updates; docs/beauty.md)',
    "grad_accum": 'gradient accumulation steps',
    "max_seq_length": 'longer examples are skipped (counted)',
    "general_mix_file": 'local JSONL of general instructions ({prompt, completion} or {messages})',
    "general_mix_ratio": 'share of each phase drawn from general_mix_file',
    "warm_start": "'rqvae' (ridge from codebooks) | 'projection' (codebooks, geometry kept) | 'centroid' | 'mean' | 'none'",
    "ridge_alpha": 'ridge regularisation of the codebook -> embedding projection',
    "use_chat_template": "render prompts with the tokenizer's chat template",
    "fast_loss": 'apply the LM head only at completion positions',
    "num_threads": 'torch CPU threads (shared CPU: keep it small)',
    "seed": 'training seed',
    "save_steps": 'checkpoint every N steps (0 = at the end of each phase)',
    "resume": "resume from the work folder's checkpoints",
    "keep_checkpoints": 'keep phase checkpoints after success',
    "eval_examples": 'validation rows per task for the per-phase validation loss',
    "english_ppl": 'English-retention perplexity before/after',
    "save_dtype": "'float32' | 'bfloat16'",
    "bf16": 'bf16 autocast while training',
    "replay_ratio": "English-retention replay: share of each phase drawn from the base model's own answers to the "
    "shipped general prompts (self-distillation, no downloads)",
    "replay_max_new_tokens": "length cap of each self-distilled replay answer",
}


def semantic_ids_provenance(context, asset: str) -> dict:
    """Which semantic IDs this build of ``asset`` uses, and why it is rebuilt, as metadata values.

    Reads the latest ``semantic_ids`` materialization (its data version = the ID-space hash, its
    ``id_change_reason``) and this asset's previous materialization (the ID version it was built
    on). Returns ``{"semantic_ids_version", "semantic_ids_change"}``; ``{}`` without an instance.
    """
    import dagster as dg

    try:
        sid = context.instance.get_latest_materialization_event(dg.AssetKey("semantic_ids"))
        prev = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    except Exception:  # pragma: no cover - direct invocation without an instance
        return {}
    if sid is None or sid.asset_materialization is None:
        return {}
    mat = sid.asset_materialization
    version = (mat.tags or {}).get("dagster/data_version", "")
    reason_v = mat.metadata.get("id_change_reason")
    reason = getattr(reason_v, "value", reason_v) or ""
    built_on = ""
    if prev is not None and prev.asset_materialization is not None:
        v = prev.asset_materialization.metadata.get("semantic_ids_version")
        built_on = str(getattr(v, "value", v) or "")
    if not built_on:
        change = f"first build on semantic IDs {version}"
    elif built_on == version:
        change = f"semantic IDs unchanged since the previous build ({version}); rebuilt for another reason"
    else:
        change = f"semantic IDs changed {built_on} -> {version}: {reason}"
    return {"semantic_ids_version": dg.MetadataValue.text(version), "semantic_ids_change": dg.MetadataValue.text(change)}


def load_codebooks(store, path: str, default: tuple[str, ...], log) -> list | None:
    """Quantizer codebooks for the warm start: ``path`` when given, else the artifact-store file ``default``.

    Returns ``None`` (the warm start falls back to title centroids, said in ``log``) when the file is
    missing or unreadable: the warm start is an optimisation, never a blocker.
    """
    from animind_assets.lib.llm.finetune import codebooks_from_checkpoint

    try:
        if path:
            return codebooks_from_checkpoint(path)
        if store.exists(*default):
            with store.local_copy(*default) as local:
                return codebooks_from_checkpoint(str(local))
        log(f"no {'/'.join(default)} in the artifact store: warm start falls back to title centroids")
    except Exception as exc:  # noqa: BLE001 - the warm start is an optimisation, never a blocker
        log(f"could not read the quantizer codebooks ({type(exc).__name__}: {exc}); falling back to title centroids")
    return None


def train_and_publish(context, store, mlflow, cfg, dataset, lookup, *, codebooks, special_tokens, model_dir: str,
                      work_dir: str, log_model: bool, tags: dict, teacher=None, teacher_items: int | None = None,
                      teacher_fingerprint: str = ""):
    """``run_finetune`` inside an MLflow run, then the model folder published atomically at ``model_dir``.

    ``teacher`` / ``teacher_items`` / ``teacher_fingerprint``: the distillation teacher for ``cfg.distill_weight > 0`` (``run_finetune``).
    The work folder (checkpoints, resume) stays on local disk: under the artifact store when it is local,
    else under ``data_dir()``. Returns ``(result, files, mlflow_run_id, mlflow_run_link)``.
    """
    from animind_assets.lib.llm.finetune import run_finetune, save_model_folder
    from animind_assets.resources import data_dir

    local_root = Path(store.root.path) if str(getattr(store.root, "protocol", "") or "") in ("", "file", "local") else data_dir()
    with mlflow.start_run(context, tags=tags) as run:
        result = run_finetune(dataset, lookup, cfg, local_root / work_dir, codebooks=codebooks,
                              special_tokens=special_tokens, log=context.log.info, run=run, teacher=teacher,
                              teacher_items=teacher_items, teacher_fingerprint=teacher_fingerprint)
        with store.atomic_dir(model_dir) as tmp:
            files = save_model_folder(result, lookup, tmp)
            if log_model:
                for f in sorted(Path(tmp).iterdir()):
                    run.log_artifact(str(f), artifact_path="model")
        run.log_metrics(result.metrics)
        return result, files, run.run_id, run.link


def phase_losses(history: list[dict]) -> dict[str, list[float]]:
    """Training loss per phase (``phase1``/``phase2``) from ``run_finetune``'s history; phases without any left out."""
    losses = {p: [h["loss"] for h in history if h.get("phase") == p and "loss" in h] for p in ("phase1", "phase2")}
    return {p: ys for p, ys in losses.items() if ys}
