"""Offline validation of the rendered manifests: schemas first, then the project's rules.

Core kinds are checked with ``kubernetes-validate`` (strict: unknown fields fail) against the Kubernetes OpenAPI
schemas. KubeRay's ``RayJob`` is a CRD those schemas do not cover: it is checked against
``schemas/rayjob.schema.json``, and its embedded pod templates are checked as core ``PodTemplate`` objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

__all__ = ["pod_specs", "project_checks", "validate_manifests"]

K8S_VERSION = "1.32.0"
_CRD_SCHEMAS = {("ray.io/v1", "RayJob"): "rayjob.schema.json"}


def _name(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """``(where, replicas, pod template)`` for every pod template of a Job or a RayJob (replicas as written)."""
    if doc.get("kind") == "Job":
        spec = doc["spec"]
        yield _name(doc), spec.get("parallelism", spec.get("completions", 1)), spec["template"]
    elif doc.get("kind") == "RayJob":
        cluster = doc["spec"]["rayClusterSpec"]
        yield f"{_name(doc)} head", 1, cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{_name(doc)} group {group['groupName']}", group.get("replicas", 0), group["template"]


def validate_manifests(docs: list[dict[str, Any]], k8s_version: str = K8S_VERSION) -> list[str]:
    """Schema errors of every manifest (an empty list means all are valid)."""
    import jsonschema
    import kubernetes_validate

    errors = []

    def core(obj: dict[str, Any], where: str) -> None:
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {str(e).splitlines()[0]} at {'/'.join(str(p) for p in e.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{where}: no schema for {obj.get('apiVersion')} {obj.get('kind')}")

    for doc in docs:
        crd = _CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        if crd is None:
            core(doc, _name(doc))
            continue
        schema = json.loads(resources.files("pflow_dist.deploy").joinpath("schemas", crd).read_text())
        for err in jsonschema.Draft202012Validator(schema).iter_errors(doc):
            errors.append(f"{_name(doc)}: {err.message} at {'/'.join(str(p) for p in err.path)}")
        for where, _, template in pod_specs(doc):
            core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template},
                 where)
    return errors


def _gpus(container: dict[str, Any]) -> int:
    return int((container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))


def project_checks(docs: list[dict[str, Any]], expected_gpus: int | None = None) -> list[str]:
    """pflow_dist's deployment rules; returns the violations (an empty list means all hold).

    Rules: one image everywhere; pods run as non-root, no privileged container, no privilege escalation; CPU and
    memory limits on every container; GPU requests equal limits; GPU pods mount a memory-backed /dev/shm, the config
    ConfigMap at /etc/pflow and the checkpoint PVC at /checkpoints; the total GPU count equals ``expected_gpus``; a
    DeepSpeed Job's launcher flags agree with its replicas and GPUs.
    """
    problems: list[str] = []
    images: set[str] = set()
    total_gpus = 0
    for doc in docs:
        for where, replicas, template in pod_specs(doc):
            replicas = int(replicas)
            spec = template["spec"]
            if not (spec.get("securityContext") or {}).get("runAsNonRoot"):
                problems.append(f"{where}: pod must set securityContext.runAsNonRoot: true")
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for c in spec.get("containers", []):
                cw = f"{where} container {c['name']}"
                images.add(c.get("image", ""))
                sc = c.get("securityContext") or {}
                if sc.get("privileged") or sc.get("allowPrivilegeEscalation", True):
                    problems.append(f"{cw}: must not be privileged and must set allowPrivilegeEscalation: false")
                limits = (c.get("resources") or {}).get("limits") or {}
                if "cpu" not in limits or "memory" not in limits:
                    problems.append(f"{cw}: needs cpu and memory limits")
                gpus = _gpus(c)
                req = (c.get("resources") or {}).get("requests") or {}
                if gpus and int(req.get("nvidia.com/gpu", gpus)) != gpus:
                    problems.append(f"{cw}: nvidia.com/gpu requests must equal limits")
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                if gpus:
                    shm = volumes.get(mounts.get("/dev/shm", ""), {}).get("emptyDir") or {}
                    if shm.get("medium") != "Memory":
                        problems.append(f"{cw}: GPU pods need /dev/shm as an emptyDir with medium: Memory")
                for path, kind in (("/etc/pflow", "configMap"), ("/checkpoints", "persistentVolumeClaim")):
                    if kind not in volumes.get(mounts.get(path, ""), {}):
                        problems.append(f"{cw}: needs the {kind} volume mounted at {path}")
                total_gpus += replicas * gpus
                args = " ".join(c.get("command", []) + c.get("args", []))
                if "deepspeed" in args:
                    nodes = re.search(r"--num_nodes[= ](\d+)", args)
                    per = re.search(r"--num_gpus[= ](\d+)", args)
                    if not nodes or int(nodes.group(1)) != replicas:
                        problems.append(f"{cw}: deepspeed --num_nodes must equal the {replicas} replicas")
                    if not per or int(per.group(1)) != gpus:
                        problems.append(f"{cw}: deepspeed --num_gpus must equal the {gpus} GPUs of the pod")
    if len(images) > 1:
        problems.append(f"all containers must run one image, found {sorted(images)}")
    if expected_gpus is not None and total_gpus != expected_gpus:
        problems.append(f"the manifests request {total_gpus} GPUs, the training config expects {expected_gpus}")
    return problems
