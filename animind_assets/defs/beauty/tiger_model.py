"""``tiger_model``: TIGER generative retriever trained on Amazon Beauty, one per semantic-ID source.

Statically partitioned by ``id_source``:

* ``own``: the project's IDs (``beauty_semantic_ids`` table: MiniLM text embeddings -> RQ-VAE ->
  disambiguation level);
* ``reference``: tiger-cf's published ``index_rqvae.json`` (config ``reference_index_path``; the
  RQ-KMeans file ``index_rqkmeans.json`` works too);
* ``collaborative``: RQ-KMeans (``collaborative_levels`` x ``collaborative_codebook_size`` + one
  disambiguation code, ``lib.retrieval.tiger_data.rqkmeans_ids``) of the ``sasrec_model`` item embeddings:
  IDs that carry next-item signal, which the ~5-word Beauty titles do not (docs/beauty.md, fifth round).

Same model, data and training budget for every partition, so ``tiger_eval`` can tell ID quality from
model quality. The library (``animind_assets.lib.retrieval.tiger``) trains a Hugging Face T5 (default: TIGER's
Beauty config, 4+4 layers, d_model 128, 6 heads x 64, ff 1024, dropout 0.1) on every training prefix
of the leave-one-out split, evaluates validation Recall@10 with trie-constrained beam search, early-stops
on it and checkpoints atomically. Files in the artifact store:

* ``tiger_model/<id_source>/checkpoints/last.pt`` (resume point) and ``best.pt``;
* ``tiger_model/<id_source>/model/`` (HF ``save_pretrained`` folder + ``codec.json`` +
  ``tiger_config.json`` + ``extra.json``), read by ``tiger_eval``.
"""

import time
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.defs.beauty.shared import GROUP
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.data.amazon import beauty_dir, sequences_from_interactions
from animind_assets.lib.common.fingerprint import frame_fingerprint, json_fingerprint
from animind_assets.lib.retrieval.tiger import (
    SidCodec,
    TigerConfig,
    leave_one_out,
    load_reference_index,
    n_parameters,
    save_model,
    train_tiger,
)
from animind_assets.lib.retrieval.sasrec import sasrec_item_vectors
from animind_assets.lib.retrieval.tiger_data import rqkmeans_ids
from animind_assets.meta import lines_plot, markdown_table, scalar_metadata
from animind_assets.resources import ArtifactStoreResource, DuckDBWarehouse, MlflowResource

from animind_assets.defs.beauty.shared import ID_SOURCES, TIGER_MODEL_ASSET as ASSET, load_sasrec_asset
from animind_assets.launchpad import derive_config
id_source_partitions = dg.StaticPartitionsDefinition(list(ID_SOURCES))
# knobs that change what is learned: a checkpoint is resumed only when these (and the data) match
RESUME_KEYS = (
    "d_model", "d_kv", "num_heads", "d_ff", "num_layers", "num_decoder_layers", "dropout",
    "relative_attention_num_buckets", "feed_forward_proj", "max_history", "user_buckets", "max_train_examples",
    "batch_size", "lr", "weight_decay", "warmup_steps", "lr_schedule", "grad_clip", "seed", "length_buckets", "select_metric",
)


TigerModelConfig = derive_config(
    TigerConfig,
    name="TigerModelConfig",
    asset="tiger_model",
    extra={
        "reference_index_path": (str, Field("", description="partition 'reference': tiger-cf ID file; '' = ../shared/data/beauty/index_rqvae.json")),
        "collaborative_levels": (int, Field(3, description="partition 'collaborative': RQ-KMeans levels before the disambiguation code")),
        "collaborative_codebook_size": (int, Field(256, description="partition 'collaborative': codes per RQ-KMeans level")),
        "resume": (bool, Field(True, description="continue from last.pt when its data/config fingerprint matches")),
    },
    descriptions={
        "d_model": 'model width',
        "d_kv": 'attention head size',
        "num_heads": 'attention heads',
        "d_ff": 'feed-forward width',
        "num_layers": 'encoder layers',
        "num_decoder_layers": 'decoder layers',
        "dropout": 'dropout rate',
        "max_history": 'history items fed to the encoder (most recent)',
        "user_buckets": 'hashed user-id tokens prepended to the history (TIGER: 2000; 0 = none)',
        "max_train_examples": '0 = every training prefix; >0 = fixed random subset (bounded runs)',
        "batch_size": 'training batch size',
        "lr": 'peak AdamW learning rate',
        "weight_decay": 'AdamW weight decay',
        "warmup_steps": 'linear warm-up steps',
        "lr_schedule": "'inverse_sqrt' (TIGER) | 'cosine' | 'constant'",
        "grad_clip": 'gradient-norm clip (0 = off)',
        "epochs": 'maximum epochs',
        "max_steps": 'step cap (0 = none)',
        "max_train_seconds": 'wall-clock training budget in seconds (0 = none)',
        "eval_every_steps": 'validation every N steps (0 = every epoch)',
        "val_users": 'validation users per evaluation (0 = all)',
        "val_beams": 'beams of the validation beam search (>= 10)',
        "exclude_history": 'validation never recommends items already in the history',
        "patience": 'early stopping: evaluations without gain of select_metric (0 = off)',
        "select_metric": 'validation metric for checkpoint selection and early stopping: ndcg@10 | recall@10',
        "min_delta": 'minimum val Recall@10 gain that counts',
        "seed": 'random seed (init, batches, subsets)',
        "num_threads": 'torch CPU threads (0 = leave as is)',
        "device": 'auto (cuda when available) | cpu | cuda',
        "bf16": 'bf16 autocast for training',
    },
)


def load_codec(id_source: str, config: TigerModelConfig, warehouse: DuckDBWarehouse,
               artifacts: ArtifactStoreResource | None = None, data_fp: str | None = None, log=None) -> tuple[SidCodec, dict]:
    """The semantic IDs of one partition as a ``SidCodec`` (+ a description for metadata). ``data_fp``: the
    interactions' fingerprint, which the ``sasrec_model`` behind the collaborative IDs must match.

    Raises ``ValueError`` / ``FileNotFoundError`` naming the missing upstream asset or column."""
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
    if id_source == "collaborative":
        if artifacts is None:
            raise ValueError("partition 'collaborative' needs the artifact store (sasrec_model)")
        model, _ = load_sasrec_asset(artifacts, f"{ASSET}[collaborative]", data_fp=data_fp)
        codes, stats = rqkmeans_ids(sasrec_item_vectors(model), levels=config.collaborative_levels,
                                    codebook_size=config.collaborative_codebook_size, seed=config.seed, log=log)
        mapping = {i: row for i, row in enumerate(codes.tolist())}
        return (SidCodec.from_mapping(mapping, user_buckets=config.user_buckets),
                {"id_file": "RQ-KMeans of the sasrec_model item embeddings", "id_stats": stats})
    raise ValueError(f"unknown id_source partition {id_source!r}; expected one of {ID_SOURCES}")


@dg.asset(
    group_name=GROUP,
    partitions_def=id_source_partitions,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    deps=["beauty_semantic_ids", "sasrec_model"],
    kinds={"pytorch", "mlflow"},
    description="TIGER (T5 encoder-decoder) generating the next item's semantic ID; partition = ID source (own | reference | collaborative).",
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
    cfg = config.to_lib()
    data_fp = frame_fingerprint(beauty_interactions.select(["user_id", "item_id", "seq"]), sort_by=["user_id", "seq"])
    codec, id_info = load_codec(id_source, config, warehouse, artifacts, data_fp=data_fp, log=context.log.info)
    sequences = sequences_from_interactions(beauty_interactions)
    split = leave_one_out(sequences, max_history=cfg.max_history)
    codec_fp = json_fingerprint(codec.to_dict())
    fingerprint = json_fingerprint({"data": data_fp, "codec": codec_fp, "config": {k: cfg.to_dict()[k] for k in RESUME_KEYS}})
    context.log.info(
        f"{ASSET}[{id_source}]: {codec.levels}-level IDs for {len(codec)} items from {id_info['id_file']}; split {split.stats()}"
    )
    store = artifacts.store()
    ckpt_dir = str(store.path(ASSET, id_source, "checkpoints"))
    model_dir = str(store.path(ASSET, id_source, "model"))
    for parts in ((ASSET, id_source, "checkpoints"), (ASSET, id_source)):
        store.sweep(*parts, log=context.log.info)  # temp files of killed runs

    with mlflow.start_run(context, tags={"id_source": id_source}) as run:
        run.log_params({**cfg.to_dict(), "id_source": id_source, "id_file": id_info["id_file"], "vocab_size": codec.vocab_size,
                        "levels": codec.levels, "data_fingerprint": data_fp, "codec_fingerprint": codec_fp})

        def on_eval(rec: dict) -> None:
            run.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=int(rec["step"]))

        result = train_tiger(split, codec, cfg, checkpoint_dir=ckpt_dir, resume=config.resume, log=context.log.info, on_eval=on_eval, fingerprint=fingerprint)
        run.log_metrics({f"best_{k}": v for k, v in result.best.items() if k.startswith("val_")})
        run_id = run.run_id
        run_link = run.link

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
        "id_stats": id_info.get("id_stats"),
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
    if id_info.get("id_stats"):
        md["id_stats"] = dg.MetadataValue.json(id_info["id_stats"])
    if hist:
        table = pl.DataFrame(hist).select(["step", "epoch", "train_loss", "val_recall@10", "val_ndcg@10", "lr", "elapsed_s"])
        md["history"] = dg.MetadataValue.md(markdown_table(table, max_rows=40))
    if len(hist) > 1:
        md.update(lines_plot("validation_curve", {"val Recall@10": [h["val_recall@10"] for h in hist], "val NDCG@10": [h["val_ndcg@10"] for h in hist]},
                             f"validation ({id_source} IDs)", xlabel="evaluation", ylabel="metric"))
        md.update(lines_plot("loss_curve", {"train loss": [h["train_loss"] for h in hist]}, "train loss", xlabel="evaluation"))
    context.log.info(f"{ASSET}[{id_source}]: saved {model_dir}; {result.stop_reason}; best val R@10 {result.best.get('val_recall@10', 0):.4f}")
    return dg.MaterializeResult(metadata=md)
