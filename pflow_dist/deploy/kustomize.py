"""A small renderer for the subset of kustomize that k8s/ uses, so deployments can be rendered and tested where no
``kubectl`` is installed (the tests compare it with ``kubectl kustomize`` where it is).

Supported: ``resources`` (files and directories holding a kustomization), ``labels`` (pairs, without selectors),
``configMapGenerator`` (files and literals, with ``generatorOptions.disableNameSuffixHash: true``), ``images``
(``newName`` / ``newTag``). Anything else raises ``ValueError`` instead of rendering something different from kustomize.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["render"]

_SUPPORTED = {"apiVersion", "kind", "resources", "labels", "configMapGenerator", "generatorOptions", "images"}


def _load_kustomization(path: Path) -> dict[str, Any]:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        f = path / name
        if f.exists():
            data = yaml.safe_load(f.read_text()) or {}
            unknown = set(data) - _SUPPORTED
            if unknown:
                raise ValueError(f"{f}: kustomize fields {sorted(unknown)} are not supported by this renderer")
            return data
    raise ValueError(f"no kustomization.yaml in {path}")


def _config_maps(k: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    if k.get("configMapGenerator") and not (k.get("generatorOptions") or {}).get("disableNameSuffixHash"):
        raise ValueError(f"{root}: configMapGenerator needs generatorOptions.disableNameSuffixHash: true here")
    out = []
    for gen in k.get("configMapGenerator", []):
        data = {}
        for f in gen.get("files", []):
            key, _, rel = f.partition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (root / (rel or f)).read_text()
        for lit in gen.get("literals", []):
            key, _, value = lit.partition("=")
            data[key] = value
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return out


def _walk_images(obj: Any, images: list[dict[str, str]]) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "image" and isinstance(value, str):
                name = value.split(":")[0]
                for img in images:
                    if img["name"] == name:
                        obj[key] = f"{img.get('newName', name)}:{img['newTag']}" if "newTag" in img else img["newName"]
            else:
                _walk_images(value, images)
    elif isinstance(obj, list):
        for item in obj:
            _walk_images(item, images)


def render(path: str | Path) -> list[dict[str, Any]]:
    """Render the kustomization in ``path`` to a list of manifests (dicts), as ``kubectl kustomize path`` would.

    Raises:
        ValueError: the kustomization uses a feature outside the supported subset, or a file is missing.
    """
    root = Path(path)
    k = _load_kustomization(root)
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        target = (root / res).resolve()
        if target.is_dir():
            docs.extend(render(target))
        elif target.exists():
            docs.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
        else:
            raise ValueError(f"{root}: resource {res} does not exist")
    docs.extend(_config_maps(k, root))
    docs = [copy.deepcopy(d) for d in docs]
    for label in k.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise ValueError(f"{root}: only labels without selectors/templates are supported")
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    _walk_images(docs, k.get("images", []))
    return docs
