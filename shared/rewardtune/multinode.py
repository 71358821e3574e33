"""The multi-node train step: stage the run on the shared checkpoint volume, run it as a TrainJob, publish it.

The launcher pod (CPU image) mounts the checkpoint PVC at the same path the TrainJob's nodes do, so the config
and prompts it writes there are what every node reads, and what the nodes write is what it copies into the
step's output artifact afterwards: the evaluation fan-out sees the same `checkpoints` as after a one-pod run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from rewardtune.checkpoint import write_text_atomic
from rewardtune.errors import RewardtuneError
from rewardtune.stages import TRAIN_FILE, _final_metrics, list_checkpoints, resolve_config
from rewardtune.trainjob import TrainJobRequest, build_trainjob, ensure_trainjob, trainjob_name, wait_trainjob

log = logging.getLogger(__name__)
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def stage_run(config: str, prompts_dir: Path, run_dir: Path, overrides: list[str]) -> Path:
    """Copy train.txt into `run_dir/prompts/` and write the resolved config next to it; returns the config file.

    Idempotent: a retried launcher rewrites the same two files (atomically) before it re-attaches.
    """
    source = Path(prompts_dir) / TRAIN_FILE
    if not source.is_file():
        raise RewardtuneError(f"{source} is missing; run prepare-prompts first and pass its output as the prompts")
    prompts = Path(run_dir) / "prompts" / TRAIN_FILE
    prompts.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(prompts, source.read_text())
    cfg = resolve_config(config, [*overrides, f"prompts.source={prompts}", "prompts.template='{}'"])
    config_file = Path(run_dir) / "config.yaml"
    write_text_atomic(config_file, cfg.to_yaml())
    return config_file


def require_shared_pvc(core_api: Any, namespace: str, claim: str) -> None:
    """Refuse a checkpoint PVC that several nodes cannot mount at once, before any pod is scheduled."""
    modes = core_api.read_namespaced_persistent_volume_claim(claim, namespace).spec.access_modes or []
    if "ReadWriteMany" not in modes:
        raise RewardtuneError(
            f"checkpoint PVC {namespace}/{claim} has access modes {modes}; multi-node training needs ReadWriteMany "
            "(apply the manifests/components/multinode kustomize component, on a storage class that offers it)"
        )


def in_cluster_namespace(path: Path = SA_NAMESPACE_FILE) -> str:
    if not path.is_file():
        raise RewardtuneError(f"{path} is missing: the multi-node launcher must run in a Kubernetes pod")
    return path.read_text().strip()


def launch_for_pipeline(
    config: str, prompts_dir: str | Path, out_dir: str | Path, *, workdir: str, run_id: str, image: str,
    num_nodes: int, gpus_per_node: int, checkpoint_pvc: str, model_cache_pvc: str,
    node_selector: dict[str, str] | None = None, model_cache_uri: str = "", overrides: list[str] | None = None, namespace: str = "",
    custom_api: Any = None, core_api: Any = None, poll_s: float = 30.0,
) -> dict[str, Any]:
    """The multi-node train step; returns what `stages.train_for_pipeline` returns (checkpoints, final metrics)."""
    if not workdir or not run_id:
        raise RewardtuneError("multi-node train: workdir (the checkpoint PVC mount) and run_id are both required")
    if custom_api is None or core_api is None:
        from kubernetes import client
        from kubernetes import config as kube_config

        kube_config.load_incluster_config()
        custom_api, core_api = client.CustomObjectsApi(), client.CoreV1Api()
    namespace = namespace or in_cluster_namespace()
    require_shared_pvc(core_api, namespace, checkpoint_pvc)
    run_dir = Path(workdir) / run_id
    config_file = stage_run(config, Path(prompts_dir), run_dir, overrides or [])
    cfg = resolve_config(str(config_file))
    request = TrainJobRequest(
        name=trainjob_name(run_id), namespace=namespace, image=image, config_file=str(config_file),
        run_dir=str(run_dir), num_nodes=num_nodes, gpus_per_node=gpus_per_node, checkpoint_pvc=checkpoint_pvc,
        model_cache_pvc=model_cache_pvc, node_selector=dict(node_selector or {}),
        **({"model_cache_uri": model_cache_uri} if model_cache_uri else {}),
        grace_s=max(1, int(cfg.checkpointing.termination_grace_s)), labels={"rewardtune.io/run-id": run_id[:63]},
    )
    outcome = ensure_trainjob(custom_api, build_trainjob(request))
    log.info("trainjob %s/%s: %s (%d nodes x %d GPUs)", namespace, request.name, outcome, num_nodes, gpus_per_node)
    if outcome != "complete":
        wait_trainjob(custom_api, namespace, request.name, poll_s=poll_s)
    out_dir = Path(out_dir)
    shutil.copytree(run_dir, out_dir, dirs_exist_ok=True)
    return {"run_dir": str(run_dir), "trainjob": request.name, "checkpoints": list_checkpoints(out_dir),
            "final_metrics": _final_metrics(out_dir)}
