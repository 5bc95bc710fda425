"""``semantic_ids``: one unique hierarchical semantic ID per anime.

Encodes every ``anime_embeddings`` vector with the ``rqvae_model`` checkpoint
(``<artifacts>/rqvae_model/model.pt``), appends the TIGER disambiguation level and stores the table
(anime_id, codes, semantic_id like ``<L1_47><L2_203><L3_9><L4_0>``, code_l1..code_lN,
collision_group_size, title) in DuckDB plus a Parquet export, and the original AniMind tokenizer's
file artifacts under ``<artifacts>/semantic_ids/`` (one atomic folder):
``semantic_ids.jsonl``, ``semantic_vocab.json`` (special tokens first), ``special_tokens.json``,
``semantic_lookup.tsv``, ``semantic_id_to_anime.jsonl``.

Stable IDs (``lib.semantic_ids.stable``): the folder also holds ``id_registry.parquet`` (every ID
handed out under the current quantizer, removed items' IDs kept as ``retired``). While
``rqvae_model`` keeps its quantizer, existing anime keep their full IDs (the disambiguation level
included), changed anime whose codes moved and new anime get the next free disambiguation index,
and removed anime free nothing (``release_removed`` frees them). After a refit every ID is assigned
afresh. Metadata counts kept / changed / added / removed IDs; the output's data version is the hash
of the anime -> ID mapping and vocabulary (``id_space_version``), so ``llm_prep_dataset`` and
``finetuned_model`` become stale only when an ID changed, and ``id_change_reason`` says why.

Checks (computed in the step; thresholds measured on the full MAL 2020 catalog, see
``docs/semantic_ids.md``): blocking ``every_anime_has_id``, ``ids_unique``, ``level_usage_floor``
(usage judged against min(items, codebook_size)); non-blocking
``collision_rate_before_disambiguation`` (warning). A failing check names the cause and the fix.
"""


import json
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from animind_assets.defs.semantic_ids.quantizer_fit import GROUP, encode_embeddings, load_checkpoint
from animind_assets.lib.semantic_ids.quantizers.metrics import code_stats
from animind_assets.lib.semantic_ids.exports import export_rows, write_export_files
from animind_assets.lib.semantic_ids.stable import model_fingerprint, vector_hashes
from animind_assets.lib.semantic_ids.encode_table import codes_from_frame
from animind_assets.defs.embeddings.sharding import embedding_shards
from animind_assets.lib.semantic_ids.id_registry import REGISTRY_FILE, REGISTRY_META, id_space_version, load_registry, save_registry, stable_assign
from animind_assets.lib.semantic_ids.assign import (
    DEFAULT_SPECIAL_TOKENS,
    build_vocab,
    level_sizes,
    semantic_id_frame,
)
from animind_assets.meta import CONTENT_VERSION_TAGS, counts_md, plot_metadata, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource, ParquetExports
from animind_assets.launchpad import settings_defaults

EXPORT_DIR = "semantic_ids"
CHECKS = ("every_anime_has_id", "ids_unique", "level_usage_floor", "collision_rate_before_disambiguation")

#: check thresholds from measured distributions on the MAL 2020 catalog (docs/semantic_ids.md):
#: healthy default-preset builds use 100 % of every level's usable codes (any catalog size measured), so
#: half of them is a clear collapse; items in collisions grow about linearly with the catalog (1.7 % at
#: 4,096 anime, 3.6-3.7 % at 8,192, 6.3 % at the full 16,214, 6.6 % at 17,562), so 10 % leaves ~1.5x
#: headroom over a healthy full build and still flags a collapsed level
MIN_LEVEL_USAGE = 0.5
MAX_COLLISION_RATE = 0.10
HEALTHY_MIN_USAGE = 1.0
HEALTHY_COLLISION_RANGE = "0.063-0.066 (16,214-17,562 anime)"

COLUMN_DESCRIPTIONS = {
    "anime_id": "MAL anime id (primary key)",
    "codes": "full semantic ID as integers: quantizer codes level 1..L, then the disambiguation index",
    "semantic_id": "token string <L1_c1><L2_c2>...<L{L+1}_d> (unique per anime)",
    "collision_group_size": "anime sharing this anime's quantizer codes before disambiguation (1 = unique)",
    "name": "title (anime_prep.name)",
    "english_name": "English title (anime_prep.english_name)",
    "title": "display title (anime_prep.title)",
    "genres": "genres (anime_prep.genres)",
}


@settings_defaults("semantic_ids")
class SemanticIdsConfig(dg.Config):
    checkpoint: str = Field("", description="checkpoint path/URL; '' = <artifacts>/rqvae_model/model.pt")
    special_tokens: list[str] = Field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS), description="special tokens, first in the vocabulary")
    min_dedup_vocab: int = Field(0, description="minimum size of the disambiguation level's vocabulary")
    min_level_usage: float = Field(
        MIN_LEVEL_USAGE,
        description="blocking check: min fraction of min(items, codebook_size) codes in use at every quantizer level",
    )
    max_collision_rate: float = Field(
        MAX_COLLISION_RATE, description="warn when more than this share of anime share their quantizer codes"
    )
    release_removed: bool = Field(
        False, description="let removed anime's IDs be handed to new anime (default: retired IDs stay reserved)"
    )
    export_folder: str = Field(EXPORT_DIR, description="artifact-store folder of the file exports and the ID registry")


def _title_columns(anime_prep: pl.DataFrame) -> pl.DataFrame:
    cols = [c for c in ("anime_id", "name", "english_name", "title", "genres") if c in anime_prep.columns]
    return anime_prep.select(cols)


def write_exports(store, folder: str, rows: list[dict], vocab: dict, meta: dict, registry=None, registry_meta=None) -> str:
    """Stage the export files (``lib.semantic_ids.exports``) and the ID registry, publish ``folder`` atomically."""
    with store.atomic_dir(folder) as tmp:
        write_export_files(tmp, rows, vocab, meta)
        if registry is not None:
            save_registry(tmp, registry, registry_meta)
    return str(store.path(folder))


SHARDED = embedding_shards() > 0  # $ANIMIND_EMBEDDING_SHARDS: encode per shard in semantic_id_codes

_ASSET_KWARGS = dict(
    name="semantic_ids",
    group_name=GROUP,
    deps=["rqvae_model"],
    kinds={"duckdb", "polars"},
    tags=CONTENT_VERSION_TAGS,  # data version = ID-space hash: dependents rebuild only when an ID changed
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
)


if not SHARDED:

    @dg.asset(
        **_ASSET_KWARGS,
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
        t0 = time.perf_counter()
        store = artifacts.store()
        ckpt, model, payload = load_checkpoint(config.checkpoint, store)
        ids, x, codes, encode_s = encode_embeddings(model, payload, ckpt, anime_embeddings, "anime_embeddings")
        context.log.info(f"encoded {len(ids)} anime with {payload['kind']} checkpoint {ckpt} ({codes.shape[1]} levels) in {encode_s:.1f}s")
        yield from _assign_and_publish(
            context, config, store, exports, anime_prep, ids, codes, vector_hashes(x), ckpt, payload, encode_s, t0
        )

else:

    @dg.asset(
        **_ASSET_KWARGS,
        description="Unique hierarchical semantic ID per anime from the union of the semantic_id_codes shards "
        "(disambiguation level, stable ID registry, vocabulary and exports need every item at once).",
    )
    def semantic_ids(
        context: dg.AssetExecutionContext,
        config: SemanticIdsConfig,
        artifacts: ArtifactStoreResource,
        exports: ParquetExports,
        anime_prep: pl.DataFrame,
        semantic_id_codes: pl.DataFrame,
    ) -> Iterator:
        t0 = time.perf_counter()
        store = artifacts.store()
        ckpt, _model, payload = load_checkpoint(config.checkpoint, store)
        ids, codes, hashes = codes_from_frame(semantic_id_codes, model_fingerprint(payload["model_state"]))
        n_shards = semantic_id_codes["shard"].n_unique() if "shard" in semantic_id_codes.columns else 1
        context.log.info(f"semantic_ids: {len(ids)} anime's codes from {n_shards} shard(s) of semantic_id_codes")
        yield from _assign_and_publish(
            context, config, store, exports, anime_prep, ids, codes, hashes, ckpt, payload, None, t0
        )


def _assign_and_publish(context, config, store, exports, anime_prep, ids, codes, hashes, ckpt, payload, encode_s, t0) -> Iterator:
    """Disambiguate, assign stable IDs against the registry, run the checks, then publish (table, exports,
    registry) only when every blocking check passed."""
    qcfg = payload["config"]
    k = int(qcfg["codebook_size"])
    quantizer_fp = model_fingerprint(payload["model_state"])
    before = code_stats(codes, k)

    # stable assignment against the previous registry (same folder as the exports)
    previous, prev_meta, registry_note = None, {}, ""
    if store.exists(config.export_folder, REGISTRY_FILE) and store.exists(config.export_folder, REGISTRY_META):
        try:
            with store.local_copy(config.export_folder, REGISTRY_FILE) as pq, store.local_copy(config.export_folder, REGISTRY_META) as mj:
                previous = load_registry(pq, mj)
                prev_meta = json.loads(Path(mj).read_text(encoding="utf-8"))
        except (ValueError, OSError, pl.exceptions.PolarsError) as exc:
            registry_note = f"previous ID registry unreadable, IDs assigned afresh: {exc}"
            context.log.warning(registry_note)
    assignment = stable_assign(ids, codes, hashes, quantizer_fp, previous, release_removed=config.release_removed)
    full = assignment.full
    c = assignment.counts

    df = semantic_id_frame(ids, full, id_column="anime_id")
    df = df.join(_title_columns(anime_prep), on="anime_id", how="left")
    # the disambiguation vocabulary never shrinks under one quantizer (retired IDs keep their tokens)
    reg_codes = assignment.registry.frame["codes"].to_list()
    min_dedup = max(config.min_dedup_vocab, 1 + max((int(r[-1]) for r in reg_codes), default=0))
    sizes = level_sizes(full, k, min_dedup)
    vocab = build_vocab(sizes, config.special_tokens)
    version = id_space_version(ids, df["semantic_id"].to_list(), sizes)
    prev_version = str(prev_meta.get("id_space_version", ""))
    changed = version != prev_version
    if assignment.mode == "initial":
        reason = "first assignment: no previous IDs"
    elif assignment.mode == "reassigned":
        reason = (f"quantizer refit ({previous.quantizer} -> {quantizer_fp}): every ID assigned afresh; "
                  f"{c['kept']} happen to be equal, {c['changed']} changed")
    else:
        reason = (f"same quantizer {quantizer_fp}: {c['kept']} IDs kept ({c['reencoded_same_codes']} of them re-encoded "
                  f"to the same codes), {c['changed']} changed, {c['added']} added, {c['removed']} removed")
    if registry_note:
        reason = f"{registry_note}; {reason}"
    effect = (
        f"data version {prev_version or '(none)'} -> {version}: llm_prep_dataset and finetuned_model are stale "
        "(they were built on other IDs)" if changed and prev_version else
        f"data version {version} unchanged: no ID changed, downstream stays fresh" if not changed else
        f"data version {version} (first build)"
    )
    context.log.info(f"semantic_ids: {reason}; {effect}")


    prep_ids = set(anime_prep["anime_id"].to_list()) if "anime_id" in anime_prep.columns else set()
    missing = sorted(prep_ids - set(ids.tolist()))
    n_unique = df["semantic_id"].n_unique()
    group_sizes = df["collision_group_size"].value_counts().sort("collision_group_size")
    usable = min(len(ids), k)  # a level cannot use more codes than there are items (issue 12 rule 9)
    quant_usage = [float(len(np.unique(full[:, lv])) / max(1, usable)) for lv in range(full.shape[1] - 1)]
    examples = {
        "changed": assignment.changed_ids[:10], "added": assignment.added_ids[:10], "removed": assignment.removed_ids[:10],
    }
    md = {
        **table_metadata(
            df,
            preview_cols=[c_ for c_ in ("anime_id", "title", "semantic_id", "collision_group_size") if c_ in df.columns],
            descriptions={
                **COLUMN_DESCRIPTIONS,
                **{f"code_l{i + 1}": (f"quantizer code at level {i + 1} (0..{k - 1})" if i < full.shape[1] - 1
                                      else "disambiguation index (0 unless the quantizer codes collide)")
                   for i in range(full.shape[1])},
            },
        ),
        **scalar_metadata(
            {
                "ids_kept": c["kept"],
                "ids_changed": c["changed"],
                "ids_added": c["added"],
                "ids_removed": c["removed"],
                "ids_retired_reserved": c["retired"],
                "assignment_mode": assignment.mode,
                "id_change_reason": reason,
                "downstream_effect": effect,
                "id_space_version": version,
                "quantizer_fingerprint": quantizer_fp,
                "levels_with_disambiguation": int(full.shape[1]),
                "unique_fraction_before_disambiguation": round(float(before["unique_fraction"]), 4),
                "items_in_collisions_before_disambiguation": round(float(before["items_in_collisions"]), 4),
                "largest_collision_group": int(before["largest_collision_group"]),
                "unique_fraction_after_disambiguation": round(n_unique / max(1, df.height), 4),
                "vocab_size": vocab["vocab_size"],
                "disambiguation_vocab": sizes[-1],
                "usable_codes_per_level": usable,
                "missing_from_prep": len(missing),
                "encoded": len(ids),
                "encode_seconds": round(encode_s, 2) if encode_s is not None else None,
                "encoded_per_s": round(len(ids) / encode_s, 1) if encode_s else None,
                "encoded_in": "semantic_id_codes shards" if encode_s is None else "this step",
                "wall_seconds": round(time.perf_counter() - t0, 2),
                "checkpoint": ckpt,
            }
        ),
        "id_change_examples": dg.MetadataValue.json(examples),
        **{f"usage_l{i + 1}": dg.MetadataValue.float(round(u, 4)) for i, u in enumerate(quant_usage)},
        **{f"perplexity_l{i + 1}": dg.MetadataValue.float(round(float(before[f"perplexity_l{i + 1}"]), 2)) for i in range(codes.shape[1])},
        "collision_groups": counts_md(
            {str(r["collision_group_size"]): r["count"] for r in group_sizes.iter_rows(named=True)},
            key="anime sharing quantizer codes",
            value="anime",
        ),
        **plot_metadata(
            "usage_plot",
            {f"L{i + 1}": u for i, u in enumerate(quant_usage)},
            f"fraction of min(items, codebook_size) = {usable} codes used per level",
            "fraction",
        ),
    }
    checks: list[dg.AssetCheckResult] = []
    checks.append(dg.AssetCheckResult(
        check_name="every_anime_has_id",
        passed=not missing,
        metadata={"missing": dg.MetadataValue.int(len(missing)), "missing_examples": dg.MetadataValue.text(str(missing[:20]))},
        description=None if not missing else (
            f"{len(missing)} anime in anime_prep have no embedding/ID, e.g. {missing[:5]}. Cause: anime_embeddings is "
            "older than anime_prep or dropped rows (see its skipped counts). Fix: materialize anime_embeddings, then semantic_ids."
        ),
    ))
    dup = df.filter(pl.col("semantic_id").is_duplicated())["semantic_id"].unique().head(5).to_list()
    checks.append(dg.AssetCheckResult(
        check_name="ids_unique",
        passed=n_unique == df.height,
        metadata={"unique_ids": dg.MetadataValue.int(n_unique), "rows": dg.MetadataValue.int(df.height),
                  "duplicate_examples": dg.MetadataValue.text(str(dup))},
        description=None if n_unique == df.height else (
            f"{df.height - n_unique} duplicate IDs, e.g. {dup}. Cause: a corrupt ID registry in the export folder. "
            "Fix: rematerialize rqvae_model with refit: true (assigns every ID afresh)."
        ),
    ))
    checks.append(usage_check(quant_usage, usable, k, len(ids), config.min_level_usage))
    checks.append(collision_check(float(before["items_in_collisions"]), int(before["largest_collision_group"]), config.max_collision_rate, k, int(qcfg["levels"])))

    # Blocking checks run BEFORE anything is written (issue 12 rule 5): a failure leaves the previous
    # table, Parquet export, file exports and ID registry in place.
    for check in checks:
        yield check
    blocking = {"every_anime_has_id", "ids_unique", "level_usage_floor"}
    failed = [c.check_name for c in checks if c.check_name in blocking and not c.passed]
    if failed:
        raise dg.Failure(
            description=f"semantic_ids: blocking check(s) {failed} failed; semantic_ids wrote nothing (its previous "
            f"table, exports and ID registry are kept); quantizer checkpoint used: {ckpt}",
            metadata={name: md[name] for name in ("dagster/row_count", "missing_from_prep") if name in md},
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
            "codebook_size": k,
            "disambiguation_level": int(full.shape[1]),
            "checkpoint": ckpt,
            "quantizer": payload["kind"],
            "quantizer_fingerprint": quantizer_fp,
            "id_space_version": version,
            "input_fingerprint": payload.get("input_fingerprint", ""),
        },
        registry=assignment.registry,
        registry_meta={"id_space_version": version, "checkpoint": ckpt, "id_column": "anime_id"},
    )
    parquet = exports.write(df, "semantic_ids")
    md["export_folder"] = dg.MetadataValue.path(folder)
    md["parquet_export"] = dg.MetadataValue.path(parquet)
    yield dg.Output(df, metadata=md, data_version=dg.DataVersion(version))


def usage_check(quant_usage: list[float], usable: int, k: int, n: int, floor: float) -> dg.AssetCheckResult:
    """``level_usage_floor``: every quantizer level uses >= ``floor`` of min(items, codebook_size) codes."""
    low = {f"L{i + 1}": round(u, 4) for i, u in enumerate(quant_usage) if u < floor}
    desc = None
    if low:
        desc = (
            f"levels {', '.join(low)} use {', '.join(f'{v:.0%}' for v in low.values())} of min({n} items, codebook_size {k}) = "
            f"{usable} codes (floor {floor:.0%}; healthy MAL builds measured use {HEALTHY_MIN_USAGE:.0%}). Cause: codebook "
            "collapse (many codes never chosen: too many codes for the data's spread, or a degenerate embedding such as "
            "many identical texts). Fix: look at anime_embeddings for duplicated vectors; rematerialize rqvae_model with "
            "refit: true and a smaller codebook_size or the default preset."
        )
    return dg.AssetCheckResult(
        check_name="level_usage_floor",
        passed=not low,
        metadata={"floor": dg.MetadataValue.float(floor),
                  "usable_codes_per_level": dg.MetadataValue.int(usable),
                  "min_usage": dg.MetadataValue.float(round(float(min(quant_usage)), 4) if quant_usage else 0.0),
                  "below_floor": dg.MetadataValue.json(low)},
        description=desc,
    )


def collision_check(rate: float, largest: int, threshold: float, k: int, levels: int) -> dg.AssetCheckResult:
    """``collision_rate_before_disambiguation`` (warning): share of anime whose quantizer codes are shared."""
    desc = None
    if rate > threshold:
        desc = (
            f"{rate:.1%} of anime share their quantizer codes with another anime (threshold {threshold:.1%}; healthy "
            f"full MAL builds measured {HEALTHY_COLLISION_RANGE}), largest group {largest}. IDs stay unique through the "
            "disambiguation level, but those anime differ only in that last token. Cause: more near-identical items than "
            f"{levels} levels x {k} codes separate (franchise entries, placeholder synopses) or a collapsed level. Fix: "
            "rematerialize rqvae_model with refit: true and more capacity (levels + 1 or a larger codebook_size), or "
            "raise max_collision_rate if the catalog really holds that many near-duplicates."
        )
    return dg.AssetCheckResult(
        check_name="collision_rate_before_disambiguation",
        passed=rate <= threshold,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"collision_rate": dg.MetadataValue.float(round(rate, 4)),
                  "threshold": dg.MetadataValue.float(threshold),
                  "largest_collision_group": dg.MetadataValue.int(largest)},
        description=desc,
    )
