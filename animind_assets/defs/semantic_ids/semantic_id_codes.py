"""``semantic_id_codes``: the quantizer codes of one item-hash shard (only with ``$ANIMIND_EMBEDDING_SHARDS=N``).

Sharded catalogs split the per-item semantic-ID step too: each shard of ``anime_embeddings`` is encoded by the
``rqvae_model`` checkpoint in its own run (one pod under the K8s executor; a failed shard reruns alone), giving
one row per anime with its quantizer codes, the hash of its vector and the quantizer's fingerprint
(``lib.semantic_ids.encode_table``). ``semantic_ids`` then reads the union of the shards and does what needs
every item at once: the TIGER disambiguation level, the stable ID registry, the vocabulary and the exports. It
never loads a vector, so the global step stays small for large catalogs.

Each shard re-encodes all of its rows on every run (a matrix product per item: seconds per million items), so
it is incremental in the sense that matters: the stable ID registry in ``semantic_ids`` keeps every unchanged
item's full ID. Unsharded (the default) this asset does not exist and ``semantic_ids`` encodes itself.
"""

import time

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from animind_assets.defs.embeddings.sharding import (
    current_shard,
    embedding_shards,
    sharded_asset_kwargs,
    with_shard_column,
)
from animind_assets.defs.semantic_ids.quantizer_fit import GROUP, encode_embeddings, load_checkpoint
from animind_assets.lib.semantic_ids.encode_table import code_frame
from animind_assets.lib.semantic_ids.quantizers.metrics import code_stats
from animind_assets.lib.semantic_ids.stable import model_fingerprint, vector_hashes
from animind_assets.meta import rate_metadata, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource

ASSET = "semantic_id_codes"


class SemanticIdCodesConfig(dg.Config):
    checkpoint: str = Field("", description="checkpoint path/URL; '' = <artifacts>/rqvae_model/model.pt (as semantic_ids)")


if embedding_shards() > 0:

    @dg.asset(
        name=ASSET,
        group_name=GROUP,
        deps=["rqvae_model"],
        kinds={"pytorch", "polars", "duckdb"},
        description="Quantizer codes (no disambiguation level) of one item-hash shard of anime_embeddings, with the "
        "vector hash and quantizer fingerprint; semantic_ids reads the union of the shards.",
        **sharded_asset_kwargs(),
    )
    def semantic_id_codes(
        context: dg.AssetExecutionContext,
        config: SemanticIdCodesConfig,
        artifacts: ArtifactStoreResource,
        anime_embeddings: pl.DataFrame,
    ) -> dg.Output[pl.DataFrame]:
        t0 = time.perf_counter()
        shard = current_shard(context)
        store = artifacts.store()
        ckpt, model, payload = load_checkpoint(config.checkpoint, store)
        table = "anime_embeddings" if shard is None else f"anime_embeddings[shard {shard}]"
        ids, x, codes, encode_s = encode_embeddings(model, payload, ckpt, anime_embeddings, table)
        fp = model_fingerprint(payload["model_state"])
        df = with_shard_column(code_frame(ids, codes, vector_hashes(x), fp), shard)
        k = int(payload["config"]["codebook_size"])
        stats = code_stats(codes, k)
        context.log.info(f"{ASSET}[{shard}]: encoded {len(ids)} anime ({codes.shape[1]} levels) in {encode_s:.2f}s")
        md = {
            **table_metadata(df, preview_cols=["anime_id", "codes", "vector_hash"]),
            **scalar_metadata(
                {
                    "shard": shard or "",
                    "quantizer_fingerprint": fp,
                    "checkpoint": ckpt,
                    "levels": int(codes.shape[1]),
                    "codebook_size": k,
                    "unique_fraction_in_shard": round(float(stats["unique_fraction"]), 4),
                    "wall_seconds": round(time.perf_counter() - t0, 2),
                }
            ),
            **{
                f"codes_used_l{lv + 1}": dg.MetadataValue.int(int(np.unique(codes[:, lv]).size))
                for lv in range(codes.shape[1])
            },
            **rate_metadata("encoded", len(ids), encode_s, unit="anime"),
        }
        return dg.Output(df, metadata=md)
