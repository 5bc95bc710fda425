"""``finetuned_model``: a causal LM that reads and writes semantic IDs.

Thin layer over ``animind_assets.lib.llm_finetune``: tokenizer extended with the semantic-ID tokens
used by ``llm_prep_dataset`` plus the special tokens, new embeddings warm-started from the RQ-VAE
codebooks (``<artifacts>/rqvae_model/model.pt``), two TRL SFT phases (linking, then
recommendation/reasoning), English-retention perplexity before/after, metrics + model in MLflow.

Output: one atomic folder ``<artifacts>/finetuned_model/`` (model, tokenizer, ``sid_lookup.parquet``,
``animind_llm.json``, ``history.json``) read by ``recommendation_eval`` and ``python -m
animind_assets.recommend``. Phase checkpoints live in ``<artifacts>/finetuned_model_work/`` (a
re-run with the same inputs and config resumes there).
"""

import time
from pathlib import Path

import dagster as dg
import polars as pl
import torch
from pydantic import Field

from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.llm_data import SPECIAL_TOKENS, sid_lookup_frame
from animind_assets.lib.llm_finetune import EMBEDDED_MODEL, FinetuneConfig, codebooks_from_checkpoint, run_finetune, save_model_folder
from animind_assets.lib.plots import lines_png
from animind_assets.meta import image_md, markdown_table, scalar_metadata
from animind_assets.resources import ArtifactStoreResource, MlflowResource, data_dir

GROUP = "llm"
MODEL_DIR = "finetuned_model"
WORK_DIR = "finetuned_model_work"


class FinetunedModelConfig(dg.Config):
    base_model: str = Field(EMBEDDED_MODEL, description="embedded SmolLM2-135M-Instruct GGUF | Hugging Face model id | local folder")
    gguf_file: str = Field("", description="GGUF file name inside base_model (folder or repo)")
    revision: str = Field("", description="model revision (Hugging Face ids); HF_TOKEN only from the environment")
    method: str = Field("auto", description="'auto' (full below lora_above_params, else LoRA) | 'full' | 'lora'")
    lora_above_params: float = Field(1.0e9, description="parameter count from which 'auto' picks LoRA")
    lora_r: int = Field(16, description="LoRA rank")
    lora_alpha: int = Field(32, description="LoRA alpha")
    lora_dropout: float = Field(0.05, description="LoRA dropout")
    train_layers: int = Field(
        4, description="full method: train only the top N transformer blocks + tied embeddings/head (0 = every block; "
        "the default keeps the shared 2-core CPU run bounded)"
    )
    phase1_max_steps: int = Field(6, description="optimizer steps of phase 1 (linking); demo-scale default, raise on a GPU")
    phase2_max_steps: int = Field(12, description="optimizer steps of phase 2 (recommendation/reasoning); demo-scale default, raise on a GPU")
    phase1_weight_a: float = Field(0.8, description="phase 1 share of task A")
    phase1_weight_b: float = Field(0.1, description="phase 1 share of task B")
    phase1_weight_c: float = Field(0.1, description="phase 1 share of task C")
    phase2_weight_a: float = Field(0.2, description="phase 2 share of task A")
    phase2_weight_b: float = Field(0.6, description="phase 2 share of task B")
    phase2_weight_c: float = Field(0.2, description="phase 2 share of task C")
    phase1_lr: float = Field(1e-3, description="peak learning rate of phase 1")
    phase2_lr: float = Field(1e-3, description="peak learning rate of phase 2")
    warmup_frac: float = Field(0.05, description="warm-up share of each phase's steps")
    lr_scheduler: str = Field("cosine", description="transformers lr scheduler name")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    batch_size: int = Field(8, description="examples per device step")
    grad_accum: int = Field(1, description="gradient accumulation steps")
    max_seq_length: int = Field(192, description="longer examples are skipped (counted)")
    general_mix_file: str = Field("", description="local JSONL of general instructions ({prompt, completion} or {messages})")
    general_mix_ratio: float = Field(0.0, description="share of each phase drawn from general_mix_file")
    warm_start: str = Field("rqvae", description="'rqvae' (ridge from codebooks) | 'centroid' | 'mean' | 'none'")
    ridge_alpha: float = Field(1.0, description="ridge regularisation of the codebook -> embedding projection")
    rqvae_checkpoint: str = Field("", description="quantizer checkpoint; '' = <artifacts>/rqvae_model/model.pt")
    lookup_scope: str = Field("dataset", description="anime the model can name: 'dataset' (in llm_prep_dataset) | 'all'")
    use_chat_template: bool = Field(True, description="render prompts with the tokenizer's chat template")
    fast_loss: bool = Field(True, description="apply the LM head only at completion positions")
    num_threads: int = Field(2, description="torch CPU threads (shared CPU: keep it small)")
    seed: int = Field(42, description="training seed")
    save_steps: int = Field(0, description="checkpoint every N steps (0 = at the end of each phase)")
    resume: bool = Field(True, description="resume from the work folder's checkpoints")
    keep_checkpoints: bool = Field(False, description="keep phase checkpoints after success")
    eval_examples: int = Field(16, description="validation rows per task for the per-phase validation loss")
    english_ppl: bool = Field(True, description="English-retention perplexity before/after")
    save_dtype: str = Field("float32", description="'float32' | 'bfloat16'")
    bf16: bool = Field(False, description="bf16 autocast while training")
    log_model_to_mlflow: bool = Field(True, description="log the model folder as MLflow artifacts")

    def to_lib(self) -> FinetuneConfig:
        return FinetuneConfig(
            base_model=self.base_model, gguf_file=self.gguf_file, revision=self.revision, method=self.method,
            lora_above_params=self.lora_above_params, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout, train_layers=self.train_layers, phase1_max_steps=self.phase1_max_steps,
            phase2_max_steps=self.phase2_max_steps,
            phase1_weights={"A": self.phase1_weight_a, "B": self.phase1_weight_b, "C": self.phase1_weight_c},
            phase2_weights={"A": self.phase2_weight_a, "B": self.phase2_weight_b, "C": self.phase2_weight_c},
            phase1_lr=self.phase1_lr, phase2_lr=self.phase2_lr, warmup_frac=self.warmup_frac,
            lr_scheduler=self.lr_scheduler, weight_decay=self.weight_decay, batch_size=self.batch_size,
            grad_accum=self.grad_accum, max_seq_length=self.max_seq_length, general_mix_file=self.general_mix_file,
            general_mix_ratio=self.general_mix_ratio, warm_start=self.warm_start, ridge_alpha=self.ridge_alpha,
            use_chat_template=self.use_chat_template, fast_loss=self.fast_loss, num_threads=self.num_threads,
            seed=self.seed, save_steps=self.save_steps, resume=self.resume, keep_checkpoints=self.keep_checkpoints,
            eval_examples=self.eval_examples, english_ppl=self.english_ppl, save_dtype=self.save_dtype, bf16=self.bf16,
        )


def model_lookup(anime_prep: pl.DataFrame, semantic_ids: pl.DataFrame, dataset: pl.DataFrame | None, scope: str = "dataset") -> pl.DataFrame:
    """The anime the model can name: every anime with an ID, or those used by the dataset rows."""
    lookup = sid_lookup_frame(anime_prep, semantic_ids)
    if scope == "all" or dataset is None:
        return lookup
    if scope != "dataset":
        raise ValueError(f"lookup_scope must be 'dataset' or 'all', got {scope!r}")
    used = set(dataset["target_anime_id"].drop_nulls().to_list())
    used |= set(dataset["history_anime_ids"].explode().drop_nulls().to_list())
    sids = set(dataset["completion"].str.extract_all(r"(?:<L\d+_\d+>)+").explode().drop_nulls().to_list())
    sids |= set(dataset["prompt"].str.extract_all(r"(?:<L\d+_\d+>)+").explode().drop_nulls().to_list())
    return lookup.filter(pl.col("anime_id").is_in(list(used)) | pl.col("semantic_id").is_in(list(sids)))


def load_codebooks(store, path: str, log) -> list | None:
    try:
        if path:
            return codebooks_from_checkpoint(path)
        if store.exists("rqvae_model", "model.pt"):
            with store.local_copy("rqvae_model", "model.pt") as local:
                return codebooks_from_checkpoint(str(local))
        log("no rqvae_model/model.pt in the artifact store: warm start falls back to title centroids")
    except Exception as exc:  # noqa: BLE001 - warm start is an optimisation, never a blocker
        log(f"could not read RQ-VAE codebooks ({type(exc).__name__}: {exc}); falling back to title centroids")
    return None


def _device() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"


@dg.asset(
    group_name=GROUP,
    code_version="1",
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
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    store = artifacts.store()
    cfg = config.to_lib()
    lookup = model_lookup(anime_prep, semantic_ids, llm_prep_dataset, config.lookup_scope)
    context.log.info(f"model lookup: {lookup.height} anime ({config.lookup_scope})")
    codebooks = load_codebooks(store, config.rqvae_checkpoint, context.log.info) if cfg.warm_start == "rqvae" else None
    local_root = Path(store.root.path) if str(getattr(store.root, "protocol", "") or "") in ("", "file", "local") else data_dir()
    work = local_root / WORK_DIR
    with mlflow.start_run("finetuned_model", tags={"asset": "finetuned_model", "base_model": cfg.base_model}) as run:
        result = run_finetune(
            llm_prep_dataset, lookup, cfg, work, codebooks=codebooks, special_tokens=SPECIAL_TOKENS,
            log=context.log.info, run=run,
        )
        with store.atomic_dir(MODEL_DIR) as tmp:
            files = save_model_folder(result, lookup, tmp)
            if run is not None and config.log_model_to_mlflow:
                for f in sorted(Path(tmp).iterdir()):
                    run.log_artifact(str(f), artifact_path="model")
        if run is not None:
            run.log_metrics(result.metrics)
        run_id = run.run_id if run is not None else None
        run_link = run.link if run is not None else None
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
                "warm_start": (result.warm_start.mode if result.warm_start else "none"),
                "materialize_seconds": round(elapsed, 1),
            }
        ),
        "model_folder": dg.MetadataValue.path(str(store.path(MODEL_DIR))),
        "files": dg.MetadataValue.json(files),
        "phase_mix": dg.MetadataValue.json(info["phase_mix"]),
    }
    if result.warm_start:
        md["warm_start_ridge_r2"] = dg.MetadataValue.json(result.warm_start.ridge_r2)
    if run_id:
        md["mlflow_run_id"] = dg.MetadataValue.text(run_id)
        md["mlflow_run"] = dg.MetadataValue.url(run_link)
    losses = {}
    for phase in ("phase1", "phase2"):
        ys = [h["loss"] for h in result.history if h.get("phase") == phase and "loss" in h]
        if ys:
            losses[phase] = ys
    if losses:
        md["loss_plot"] = image_md(lines_png(losses, "training loss (completion tokens)", xlabel="log step", ylabel="loss"), "training loss")
        hist = pl.DataFrame([{k: h.get(k) for k in ("phase", "step", "loss", "mean_token_accuracy", "learning_rate")} for h in result.history if "loss" in h])
        md["history_tail"] = dg.MetadataValue.md(markdown_table(hist.tail(10)))
    context.log.info(
        f"finetuned_model: {cfg.phase1_max_steps}+{cfg.phase2_max_steps} steps in {elapsed:.0f}s on {_device()}, "
        f"English ppl {m.get('english_ppl_before', float('nan')):.2f} -> {m.get('english_ppl_after', float('nan')):.2f}"
    )
    return dg.MaterializeResult(metadata=md)
