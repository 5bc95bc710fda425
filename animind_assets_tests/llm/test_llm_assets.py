"""The three Dagster assets chained in-process: llm_prep_dataset -> finetuned_model -> recommendation_eval."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch

from animind_assets_tests.llm_fixtures import make_catalog, make_codebooks, make_interactions, make_semantic_ids, smollm2_tokenizer, tiny_llama


@pytest.fixture()
def tiny_base(tmp_path) -> Path:
    tok = smollm2_tokenizer()
    folder = tmp_path / "tiny_base"
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("next_id_format", ["question", "sequence"])
def test_llm_assets_chain(animind_env, tmp_path, tiny_base, next_id_format):
    from animind_assets.defs.llm.finetuned_model import finetuned_model
    from animind_assets.defs.llm.llm_prep_dataset import llm_prep_dataset, llm_prep_dataset_split_by_user
    from animind_assets.defs.llm.recommendation_eval import recommendation_eval, recommendation_eval_valid_ids
    from animind_assets.lib.semantic_ids.quantizers.checkpoint import save_checkpoint
    from animind_assets.recommend import main as recommend_main
    from animind_assets.resources import AniMindDuckDBIOManager, ArtifactStoreResource, MlflowResource, ParquetExports

    cat = make_catalog()
    inter = make_interactions()
    sids = make_semantic_ids(cat)
    artifacts = animind_env / "artifacts"
    books = make_codebooks()
    save_checkpoint(
        {"config": {"levels": 3}, "finished": True,
         "model_state": {f"quantizer.codebooks.{i}.embed": torch.from_numpy(b) for i, b in enumerate(books)}},
        artifacts / "rqvae_model" / "model.pt",
    )

    @dg.asset(name="anime_prep")
    def anime_prep_stub() -> pl.DataFrame:
        return cat

    @dg.asset(name="user_interactions")
    def user_interactions_stub() -> dg.Output[pl.DataFrame]:
        return dg.Output(inter, metadata={"has_timestamps": False})

    @dg.asset(name="semantic_ids")
    def semantic_ids_stub() -> pl.DataFrame:
        return sids

    @dg.asset(name="rqvae_model")
    def rqvae_stub() -> None:
        return None

    resources = {
        "io_manager": AniMindDuckDBIOManager(database=str(animind_env / "animind.duckdb"), schema="main"),
        "artifacts": ArtifactStoreResource(root=str(artifacts)),
        "exports": ParquetExports(root=str(animind_env / "exports")),
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{animind_env / 'mlflow.db'}", artifact_location=str(animind_env / "mlartifacts")),
    }
    run_config = {
        "ops": {
            "llm_prep_dataset": {"config": {"n_examples": 300, "validation_user_frac": 0.2, "test_user_frac": 0.2, "tokenizer_model": str(tiny_base),
                                            "next_id_format": next_id_format}},
            "finetuned_model": {"config": {"base_model": str(tiny_base), "phase1_max_steps": 1, "phase2_max_steps": 1, "batch_size": 4,
                                           "max_seq_length": 256, "eval_examples": 2, "train_layers": 0, "num_threads": 1,
                                           # the sequence form distils from EASE, temperature fitted (0)
                                           **({"distill_weight": 0.5, "distill_temperature": 0.0,
                                               "phase2_weights": {"A": 0.0, "B": 1.0, "C": 0.0}}
                                              if next_id_format == "sequence" else {})}},
            "recommendation_eval": {"config": {"max_users": 3, "num_beams": 10, "unconstrained_users": 1, "title_items": 2, "num_threads": 1}},
        }
    }
    result = dg.materialize(
        [anime_prep_stub, user_interactions_stub, semantic_ids_stub, rqvae_stub, llm_prep_dataset, finetuned_model,
         recommendation_eval, llm_prep_dataset_split_by_user, recommendation_eval_valid_ids],
        resources=resources,
        run_config=run_config,
    )
    assert result.success
    prep_md = result.asset_materializations_for_node("llm_prep_dataset")[0].metadata
    assert prep_md["dagster/row_count"].value > 0 and prep_md["order_is_temporal"].value is False
    assert prep_md["heldout_items_in_train"].value == 0 and "token" in prep_md["token_lengths"].value
    assert prep_md["next_id_format"].value == next_id_format and prep_md["b_targets_per_row"].value >= 1
    assert {"train.jsonl", "validation.jsonl", "test.jsonl", "summary.json"} <= {p.name for p in (artifacts / "llm_prep_dataset").iterdir()}
    first = json.loads((artifacts / "llm_prep_dataset" / "train.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert (animind_env / "exports" / "llm_prep_dataset.parquet").exists()

    ft_md = result.asset_materializations_for_node("finetuned_model")[0].metadata
    assert ft_md["warm_start"].value == "rqvae" and ft_md["method"].value == "full"
    assert ft_md["english_ppl_after"].value > 0 and "mlflow_run_id" in ft_md
    if next_id_format == "sequence":
        assert ft_md["distill_positions"].value > 0 and 0 < ft_md["distill_temperature"].value < 10
    else:
        assert ft_md["distill_weight"].value == 0.0 and "distill_positions" not in ft_md
    model_dir = artifacts / "finetuned_model"
    assert (model_dir / "sid_lookup.parquet").exists() and (model_dir / "model.safetensors").exists()
    assert not any(p.name.startswith(".finetuned_model.tmp") for p in artifacts.iterdir())  # atomic folder swap

    ev_md = result.asset_materializations_for_node("recommendation_eval")[0].metadata
    assert ev_md["valid_id_rate"].value == 1.0 and ev_md["users"].value == 3 and ev_md["next_id_format"].value == next_id_format
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"llm_prep_dataset_split_by_user": True, "recommendation_eval_valid_ids": True}
    assert (artifacts / "recommendation_eval" / "predictions.parquet").exists()

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{animind_env / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["animind"], output_format="list")
    names = {r.info.run_name for r in runs}
    assert {"finetuned_model", "recommendation_eval"} <= names
    ft_run = next(r for r in runs if r.info.run_name == "finetuned_model")
    assert "english_ppl_after" in ft_run.data.metrics
    assert any(a.path == "model" for a in mlflow.MlflowClient().list_artifacts(ft_run.info.run_id))

    # the CLI finds the materialized model through ANIMIND_DATA_DIR
    assert recommend_main(["--history", "Cowboy Bebop", "-k", "3"]) == 0
