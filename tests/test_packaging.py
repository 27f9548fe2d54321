"""pyproject lists packages by hand (kernels/ is mapped to pflow_dist.kernels): every package folder must be listed,
so a wheel install (not only an editable one) contains all the code; and pytest must collect every test folder."""

from fnmatch import fnmatch
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(cfg["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("pflow_dist", "pflow_dist"), ("kernels", "pflow_dist.kernels"), ("launch", "pflow_dist.launch")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but missing: {sorted(listed - found)}"


def test_every_test_folder_is_collected():
    """pytest does not enter folders matching ``norecursedirs``; its default list holds "dist", which kept tests/dist
    out of every run of the README's test command until pyproject set the list without it."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = cfg["tool"]["pytest"]["ini_options"]["norecursedirs"]
    folders = [d for d in (ROOT / "tests").rglob("*") if d.is_dir() and d.name != "__pycache__"]
    assert any(d.name == "dist" for d in folders)
    skipped = [str(d.relative_to(ROOT)) for d in folders if any(fnmatch(d.name, p) for p in patterns)]
    assert not skipped, f"pytest would not collect {skipped} (norecursedirs {patterns})"


def test_kernels_namespace_is_ours():
    import pflow_dist.kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
