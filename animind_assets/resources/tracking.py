"""MLflow tracking: run per asset (name = asset key [+ partition], Dagster tags), no-op run when disabled;
credentials only from the environment (read by MLflow itself)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Optional

import dagster as dg
from pydantic import Field

from animind_assets.resources.paths import data_dir

def default_mlflow_uri() -> str:
    """``$ANIMIND_MLFLOW_TRACKING_URI`` when set (compose/Helm point it at the MLflow server), else a
    local SQLite store under ``data/``. (Not ``MLFLOW_TRACKING_URI``: ``mlflow.set_tracking_uri`` writes
    that variable into the process environment, which would leak one run's store into the next.)"""
    return os.environ.get("ANIMIND_MLFLOW_TRACKING_URI") or f"sqlite:///{data_dir() / 'mlflow.db'}"


def _default_artifact_location() -> str | None:
    uri = default_mlflow_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return None  # the tracking server decides
    return str(data_dir() / "mlartifacts")


class MlflowRun:
    """Thin handle over an active MLflow run, passed to library code as plain callables.

    ``name`` is the run name (asset key [+ ``[partition]``]), ``link`` the run's page in the MLflow UI
    (``MlflowResource.ui_base_url``)."""

    enabled = True

    def __init__(self, run_id: str, experiment_id: str, link: str, name: str = "") -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.link = link
        self.name = name

    def log_params(self, params: dict) -> None:
        import mlflow

        flat = {str(k): (str(v)[:500]) for k, v in params.items()}
        mlflow.log_params(flat)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import math

        import mlflow

        clean = {}
        for k, v in metrics.items():
            try:
                fv = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(fv):
                clean[str(k).replace("@", "_at_")] = fv
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(path, artifact_path=artifact_path)

    def set_tags(self, tags: dict) -> None:
        import mlflow

        mlflow.set_tags({str(k): str(v) for k, v in tags.items()})


class NoOpMlflowRun(MlflowRun):
    """What ``MlflowResource.start_run`` yields when tracking is off: same methods, nothing logged,
    ``run_id`` / ``link`` / ``experiment_id`` are ``None`` (so assets need no ``if run is not None``)."""

    enabled = False

    def __init__(self, name: str = "") -> None:
        self.run_id = None  # type: ignore[assignment]
        self.experiment_id = None  # type: ignore[assignment]
        self.link = None  # type: ignore[assignment]
        self.name = name

    def log_params(self, params: dict) -> None:
        return None

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        return None

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        return None

    def set_tags(self, tags: dict) -> None:
        return None


def default_mlflow_ui_url() -> str:
    """``$ANIMIND_MLFLOW_UI_URL``, else ``http://127.0.0.1:5000`` (what ``mlflow ui --port 5000`` serves)."""
    return os.environ.get("ANIMIND_MLFLOW_UI_URL", "").strip() or "http://127.0.0.1:5000"


def dagster_run_tags(context) -> tuple[str, dict[str, str]]:
    """``(run name, tags)`` for an MLflow run started by an asset: name = asset key [+ ``[partition]``];
    tags ``dagster.run_id``, ``dagster.job``, ``dagster.asset``, ``dagster.partition``,
    ``dagster.code_version`` (those that exist). ``context``: an ``AssetExecutionContext``."""
    key = context.asset_key
    name = key.to_user_string()
    tags = {"dagster.run_id": context.run_id, "dagster.job": context.job_name, "dagster.asset": name}
    if context.has_partition_key:
        name = f"{name}[{context.partition_key}]"
        tags["dagster.partition"] = str(context.partition_key)
    try:
        version = context.assets_def.code_versions_by_key.get(key)
    except Exception:  # noqa: BLE001 - direct invocation without an assets definition
        version = None
    if version:
        tags["dagster.code_version"] = str(version)
    return name, tags


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking. Local SQLite store under ``data/`` by default (MLflow 3 keeps the plain
    ``./mlruns`` folder store in maintenance mode); any tracking URI by config.

    Credentials are read from the environment (``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``) by MLflow itself and are never part of
    this resource's config, so they never appear in Dagster's config snapshots or metadata.
    """

    tracking_uri: str = Field(default_factory=default_mlflow_uri, description="MLflow tracking URI")
    experiment_name: str = Field(default="animind", description="MLflow experiment")
    artifact_location: Optional[str] = Field(
        default_factory=_default_artifact_location,
        description="artifact root used when the experiment is created (None: the tracking server decides)",
    )
    ui_base_url: str = Field(
        default_factory=default_mlflow_ui_url,
        description="MLflow UI base URL for the run links in metadata ($ANIMIND_MLFLOW_UI_URL; default "
        "http://127.0.0.1:5000 = `mlflow ui --port 5000`)",
    )
    enabled: bool = Field(default=True, description="turn tracking off entirely")

    @contextlib.contextmanager
    def start_run(
        self, context=None, *, run_name: str | None = None, tags: dict | None = None
    ) -> Iterator[MlflowRun]:
        """An MLflow run for the asset being materialized (``context``: its ``AssetExecutionContext``).

        Run name = asset key [+ ``[partition]``] (``run_name`` overrides it, e.g. outside Dagster); tags =
        the Dagster run id, job, asset, partition and code version, plus ``tags``. Yields an ``MlflowRun``,
        or a ``NoOpMlflowRun`` (``run_id``/``link`` ``None``, methods do nothing) when ``enabled`` is false.
        """
        name, all_tags = dagster_run_tags(context) if context is not None else ("", {})
        name = run_name or name or "animind"
        all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        if not self.enabled:
            yield NoOpMlflowRun(name)
            return
        import logging

        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        exp = mlflow.get_experiment_by_name(self.experiment_name)
        if exp is None:
            exp_id = mlflow.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        else:
            exp_id = exp.experiment_id
        with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=all_tags) as run:
            link = f"{self.ui_base_url.rstrip('/')}/#/experiments/{exp_id}/runs/{run.info.run_id}"
            yield MlflowRun(run.info.run_id, exp_id, link, name)


SourceKind = Literal["demo", "sqlite", "kaggle_csv"]
