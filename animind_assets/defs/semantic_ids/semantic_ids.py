"""``semantic_ids``: one unique hierarchical semantic ID per anime.

Encodes every ``anime_embeddings`` vector with the ``rqvae_model`` checkpoint
(``<artifacts>/rqvae_model/model.pt``), appends the TIGER disambiguation level and stores the table
(anime_id, codes, semantic_id like ``<L1_47><L2_203><L3_9><L4_0>``, code_l1..code_lN,
collision_group_size, title) in DuckDB plus a Parquet export, and the original AniMind tokenizer's
file artifacts under ``<artifacts>/semantic_ids/`` (one atomic folder):
``semantic_ids.jsonl``, ``semantic_vocab.json`` (special tokens first), ``special_tokens.json``,
``semantic_lookup.tsv``, ``semantic_id_to_anime.jsonl``.

Checks (computed in the step): blocking ``every_anime_has_id``, ``ids_unique``,
``level_usage_floor``; non-blocking ``collision_rate_before_disambiguation`` (warning).
"""


import json
from collections.abc import Iterator

import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.defs.semantic_ids.quantizer_fit import CHECKPOINT_NAME, GROUP, RQVAE_DIR
from animind_assets.lib.common.plots import bar_png
from animind_assets.lib.semantic_ids.quantizers import encode_codes, load_quantizer
from animind_assets.lib.semantic_ids.quantizers.metrics import code_stats
from animind_assets.lib.semantic_ids.assign import (
    DEFAULT_SPECIAL_TOKENS,
    assign_semantic_ids,
    build_vocab,
    frame_vectors,
    level_sizes,
    level_usage,
    semantic_id_frame,
)
from animind_assets.lib.semantic_ids.exports import export_rows, write_export_files
from animind_assets.meta import counts_md, image_md, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource, ParquetExports
from animind_assets.launchpad import settings_defaults

EXPORT_DIR = "semantic_ids"
CHECKS = ("every_anime_has_id", "ids_unique", "level_usage_floor", "collision_rate_before_disambiguation")


@settings_defaults("semantic_ids")
class SemanticIdsConfig(dg.Config):
    checkpoint: str = Field("", description="checkpoint path/URL; '' = <artifacts>/rqvae_model/model.pt")
    special_tokens: list[str] = Field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS), description="special tokens, first in the vocabulary")
    min_dedup_vocab: int = Field(0, description="minimum size of the disambiguation level's vocabulary")
    min_level_usage: float = Field(0.5, description="blocking check: min fraction of each level's codes in use")
    max_collision_rate: float = Field(0.05, description="warn when more items than this share quantizer codes")
    export_folder: str = Field(EXPORT_DIR, description="artifact-store folder of the file exports")


def _title_columns(anime_prep: pl.DataFrame) -> pl.DataFrame:
    cols = [c for c in ("anime_id", "name", "english_name", "title", "genres") if c in anime_prep.columns]
    return anime_prep.select(cols)


def write_exports(store, folder: str, rows: list[dict], vocab: dict, meta: dict) -> str:
    """Stage the export files (``lib.semantic_ids.exports``) and publish ``folder`` atomically."""
    with store.atomic_dir(folder) as tmp:
        write_export_files(tmp, rows, vocab, meta)
    return str(store.path(folder))


@dg.asset(
    group_name=GROUP,
    deps=["rqvae_model"],
    kinds={"duckdb", "polars"},
    check_specs=[
        dg.AssetCheckSpec("every_anime_has_id", asset="semantic_ids", blocking=True,
                          description="every anime in anime_prep has a semantic ID"),
        dg.AssetCheckSpec("ids_unique", asset="semantic_ids", blocking=True,
                          description="no two anime share a semantic ID"),
        dg.AssetCheckSpec("level_usage_floor", asset="semantic_ids", blocking=True,
                          description="each quantizer level uses at least min_level_usage of its codes"),
        dg.AssetCheckSpec("collision_rate_before_disambiguation", asset="semantic_ids", blocking=False,
                          description="share of anime whose quantizer codes collide (warning only)"),
    ],
    description="Unique hierarchical semantic ID per anime (quantizer codes + disambiguation level).",
)
def semantic_ids(
    context: dg.AssetExecutionContext,
    config: SemanticIdsConfig,
    artifacts: ArtifactStoreResource,
    exports: ParquetExports,
    anime_prep: pl.DataFrame,
    anime_embeddings: pl.DataFrame,
) -> Iterator:
    store = artifacts.store()
    ckpt = config.checkpoint or str(store.path(RQVAE_DIR, CHECKPOINT_NAME))
    try:
        model, payload = load_quantizer(ckpt)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}. Materialize rqvae_model first (or set config.checkpoint).") from exc
    ids, x = frame_vectors(anime_embeddings, "anime_id", "embedding", table="anime_embeddings")
    if x.shape[1] != int(payload["input_dim"]):
        raise ValueError(
            f"anime_embeddings.embedding has dim {x.shape[1]} but checkpoint {ckpt} expects {payload['input_dim']}; "
            "re-materialize rqvae_model on the current embeddings"
        )
    qcfg = payload["config"]
    codes = encode_codes(model, x)
    context.log.info(f"encoded {len(ids)} anime with {payload['kind']} checkpoint {ckpt} ({codes.shape[1]} levels)")
    before = code_stats(codes, int(qcfg["codebook_size"]))
    full = assign_semantic_ids(codes, order_key=ids)
    df = semantic_id_frame(ids, full, id_column="anime_id")
    df = df.join(_title_columns(anime_prep), on="anime_id", how="left")
    sizes = level_sizes(full, int(qcfg["codebook_size"]), config.min_dedup_vocab)
    vocab = build_vocab(sizes, config.special_tokens)
    usage = level_usage(full, sizes)

    prep_ids = set(anime_prep["anime_id"].to_list()) if "anime_id" in anime_prep.columns else set()
    missing = sorted(prep_ids - set(ids.tolist()))
    n_unique = df["semantic_id"].n_unique()
    group_sizes = df["collision_group_size"].value_counts().sort("collision_group_size")
    md = {
        **table_metadata(df, preview_cols=[c for c in ("anime_id", "title", "semantic_id", "collision_group_size") if c in df.columns]),
        **scalar_metadata(
            {
                "anime": int(df.height),
                "levels_with_disambiguation": int(full.shape[1]),
                "unique_fraction_before_disambiguation": before["unique_fraction"],
                "items_in_collisions_before_disambiguation": before["items_in_collisions"],
                "largest_collision_group": before["largest_collision_group"],
                "unique_fraction_after_disambiguation": n_unique / max(1, df.height),
                "vocab_size": vocab["vocab_size"],
                "disambiguation_vocab": sizes[-1],
                "missing_from_prep": len(missing),
                "checkpoint": ckpt,
            }
        ),
        **{f"usage_l{i + 1}": dg.MetadataValue.float(u) for i, u in enumerate(usage)},
        **{f"perplexity_l{i + 1}": dg.MetadataValue.float(float(before[f"perplexity_l{i + 1}"])) for i in range(codes.shape[1])},
        "collision_groups": counts_md(
            {str(r["collision_group_size"]): r["count"] for r in group_sizes.iter_rows(named=True)},
            key="anime sharing quantizer codes",
            value="anime",
        ),
        "usage_plot": image_md(bar_png({f"L{i + 1}": u for i, u in enumerate(usage)}, "fraction of codes used per level", "fraction"), "usage"),
    }
    checks: list[dg.AssetCheckResult] = []
    checks.append(dg.AssetCheckResult(
        check_name="every_anime_has_id",
        passed=not missing,
        metadata={"missing": dg.MetadataValue.int(len(missing)), "missing_examples": dg.MetadataValue.text(str(missing[:20]))},
        description=None if not missing else f"{len(missing)} anime in anime_prep have no embedding/ID, e.g. {missing[:5]}",
    ))
    dup = df.filter(pl.col("semantic_id").is_duplicated())["semantic_id"].unique().head(5).to_list()
    checks.append(dg.AssetCheckResult(
        check_name="ids_unique",
        passed=n_unique == df.height,
        metadata={"unique_ids": dg.MetadataValue.int(n_unique), "rows": dg.MetadataValue.int(df.height),
                  "duplicate_examples": dg.MetadataValue.text(str(dup))},
    ))
    quant_usage = usage[:-1] if len(usage) > 1 else usage
    low = {f"L{i + 1}": round(u, 4) for i, u in enumerate(quant_usage) if u < config.min_level_usage}
    checks.append(dg.AssetCheckResult(
        check_name="level_usage_floor",
        passed=not low,
        metadata={"floor": dg.MetadataValue.float(config.min_level_usage),
                  "min_usage": dg.MetadataValue.float(float(min(quant_usage))),
                  "below_floor": dg.MetadataValue.text(json.dumps(low))},
    ))
    rate = float(before["items_in_collisions"])
    checks.append(dg.AssetCheckResult(
        check_name="collision_rate_before_disambiguation",
        passed=rate <= config.max_collision_rate,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"collision_rate": dg.MetadataValue.float(rate),
                  "threshold": dg.MetadataValue.float(config.max_collision_rate),
                  "largest_collision_group": dg.MetadataValue.int(int(before["largest_collision_group"]))},
    ))

    # Blocking checks run BEFORE anything is written (rule 5 of issue 12): a failure leaves the previous
    # table, Parquet export and file exports in place.
    for check in checks:
        yield check
    blocking = {"every_anime_has_id", "ids_unique", "level_usage_floor"}
    failed = [c.check_name for c in checks if c.check_name in blocking and not c.passed]
    if failed:
        raise dg.Failure(
            description=f"semantic_ids: blocking check(s) {failed} failed; nothing was written (the previous "
            f"table and exports are kept). Checkpoint {ckpt}.",
            metadata={name: md[name] for name in ("anime", "missing_from_prep") if name in md},
        )

    store.sweep(log=context.log.info)
    rows = export_rows(df)
    folder = write_exports(
        store,
        config.export_folder,
        rows,
        vocab,
        {
            "rq_levels": int(qcfg["levels"]),
            "codebook_size": int(qcfg["codebook_size"]),
            "disambiguation_level": int(full.shape[1]),
            "checkpoint": ckpt,
            "quantizer": payload["kind"],
            "input_fingerprint": payload.get("input_fingerprint", ""),
        },
    )
    parquet = exports.write(df, "semantic_ids")

    md["export_folder"] = dg.MetadataValue.path(folder)
    md["parquet_export"] = dg.MetadataValue.path(parquet)
    yield dg.Output(df, metadata=md)
