"""What a step asks of Kubernetes when the Definitions run on a cluster (deploy/README.md).

dagster-k8s's k8s_job_executor reads the op tag `dagster-k8s/config` of each step and applies it
to that step's pod; the in-process and multiprocess executors of a local run ignore it.
"""

K8S_CONFIG_TAG = "dagster-k8s/config"

# One GPU for the step's container (for an extended resource the request equals the limit), on a
# GPU node: the label NVIDIA's GPU feature discovery sets, and the usual taint of GPU node pools.
GPU_K8S_CONFIG = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
    "pod_spec_config": {
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}

# op_tags of the assets that train or sample on a GPU (value_models, rollouts).
GPU_OP_TAGS = {K8S_CONFIG_TAG: GPU_K8S_CONFIG}
