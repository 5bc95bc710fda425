"""``tiger_model``: TIGER generative retriever trained on Amazon Beauty, one per semantic-ID source.

Statically partitioned by ``id_source``:

* ``own``: the project's IDs (``beauty_semantic_ids`` table: MiniLM text embeddings -> RQ-VAE ->
  disambiguation level);
* ``reference``: tiger-cf's published ``index_rqvae.json`` (config ``reference_index_path``; the
  RQ-KMeans file ``index_rqkmeans.json`` works too).

Same model, data and training budget for both partitions, so ``tiger_eval`` can tell ID quality from
model quality. The library (``animind_assets.lib.tiger``) trains a Hugging Face T5 (default: TIGER's
Beauty config, 4+4 layers, d_model 128, 6 heads x 64, ff 1024, dropout 0.1) on every training prefix
of the leave-one-out split, evaluates validation Recall@10 with trie-constrained beam search, early-stops
on it and checkpoints atomically. Files in the artifact store:

* ``tiger_model/<id_source>/checkpoints/last.pt`` (resume point) and ``best.pt``;
* ``tiger_model/<id_source>/model/`` (HF ``save_pretrained`` folder + ``codec.json`` +
  ``tiger_config.json`` + ``extra.json``), read by ``tiger_eval``.
"""

import json
import time
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.assets.beauty_items import GROUP
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.amazon import beauty_dir, sequences_from_interactions
from animind_assets.lib.fingerprint import frame_fingerprint, json_fingerprint
from animind_assets.lib.plots import lines_png
from animind_assets.lib.tiger import (
    SidCodec,
    TigerConfig,
    leave_one_out,
    load_reference_index,
    n_parameters,
    save_model,
    train_tiger,
)
from animind_assets.meta import image_md, markdown_table, scalar_metadata
from animind_assets.resources import ArtifactStoreResource, DuckDBWarehouse, MlflowResource

ASSET = "tiger_model"
ID_SOURCES = ("own", "reference")
id_source_partitions = dg.StaticPartitionsDefinition(list(ID_SOURCES))
# knobs that change what is learned: a checkpoint is resumed only when these (and the data) match
RESUME_KEYS = (
    "d_model", "d_kv", "num_heads", "d_ff", "num_layers", "num_decoder_layers", "dropout",
    "relative_attention_num_buckets", "feed_forward_proj", "max_history", "user_buckets", "max_train_examples",
    "batch_size", "lr", "weight_decay", "warmup_steps", "lr_schedule", "grad_clip", "seed", "length_buckets",
)


class TigerModelConfig(dg.Config):
    reference_index_path: str = Field("", description="partition 'reference': tiger-cf ID file; '' = ../shared/data/beauty/index_rqvae.json")
    d_model: int = Field(128, description="model width")
    d_kv: int = Field(64, description="attention head size")
    num_heads: int = Field(6, description="attention heads")
    d_ff: int = Field(1024, description="feed-forward width")
    num_layers: int = Field(4, description="encoder layers")
    num_decoder_layers: int = Field(4, description="decoder layers")
    dropout: float = Field(0.1, description="dropout rate")
    max_history: int = Field(20, description="history items fed to the encoder (most recent)")
    user_buckets: int = Field(0, description="hashed user-id tokens prepended to the history (TIGER: 2000; 0 = none)")
    max_train_examples: int = Field(0, description="0 = every training prefix; >0 = fixed random subset (bounded runs)")
    batch_size: int = Field(256, description="training batch size")
    lr: float = Field(2e-3, description="peak AdamW learning rate")
    weight_decay: float = Field(0.01, description="AdamW weight decay")
    warmup_steps: int = Field(300, description="linear warm-up steps")
    lr_schedule: str = Field("inverse_sqrt", description="'inverse_sqrt' (TIGER) | 'cosine' | 'constant'")
    grad_clip: float = Field(1.0, description="gradient-norm clip (0 = off)")
    epochs: int = Field(50, description="maximum epochs")
    max_steps: int = Field(0, description="step cap (0 = none)")
    max_train_seconds: float = Field(0.0, description="wall-clock training budget in seconds (0 = none)")
    eval_every_steps: int = Field(0, description="validation every N steps (0 = every epoch)")
    val_users: int = Field(2000, description="validation users per evaluation (0 = all)")
    val_beams: int = Field(20, description="beams of the validation beam search (>= 10)")
    exclude_history: bool = Field(True, description="validation never recommends items already in the history")
    patience: int = Field(4, description="early stopping: evaluations without val Recall@10 gain (0 = off)")
    min_delta: float = Field(0.0, description="minimum val Recall@10 gain that counts")
    seed: int = Field(42, description="random seed (init, batches, subsets)")
    num_threads: int = Field(2, description="torch CPU threads (0 = leave as is)")
    device: str = Field("auto", description="auto (cuda when available) | cpu | cuda")
    bf16: bool = Field(False, description="bf16 autocast for training")
    resume: bool = Field(True, description="continue from last.pt when its data/config fingerprint matches")

    def tiger_config(self) -> TigerConfig:
        known = set(TigerConfig().to_dict())
        return TigerConfig.from_dict({k: v for k, v in self.model_dump().items() if k in known})


def load_codec(id_source: str, config: TigerModelConfig, warehouse: DuckDBWarehouse) -> tuple[SidCodec, dict]:
    """The semantic IDs of one partition as a ``SidCodec`` (+ a description for metadata)."""
    if id_source == "own":
        table = warehouse.read_table("beauty_semantic_ids")
        if table is None:
            raise ValueError("partition 'own' needs the beauty_semantic_ids table: materialize beauty_semantic_ids first")
        for col in ("item_id", "codes"):
            if col not in table.columns:
                raise ValueError(f"beauty_semantic_ids: missing column {col!r} (columns: {table.columns})")
        mapping = dict(zip(table["item_id"].to_list(), table["codes"].to_list()))
        return SidCodec.from_mapping(mapping, user_buckets=config.user_buckets), {"id_file": "duckdb table beauty_semantic_ids"}
    if id_source == "reference":
        path = Path(config.reference_index_path) if config.reference_index_path else beauty_dir() / "index_rqvae.json"
        mapping = load_reference_index(path)
        return SidCodec.from_mapping(mapping, user_buckets=config.user_buckets), {"id_file": str(path)}
    raise ValueError(f"unknown id_source partition {id_source!r}; expected one of {ID_SOURCES}")


@dg.asset(
    group_name=GROUP,
    code_version="1",
    partitions_def=id_source_partitions,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    deps=["beauty_semantic_ids"],
    kinds={"pytorch", "mlflow"},
    description="TIGER (T5 encoder-decoder) generating the next item's semantic ID; partition = ID source (own | reference).",
)
def tiger_model(
    context: dg.AssetExecutionContext,
    config: TigerModelConfig,
    artifacts: ArtifactStoreResource,
    mlflow: MlflowResource,
    warehouse: DuckDBWarehouse,
    beauty_interactions: pl.DataFrame,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    id_source = context.partition_key
    cfg = config.tiger_config()
    codec, id_info = load_codec(id_source, config, warehouse)
    sequences = sequences_from_interactions(beauty_interactions)
    split = leave_one_out(sequences, max_history=cfg.max_history)
    data_fp = frame_fingerprint(beauty_interactions.select(["user_id", "item_id", "seq"]), sort_by=["user_id", "seq"])
    codec_fp = json_fingerprint(codec.to_dict())
    fingerprint = json_fingerprint({"data": data_fp, "codec": codec_fp, "config": {k: cfg.to_dict()[k] for k in RESUME_KEYS}})
    context.log.info(
        f"{ASSET}[{id_source}]: {codec.levels}-level IDs for {len(codec)} items from {id_info['id_file']}; split {split.stats()}"
    )
    store = artifacts.store()
    ckpt_dir = str(store.path(ASSET, id_source, "checkpoints"))
    model_dir = str(store.path(ASSET, id_source, "model"))

    with mlflow.start_run(run_name=f"{ASSET}[{id_source}]", tags={"asset": ASSET, "id_source": id_source}) as run:
        if run is not None:
            run.log_params({**cfg.to_dict(), "id_source": id_source, "id_file": id_info["id_file"], "vocab_size": codec.vocab_size,
                            "levels": codec.levels, "data_fingerprint": data_fp, "codec_fingerprint": codec_fp})

        def on_eval(rec: dict) -> None:
            if run is not None:
                run.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=int(rec["step"]))

        result = train_tiger(split, codec, cfg, checkpoint_dir=ckpt_dir, resume=config.resume, log=context.log.info, on_eval=on_eval, fingerprint=fingerprint)
        if run is not None:
            run.log_metrics({f"best_{k}": v for k, v in result.best.items() if k.startswith("val_")})
        run_id = run.run_id if run is not None else None
        run_link = run.link if run is not None else None

    extra = {
        "id_source": id_source,
        "id_file": id_info["id_file"],
        "data_fingerprint": data_fp,
        "codec_fingerprint": codec_fp,
        "history": result.history,
        "best": result.best,
        "stop_reason": result.stop_reason,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "n_parameters": n_parameters(result.model),
        "split": split.stats(),
        "mlflow_run_id": run_id,
    }
    save_model(result.model, codec, cfg, model_dir, extra=extra)
    hist = result.history
    md = {
        **scalar_metadata(
            {
                "id_source": id_source,
                "id_file": id_info["id_file"],
                "id_levels": codec.levels,
                "vocab_size": codec.vocab_size,
                "parameters": n_parameters(result.model),
                "train_examples": result.extra.get("train_examples", len(split.train)),
                "steps": result.steps,
                "epochs_completed": round(result.epochs_completed, 3),
                "stop_reason": result.stop_reason,
                "train_seconds": round(result.train_seconds, 1),
                "materialize_seconds": round(time.perf_counter() - t0, 1),
                "best_val_recall@10": result.best.get("val_recall@10"),
                "best_val_ndcg@10": result.best.get("val_ndcg@10"),
                "best_step": int(result.best.get("step", 0)),
                "val_users": result.extra.get("val_users", cfg.val_users),
                "resumed_from": result.resumed_from,
                "model_dir": model_dir,
                "checkpoint_dir": ckpt_dir,
                "mlflow_run": run_link,
            }
        ),
        "config": dg.MetadataValue.json(cfg.to_dict()),
    }
    if hist:
        table = pl.DataFrame(hist).select(["step", "epoch", "train_loss", "val_recall@10", "val_ndcg@10", "lr", "elapsed_s"])
        md["history"] = dg.MetadataValue.md(markdown_table(table, max_rows=40))
    if len(hist) > 1:
        md["validation_curve"] = image_md(
            lines_png({"val Recall@10": [h["val_recall@10"] for h in hist], "val NDCG@10": [h["val_ndcg@10"] for h in hist]},
                      f"validation ({id_source} IDs)", xlabel="evaluation", ylabel="metric"),
            "Validation",
        )
        md["loss_curve"] = image_md(lines_png({"train loss": [h["train_loss"] for h in hist]}, "train loss", xlabel="evaluation"), "Loss")
    context.log.info(f"{ASSET}[{id_source}]: saved {model_dir}; {result.stop_reason}; best val R@10 {result.best.get('val_recall@10', 0):.4f}")
    return dg.MaterializeResult(metadata=md)
