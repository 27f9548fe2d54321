"""One local Ray instance for the whole session (4 logical CPUs, no dashboard). No ``__init__.py`` in this folder on
purpose: a package named ``ray`` under tests/ would shadow the real Ray."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A running local Ray (``ray.init(num_cpus=4, include_dashboard=False)``), shut down at the end."""
    ray = pytest.importorskip("ray")
    from pflow_dist.ray.projection_tree import connect

    connect(num_cpus=4, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()
