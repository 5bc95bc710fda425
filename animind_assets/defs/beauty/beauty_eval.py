"""``beauty_eval``: every Beauty model ranked on the same users, in the same order, with the same
exclusions (``animind_assets.lib.retrieval.evaluation``): popularity, ``sasrec_model``,
``rpg_model`` and, when present, ``tiger_model`` partitions and the semantic-ID LM rows of
``beauty_llm_eval`` (taken from its artifact folder only when it evaluated exactly these users).

Protocol: leave-one-out test (last item; history = everything before it), full ranking over all
items, ties by ascending item id, Recall/NDCG@5/10 with 95% bootstrap intervals over users, each
model both with and without masking of already-seen items. Published reference rows are added with
``kind='published'`` and never mixed into the measured rows. Missing models are skipped with a
warning; at least one trained model is required.
"""

import time

import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.defs.beauty.shared import GROUP, ID_SOURCES, TIGER_MODEL_ASSET, split_from_interactions
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.retrieval.evaluation import METRICS, PUBLISHED_BEAUTY, evaluate_scorer, popularity_scorer, protocol
from animind_assets.lib.retrieval.seqtrain import make_scorer, resolve_device
from animind_assets.meta import image_md, markdown_table, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource, ParquetExports
from animind_assets.launchpad import settings_defaults

ASSET = "beauty_eval"
SCHEMA = {
    "model": pl.Utf8, "kind": pl.Utf8, "masking": pl.Utf8,
    **{m: pl.Float64 for m in METRICS},
    **{f"{m}_{b}": pl.Float64 for m in METRICS for b in ("lo", "hi")},
    "users": pl.Int64, "eval_seconds": pl.Float64, "invalid_id_rate": pl.Float64,
}


@settings_defaults("beauty_eval")
class BeautyEvalConfig(dg.Config):
    models: list[str] = Field(default_factory=lambda: ["popularity", "sasrec", "rpg", "tiger", "llm"],
                              description="rows to evaluate: popularity | sasrec | rpg | tiger | llm (missing models are skipped; "
                              "llm = the rows of beauty_llm_eval, taken only when it evaluated the same users)")
    tiger_partitions: list[str] = Field(default_factory=lambda: list(ID_SOURCES), description="tiger_model partitions to include")
    tiger_beams: int = Field(20, description="TIGER constrained beam width (>= 10)")
    test_users: int = Field(0, description="0 = every test user; >0 = seeded subset, the same for every model")
    n_boot: int = Field(1000, description="bootstrap resamples for the 95% intervals (0 = none)")
    seed: int = Field(0, description="seed of the user subset and the bootstrap")
    batch_size: int = Field(512, description="users scored per batch")
    num_threads: int = Field(2, description="torch CPU threads (0 = leave as is)")
    device: str = Field("auto", description="auto | cpu | cuda")


def _rows(res, kind: str, extra: dict | None = None) -> list[dict]:
    out = []
    for mode in ("masked", "unmasked"):
        if mode in res.metrics:
            r = {k: None for k in SCHEMA}
            r.update({k: v for k, v in res.row(mode).items() if k in SCHEMA})
            r.update({"kind": kind, **(extra or {})})
            out.append(r)
    return out


@dg.asset(
    group_name=GROUP,
    deps=["sasrec_model", "rpg_model", TIGER_MODEL_ASSET, "beauty_llm_eval"],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "polars", "duckdb"},
    description="One leave-one-out evaluation of popularity, SASRec, RPG and TIGER on the same users (masked and unmasked, 95% CIs).",
)
def beauty_eval(
    context: dg.AssetExecutionContext,
    config: BeautyEvalConfig,
    artifacts: ArtifactStoreResource,
    exports: ParquetExports,
    beauty_interactions: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    import torch

    from animind_assets.lib.retrieval.rpg import load_rpg
    from animind_assets.lib.retrieval.sasrec import load_sasrec
    from animind_assets.lib.retrieval.tiger import comparison_bar_png, evaluate_on_split, load_model

    t0 = time.perf_counter()
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    store = artifacts.store()
    split, data_fp = split_from_interactions(beauty_interactions)
    rows_idx = split.subset(config.test_users, seed=config.seed)
    common = dict(rows=rows_idx, n_boot=config.n_boot, seed=config.seed, batch_size=config.batch_size, log=context.log.info)
    rows: list[dict] = []
    evaluated: list[str] = []
    for name in config.models:
        if name == "popularity":
            rows += _rows(evaluate_scorer(popularity_scorer(split), split, "test", "popularity (train+valid counts)", **common), "baseline")
        elif name in ("sasrec", "rpg"):
            asset = f"{name}_model"
            if not store.exists(asset, "model", "config.json"):
                context.log.warning(f"{ASSET}: no {asset} at {store.path(asset, 'model')}: skipped")
                continue
            loader = load_sasrec if name == "sasrec" else load_rpg
            model, extra = loader(str(store.path(asset, "model")))
            if extra.get("data_fingerprint") not in (None, data_fp):
                context.log.warning(f"{ASSET}: {asset} was trained on other interactions (fingerprint differs): retrain it")
            if getattr(model, "n_items", split.n_items) != split.n_items:
                raise ValueError(f"{asset} scores {model.n_items} items but the interactions have {split.n_items}")
            model.to(device)
            label = "SASRec-" + model.cfg.loss.upper() if name == "sasrec" else f"RPG ({model.m}x{model.k} PQ codes)"
            res = evaluate_scorer(make_scorer(model, model.max_len, device), split, "test", label, **common)
            rows += _rows(res, "measured", {"invalid_id_rate": 0.0 if name == "rpg" else None})
            evaluated.append(name)
        elif name == "tiger":
            for part in config.tiger_partitions:
                if not store.exists(TIGER_MODEL_ASSET, part, "model", "codec.json"):
                    context.log.warning(f"{ASSET}: no {TIGER_MODEL_ASSET}[{part}]: skipped")
                    continue
                model, codec, tcfg, _extra = load_model(str(store.path(TIGER_MODEL_ASSET, part, "model")))
                model.to(device)
                res = evaluate_on_split(model, codec, split, rows_idx, max_history=tcfg.max_history, beams=config.tiger_beams,
                                        n_boot=config.n_boot, seed=config.seed, label=f"TIGER [{part} IDs]", log=context.log.info)
                rows += _rows(res, "measured", {"invalid_id_rate": res.extra["invalid_id_rate"]})
                evaluated.append(f"tiger[{part}]")
        elif name == "llm":  # the LM's beam search is run once, by beauty_llm_eval; its rows join only on the same users
            if not store.exists("beauty_llm_eval", "rows.parquet"):
                context.log.warning(f"{ASSET}: no beauty_llm_eval rows: skipped")
                continue
            llm_users = store.read_json("beauty_llm_eval", "users.json")
            if llm_users.get("users") != split.users[rows_idx].tolist() or llm_users.get("data_fingerprint") != data_fp:
                context.log.warning(f"{ASSET}: beauty_llm_eval evaluated other users or interactions (set the same test_users "
                                    f"and seed, {config.test_users} and {config.seed}): LM rows skipped")
                continue
            with store.local_copy("beauty_llm_eval", "rows.parquet") as local:
                lm_rows = pl.read_parquet(local).filter(pl.col("kind") == "measured")
            rows += [{k: r.get(k) for k in SCHEMA} for r in lm_rows.iter_rows(named=True)]
            evaluated.append("llm")
        else:
            raise ValueError(f"unknown model {name!r}; expected popularity | sasrec | rpg | tiger | llm")
    if not evaluated:
        raise ValueError("no trained model found (sasrec_model, rpg_model, tiger_model, beauty_llm_eval): materialize one first")
    for label, vals in PUBLISHED_BEAUTY.items():
        r = {k: None for k in SCHEMA}
        r.update({"model": label, "kind": "published", "masking": "as published", **vals})
        rows.append(r)
    df = pl.DataFrame(rows, schema=SCHEMA)
    export = exports.write(df, ASSET)
    masked = {r["model"]: r for r in rows if r["masking"] == "masked"}
    published = {f"{k} [published]": v for k, v in PUBLISHED_BEAUTY.items()}
    headline = {f"{r['model']}_{r['masking']}_{m}": r[m] for r in rows if r["kind"] != "published" for m in ("recall@10", "ndcg@10")}
    md = {
        **table_metadata(df, preview_rows=20, preview_cols=["model", "kind", "masking", *METRICS, "users"]),
        **scalar_metadata({**headline, "test_users": int(len(rows_idx)), "data_fingerprint": data_fp,
                           "eval_seconds": round(time.perf_counter() - t0, 1), "parquet_export": export}),
        "comparison": dg.MetadataValue.md(markdown_table(
            df.select(["model", "kind", "masking", *METRICS, "recall@10_lo", "recall@10_hi", "users"]), max_rows=30)),
        "protocol": dg.MetadataValue.json(protocol(split, "test", rows_idx)),
        "comparison_plot_masked": image_md(comparison_bar_png({**masked, **published}, title="Beauty test, seen items masked (ours) vs published"),
                                           "Ours (masked) vs published"),
        "comparison_plot_unmasked": image_md(comparison_bar_png({r["model"]: r for r in rows if r["masking"] == "unmasked"},
                                                                title="Beauty test, no masking (ours)"), "Ours (unmasked)"),
    }
    return dg.Output(df, metadata=md)
