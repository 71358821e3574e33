"""Multi-node training as a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1, control plane v2.3).

`build_trainjob` is a pure function from a `TrainJobRequest` to the object the cluster gets; `launch` creates
it through a CustomObjectsApi, re-attaches to a job that already exists (a retried launcher), replaces a Failed
one (the trainer spec is immutable, and `train --resume` continues from the shared checkpoint volume) and
waits on `status.conditions`.

Why plain dicts and not `kubeflow.trainer.TrainerClient().train()`: that call reads the runtime from the
cluster to build the manifest, so it can be neither unit-tested offline nor validated before it is sent; the
`kubeflow-trainer-api` models describe the same schema the vendored CRD carries, which the tests check.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rewardtune.errors import RewardtuneError

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
RUNTIME_NAME = "rewardtune-torch"  # manifests/trainer/training-runtime.yaml
NODE = "node"  # the runtime's replicated job and container name, as in upstream torch-distributed
PATCH_MANAGER = "rewardtune.io/launcher"
# Set by the Trainer's torch plugin on every node (torchrun reads them as defaults for its flags); the plugin's
# admission check refuses a TrainJob whose trainer.env names any of them.
PET_ENV = frozenset({"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"})
RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # the CRD's CEL rule on metadata.name (and size <= 63)
CHECKPOINT_MOUNT = "/mnt/checkpoints"
CACHE_MOUNT = "/mnt/model-cache"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
GPU_RESOURCE = "nvidia.com/gpu"
RUN_AS = 1000


def trainjob_name(run_id: str, prefix: str = "rt") -> str:
    """A short RFC 1035 label from the KFP run id: the same run (and every retry of it) gets the same name.

    Kept at 24 characters: the Trainer derives pod host names `<name>-node-0-<i>` and a headless service from it.
    """
    if not run_id:
        raise RewardtuneError("trainjob: run_id is empty; pass the KFP run id (dsl.PIPELINE_JOB_ID_PLACEHOLDER)")
    slug = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")[:10].strip("-")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return f"{prefix}-{slug}-{digest}" if slug else f"{prefix}-{digest}"


def shutdown_timings(grace_s: int) -> tuple[int, int]:
    """(TORCH_ELASTIC_SHUTDOWN_TIMEOUT, terminationGracePeriodSeconds) for a trainer checkpoint grace of `grace_s`.

    On SIGTERM torchrun forwards the signal to its workers and SIGKILLs them after the shutdown timeout, and the
    kubelet SIGKILLs the pod after the termination grace period: each must outlast the one inside it, or the
    checkpoint the trainer starts within `grace_s` is cut off.
    """
    if grace_s < 1:
        raise RewardtuneError(f"trainjob: termination grace {grace_s} s must be >= 1")
    return grace_s + 15, grace_s + 30


@dataclass(frozen=True)
class TrainJobRequest:
    """Everything the TrainJob depends on; the launcher fills it from the pipeline parameters."""

    name: str
    namespace: str
    image: str
    config_file: str  # on the checkpoint volume: written by the launcher before the job starts
    run_dir: str  # on the checkpoint volume: every node sees the same directory
    num_nodes: int
    gpus_per_node: int
    checkpoint_pvc: str
    model_cache_pvc: str
    node_selector: dict[str, str] = field(default_factory=dict)
    cpu_per_node: str = "8"
    memory_per_node: str = "32Gi"
    grace_s: int = 45
    model_cache_uri: str = CACHE_MOUNT  # RT_MODEL_CACHE of the nodes: the mounted cache PVC or an s3:// prefix
    s3_secret: str = "rewardtune-s3"
    service_account: str = "rewardtune-pipeline"
    runtime: str = RUNTIME_NAME
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (RFC1035.match(self.name) and len(self.name) <= 63):
            raise RewardtuneError(f"trainjob: name '{self.name}' is not an RFC 1035 label of at most 63 characters")
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise RewardtuneError(
                f"trainjob: num_nodes={self.num_nodes} and gpus_per_node={self.gpus_per_node} must both be >= 1"
            )


def torchrun_command(config_file: str, run_dir: str, grace_s: int) -> list[str]:
    """torchrun takes nnodes / nproc-per-node / node-rank / master address and port from the PET_* variables
    the torch plugin injects; the static rendezvous on node 0 needs nothing else. No elastic restarts: a failed
    worker fails the job, and the relaunched job resumes from the newest checkpoint."""
    return [
        "torchrun", "--max-restarts", "0", "-m", "rewardtune.cli", "train", "--config", config_file, "--out", run_dir,
        "--resume", "--set", f"checkpointing.termination_grace_s={grace_s}",
    ]


def build_trainjob(req: TrainJobRequest) -> dict[str, Any]:
    """The TrainJob manifest: the shipped TrainingRuntime plus this run's image, command, sizes and volumes."""
    shutdown_s, pod_grace_s = shutdown_timings(req.grace_s)
    env = [
        {"name": "RT_MODEL_CACHE", "value": req.model_cache_uri},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(shutdown_s)},
        *({"name": key, "valueFrom": {"secretKeyRef": {"name": req.s3_secret, "key": key, "optional": True}}}
          for key in S3_KEYS),
    ]
    resources = {
        "limits": {GPU_RESOURCE: str(req.gpus_per_node), "memory": req.memory_per_node},
        "requests": {GPU_RESOURCE: str(req.gpus_per_node), "cpu": req.cpu_per_node, "memory": req.memory_per_node},
    }
    pod_patch = {
        "serviceAccountName": req.service_account,
        "terminationGracePeriodSeconds": pod_grace_s,
        "nodeSelector": dict(req.node_selector),
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": req.checkpoint_pvc}},
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": req.model_cache_pvc, "readOnly": True}},
        ],
        "containers": [{
            "name": NODE,
            "volumeMounts": [
                {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
                {"name": "model-cache", "mountPath": CACHE_MOUNT, "readOnly": True},
            ],
        }],
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": req.name, "namespace": req.namespace,
                     "labels": {"app.kubernetes.io/part-of": "rewardtune", **req.labels}},
        "spec": {
            "runtimeRef": {"name": req.runtime, "apiGroup": GROUP, "kind": "TrainingRuntime"},
            "trainer": {
                "image": req.image,
                "command": torchrun_command(req.config_file, req.run_dir, req.grace_s),
                "env": env,
                "numNodes": req.num_nodes,
                "numProcPerNode": req.gpus_per_node,
                "resourcesPerNode": resources,
            },
            "runtimePatches": [{
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                    {"name": NODE, "template": {"spec": {"template": {"spec": pod_patch}}}},
                ]}}},
            }],
        },
    }


def job_state(obj: dict[str, Any]) -> tuple[str, str]:
    """('Complete' | 'Failed' | 'Suspended' | 'Running', message) from status.conditions (True ones only)."""
    conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
    for state in ("Failed", "Complete", "Suspended"):
        if state in conditions:
            return state, conditions[state].get("message") or conditions[state].get("reason") or ""
    return "Running", ""


def progress_line(obj: dict[str, Any]) -> str:
    """One log line from status.jobsStatus and trainerStatus: what an operator watching the launcher wants."""
    status = obj.get("status") or {}
    jobs = ", ".join(
        f"{j.get('name')}: active {j.get('active', 0)} ready {j.get('ready', 0)} succeeded {j.get('succeeded', 0)} "
        f"failed {j.get('failed', 0)}" for j in status.get("jobsStatus") or []
    ) or "no pods yet"
    trainer = status.get("trainerStatus") or {}
    pct = f", {trainer['progressPercentage']}%" if "progressPercentage" in trainer else ""
    return f"trainjob {obj['metadata']['name']}: {job_state(obj)[0]} ({jobs}{pct})"


def _status_code(err: Exception) -> int | None:
    return getattr(err, "status", None)


def _wait_deleted(api: Any, namespace: str, name: str, poll_s: float, sleep: Callable[[float], None]) -> None:
    for _ in range(600):
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as err:  # noqa: BLE001 - a 404 from the kubernetes client is the expected end
            if _status_code(err) == 404:
                return
            raise
        sleep(poll_s)
    raise RewardtuneError(f"trainjob {namespace}/{name} was not deleted after {600 * poll_s:.0f} s")


def ensure_trainjob(api: Any, body: dict[str, Any], *, poll_s: float = 5.0,
                    sleep: Callable[[float], None] = time.sleep) -> str:
    """Create the TrainJob; on 409 re-attach to the existing one, unless it Failed: then delete and recreate it.

    Returns what happened: 'created', 'attached', 'recreated' or 'complete' (already finished, nothing to do).
    """
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        log.info("trainjob %s/%s created", namespace, name)
        return "created"
    except Exception as err:  # noqa: BLE001 - kubernetes.client.ApiException; only 409 is handled
        if _status_code(err) != 409:
            raise
    existing = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    state, message = job_state(existing)
    if state == "Complete":
        log.info("trainjob %s/%s already complete", namespace, name)
        return "complete"
    if state != "Failed":
        log.info("trainjob %s/%s exists (%s): re-attaching", namespace, name, state)
        return "attached"
    log.warning("trainjob %s/%s failed before (%s): deleting and recreating it; training resumes from the newest "
                "checkpoint", namespace, name, message)
    api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                        body={"propagationPolicy": "Foreground"})
    _wait_deleted(api, namespace, name, poll_s, sleep)
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return "recreated"


def wait_trainjob(api: Any, namespace: str, name: str, *, poll_s: float = 30.0, timeout_s: float = 14 * 86400,
                  sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> dict:
    """Poll until Complete (returns the object) or Failed (raises with the condition's message); logs progress
    whenever it changes."""
    start, last = clock(), None
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        line = progress_line(obj)
        if line != last:
            log.info("%s", line)
            last = line
        state, message = job_state(obj)
        if state == "Complete":
            return obj
        if state == "Failed":
            raise RewardtuneError(f"trainjob {namespace}/{name} failed: {message or 'no message'}; a retry of this "
                                  "step recreates it and resumes from the newest checkpoint")
        if clock() - start > timeout_s:
            raise RewardtuneError(f"trainjob {namespace}/{name} did not finish within {timeout_s:.0f} s")
        sleep(poll_s)
