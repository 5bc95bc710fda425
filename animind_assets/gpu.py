"""How GPU steps are tagged so a deployment routes them to GPU machines.

* ``pool="gpu"``: Dagster concurrency pool (limit 1 in the shipped ``dagster.yaml``), so GPU steps
  queue instead of fighting over one device.
* ``dagster-k8s/config`` op tags: with ``k8s_job_executor`` / ``K8sRunLauncher`` each GPU step's pod
  requests ``nvidia.com/gpu`` and lands on a GPU node (node selector + toleration).
Locally (no Kubernetes) the tags are inert and the step runs on whatever device is present.
"""

from __future__ import annotations

import os

GPU_POOL = "gpu"

# A step waiting for the `gpu` slot sleeps between claims instead of spinning (animind_assets.run_health).
from animind_assets.run_health import install_pool_wait_backoff  # noqa: E402

install_pool_wait_backoff()


def gpu_op_tags(gpus: int = 1) -> dict:
    node_selector_key = os.environ.get("ANIMIND_GPU_NODE_LABEL", "nvidia.com/gpu.present")
    return {
        "dagster-k8s/config": {
            "container_config": {
                "resources": {
                    "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": str(gpus)},
                    "limits": {"memory": "32Gi", "nvidia.com/gpu": str(gpus)},
                }
            },
            "pod_spec_config": {
                "node_selector": {node_selector_key: "true"},
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ],
            },
        },
        "animind/device": "gpu",
    }


GPU_OP_TAGS = gpu_op_tags()
