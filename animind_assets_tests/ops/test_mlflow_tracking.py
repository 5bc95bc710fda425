"""MLflow runs a person can find: name = asset key [+ partition], Dagster run id / code version tags, only
the parameters the fit used, a UI link from the configured URL, and a no-op run when tracking is off."""


import warnings

import dagster as dg
import numpy as np
import polars as pl

warnings.filterwarnings("ignore", category=getattr(dg, "BetaWarning", Warning))


def _embeddings(n: int = 64, dim: int = 8) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return pl.DataFrame({"anime_id": np.arange(n), "embedding": x.tolist(), "model": ["synthetic"] * n})


def _probe_assets(partitioned: bool):
    from animind_assets.defs.semantic_ids.quantizer_fit import run_quantizer
    from animind_assets.lib.semantic_ids.quantizers import preset_config
    from animind_assets.resources import ArtifactStoreResource, MlflowResource

    frame = _embeddings()

    @dg.asset(
        code_version="7",
        partitions_def=dg.StaticPartitionsDefinition(["small"]) if partitioned else None,
    )
    def probe(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource, mlflow: MlflowResource):
        cfg = preset_config("default", levels=2, codebook_size=4, kmeans_iters=3)
        _, md = run_quantizer(context, cfg, frame, artifacts, mlflow, "probe", run_name="probe")
        return dg.MaterializeResult(metadata={k: v for k, v in md.items() if k.startswith("mlflow")})

    return probe


def _resources(tmp_path, enabled: bool, **kw):
    from animind_assets.resources import ArtifactStoreResource, MlflowResource

    return {
        "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts")),
        "mlflow": MlflowResource(
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            artifact_location=str(tmp_path / "mlartifacts"),
            enabled=enabled,
            **kw,
        ),
    }


def test_kmeans_fit_run_name_tags_params_and_link(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("ANIMIND_MLFLOW_UI_URL", raising=False)
    import mlflow

    from animind_assets.lib.semantic_ids.quantizers.config import RQKMEANS_FIELDS

    probe = _probe_assets(partitioned=True)
    result = dg.materialize([probe], resources=_resources(tmp_path, True), partition_key="small")
    assert result.success
    md = result.asset_materializations_for_node("probe")[0].metadata
    run_id = md["mlflow_run_id"].value
    link = md["mlflow_run"].value
    assert link.startswith("http://127.0.0.1:5000/#/experiments/") and link.endswith(f"/runs/{run_id}")

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.run_name == "probe[small]"
    tags = run.data.tags
    assert tags["dagster.run_id"] == result.run_id
    assert tags["dagster.asset"] == "probe" and tags["dagster.partition"] == "small"
    assert tags["dagster.code_version"] == "7"
    params = set(run.data.params)
    assert params <= set(RQKMEANS_FIELDS), params - set(RQKMEANS_FIELDS)
    for rqvae_only in ("epochs", "lr", "latent_dim", "amp", "batch_size", "hidden_dims", "ema_decay"):
        assert rqvae_only not in params, f"k-means fit logged the RQ-VAE-only knob {rqvae_only}"
    assert {"levels", "codebook_size", "kmeans_iters", "seed", "quantizer"} <= params


def test_ui_link_follows_the_configured_url(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ANIMIND_MLFLOW_UI_URL", "https://mlflow.example.org/")
    from animind_assets.resources import MlflowResource

    assert MlflowResource().ui_base_url == "https://mlflow.example.org/"
    probe = _probe_assets(partitioned=False)
    result = dg.materialize([probe], resources=_resources(tmp_path, True))
    link = result.asset_materializations_for_node("probe")[0].metadata["mlflow_run"].value
    assert link.startswith("https://mlflow.example.org/#/experiments/")


def test_disabled_tracking_yields_a_noop_run(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(tmp_path))
    from animind_assets.resources import MlflowResource, NoOpMlflowRun

    probe = _probe_assets(partitioned=False)
    result = dg.materialize([probe], resources=_resources(tmp_path, False))
    assert result.success
    assert result.asset_materializations_for_node("probe")[0].metadata == {}
    assert not (tmp_path / "mlflow.db").exists()
    with MlflowResource(enabled=False).start_run(run_name="x") as run:
        assert isinstance(run, NoOpMlflowRun) and run.run_id is None and run.link is None
        run.log_params({"a": 1})
        run.log_metrics({"b": 2.0}, step=1)
        run.set_tags({"c": "d"})
