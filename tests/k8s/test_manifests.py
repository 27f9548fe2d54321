"""k8s/ renders (our kustomize subset, checked against `kubectl kustomize` where kubectl is installed), every manifest
validates offline (core kinds against the Kubernetes schemas, RayJob against ours, its pod templates as PodTemplates),
and the project rules hold: one image, non-root, no privilege, limits, /dev/shm, config and checkpoint volumes, and GPU
counts that match the training config. Each rule is also shown to fire on a broken manifest."""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pflow_dist.deploy import project_checks, render, validate_manifests
from pflow_dist.deploy.validate import pod_specs

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = ["rayjob", "deepspeed"]


def expected_gpus() -> int:
    cfg = yaml.safe_load((K8S / "base" / "train.yaml").read_text())
    return cfg["parallel"]["nodes"] * cfg["parallel"]["gpus_per_node"]


def _key(doc):
    return doc["kind"], doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_like_kubectl(overlay):
    docs = render(K8S / "overlays" / overlay)
    assert {d["kind"] for d in docs} >= {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim"}
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: rendered with the built-in subset only")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], check=True, capture_output=True,
                         text=True).stdout
    assert sorted(docs, key=_key) == sorted([d for d in yaml.safe_load_all(out) if d], key=_key)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_schemas_and_project_rules(overlay):
    docs = render(K8S / "overlays" / overlay)
    assert validate_manifests(docs) == []
    assert project_checks(docs, expected_gpus()) == []


def test_deepspeed_hostfile_matches_the_job():
    docs = render(K8S / "overlays" / "deepspeed")
    job = next(d for d in docs if d["kind"] == "Job")
    hostfile = next(d for d in docs if d["metadata"]["name"] == "pflow-hostfile")["data"]["hostfile"].split()
    hosts = [h for h in hostfile if not h.startswith("slots=")]
    slots = {int(h.split("=")[1]) for h in hostfile if h.startswith("slots=")}
    gpus = int(job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert hosts == [f"pflow-{i}.pflow" for i in range(job["spec"]["completions"])] and slots == {gpus}


def test_entrypoints_name_existing_modules():
    for overlay in OVERLAYS:
        for doc in render(K8S / "overlays" / overlay):
            text = doc["spec"].get("entrypoint", "") if doc["kind"] == "RayJob" else ""
            for _, _, template in pod_specs(doc):
                for c in template["spec"]["containers"]:
                    text += " " + " ".join(c.get("command", []) + c.get("args", []))
            for module in re.findall(r"(?:-m|--module) (pflow_dist[\w.]*)", text):
                assert importlib.util.find_spec(module) is not None, f"{overlay}: {module} does not exist"


def _job_docs():
    return render(K8S / "overlays" / "deepspeed")


def _container(docs):
    return next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("breakage, message", [
    (lambda c, s: c["securityContext"].update(privileged=True), "must not be privileged"),
    (lambda c, s: c["resources"]["limits"].pop("memory"), "needs cpu and memory limits"),
    (lambda c, s: c.update(volumeMounts=[m for m in c["volumeMounts"] if m["name"] != "dshm"]), "/dev/shm"),
    (lambda c, s: c["resources"]["limits"].update({"nvidia.com/gpu": "4"}), "requests must equal limits"),
    (lambda c, s: s.pop("securityContext"), "runAsNonRoot"),
    (lambda c, s: c.update(image="other:1"), "one image"),
    (lambda c, s: c.update(args=[c["args"][0].replace("--num_nodes=2", "--num_nodes=3")]), "--num_nodes"),
])
def test_project_rules_fire(breakage, message):
    docs = _job_docs()
    job = next(d for d in docs if d["kind"] == "Job")
    breakage(_container(docs), job["spec"]["template"]["spec"])
    if message == "one image":
        docs.append(copy.deepcopy(render(K8S / "overlays" / "rayjob")[-1]))
    assert any(message in p for p in project_checks(docs, expected_gpus())), project_checks(docs, expected_gpus())


def test_gpu_total_must_match_config():
    assert any("expects 8" in p for p in project_checks(_job_docs(), 8))


def test_schema_errors_are_found():
    docs = _job_docs()
    next(d for d in docs if d["kind"] == "Service")["spec"]["bogus"] = 1
    ray = render(K8S / "overlays" / "rayjob")
    rayjob = next(d for d in ray if d["kind"] == "RayJob")
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    errors = validate_manifests(docs + [rayjob])
    assert any("Service/pflow" in e and "bogus" in e for e in errors)
    assert any("RayJob/pflow-train" in e and "'two' is not of type 'integer'" in e for e in errors)
    assert any("head" in e for e in errors)


def test_renderer_rejects_unsupported_features(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: []\n")
    with pytest.raises(ValueError, match=r"kustomize fields \['patches'\] are not supported"):
        render(tmp_path)
    with pytest.raises(ValueError, match="no kustomization.yaml"):
        render(tmp_path / "missing")


def test_cli_k8s_check():
    from typer.testing import CliRunner

    from pflow_dist.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["k8s-check", str(K8S / "overlays" / "deepspeed"), "--gpus", str(expected_gpus())])
    assert ok.exit_code == 0 and "6 manifests, 0 problem(s)" in ok.output
    bad = runner.invoke(app, ["k8s-check", str(K8S / "overlays" / "rayjob"), "--gpus", "8"])
    assert bad.exit_code == 1 and "request 16 GPUs, the training config expects 8" in bad.output
