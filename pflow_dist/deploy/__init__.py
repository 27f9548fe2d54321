"""Kubernetes deployment helpers: render the kustomizations in k8s/ without a cluster, and validate every manifest
offline (core kinds against the Kubernetes OpenAPI schemas, KubeRay's RayJob against our own JSON schema)."""

from .kustomize import render
from .validate import project_checks, validate_manifests

__all__ = ["project_checks", "render", "validate_manifests"]
