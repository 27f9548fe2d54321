"""The projection tree on real Ray actors (arXiv 2405.02086 §2.2): the sharded result must be bit-identical to the
single-process projection wherever the cut level is ℓ∞ or the shards hold whole sub-trees."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from pflow_dist.kernels.projection.naive import naive_mixed_norm
from pflow_dist.ops.projection import bilevel_project, multilevel_project
from pflow_dist.testing import assert_close

F64 = torch.float64


@pytest.fixture(scope="module")
def pool(ray_local):
    from pflow_dist.ray.projection_tree import ProjectionActorTree

    p = ProjectionActorTree(num_actors=3)
    yield p
    p.close()


def _x(shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64)
    x.view(-1)[::7] *= 10  # uneven group norms
    return x.to(dtype)


@pytest.mark.parametrize("inner", ["linf", "l1", "l2"])
def test_bilevel_groups_on_actors_bitwise(pool, inner):
    """Case A: whole groups (columns) per actor; only the root vector travels, τ comes back."""
    x = _x((30, 41))
    total = naive_mixed_norm(x, ("l1", inner), ((1,), (0,)))
    for frac in (0.0, 0.05, 0.4):
        pool.load_bilevel(x, inner, (0,), shard_dim=1).project(frac * total)
        assert torch.equal(pool.gather(), bilevel_project(x, frac * total, inner, (0,), method="sort")), frac


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_bilevel_groups_cut_by_shards(pool, dtype):
    """Case B: a row-sharded W with column groups; partial maxima are combined by max: still bit-identical."""
    x = _x((31, 20), seed=1, dtype=dtype)
    eta = 0.1 * naive_mixed_norm(x.double(), ("l1", "linf"), ((1,), (0,)))
    pool.load_bilevel(x, "linf", (0,), shard_dim=0).project(eta)
    assert torch.equal(pool.gather(), bilevel_project(x, eta, "linf", (0,), method="sort"))
    # ℓ2 groups cut by the shards: partial Σx² are added, equal to rounding
    pool.load_bilevel(x, "l2", (0,), shard_dim=0).project(eta)
    assert_close("l2 cut", bilevel_project(x.double(), eta, "l2", (0,)), pool.gather(),
                 1e-14 if dtype == F64 else 1e-6)


@pytest.mark.parametrize(("norms", "blocks", "shard_dim"), [
    (("l1", "linf", "linf"), None, 0),
    (("l1", "linf", "linf"), None, 1),
    (("l1", "linf", "l2"), ((1,), (0,), (2,)), 0),
    (("l1", "l2", "l1"), None, 0),
    (("l1", "l1", "linf"), ((2,), (0,), (1,)), 1),
], ids=["inf-inf-root", "inf-inf-mid", "inf-l2-mid", "l2-l1-root", "l1-inf-leaf"])
def test_multilevel_subtrees_bitwise(pool, norms, blocks, shard_dim):
    x = _x((7, 6, 9), seed=2)
    eta = 0.2 * naive_mixed_norm(x, norms, blocks)
    pool.load(x, norms, blocks, shard_dim=shard_dim).project(eta)
    assert torch.equal(pool.gather(), multilevel_project(x, eta, norms, blocks, method="sort"))


def test_uneven_shards_from_refs(pool, ray_local):
    """Slices built elsewhere (ObjectRefs), with uneven boundaries that cut through the groups."""
    x = _x((40, 13), seed=3)
    cuts = [0, 3, 29, 40]
    refs = [ray_local.put(x[a:b].clone()) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    eta = 0.3 * naive_mixed_norm(x, ("l1", "linf"), ((1,), (0,)))
    pool.load(refs, ("l1", "linf"), ((1,), (0,)), shard_dim=0).project(eta)
    assert torch.equal(pool.gather(), bilevel_project(x, eta, method="sort"))


def test_edge_cases_and_errors(pool):
    x = _x((12, 10), seed=4)
    total = float(naive_mixed_norm(x, ("l1", "linf"), ((1,), (0,))))
    pool.load_bilevel(x, "linf", (0,), shard_dim=1).project(total * 2)
    assert torch.equal(pool.gather(), x)
    pool.project(0.0)
    assert torch.equal(pool.gather(), torch.zeros_like(x))
    y = x.clone()
    y[5, 2] = float("nan")
    pool.load_bilevel(y, "linf", (0,), shard_dim=0)
    with pytest.raises(ValueError, match="finite"):
        pool.project(1.0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        pool.project(-1.0)
    with pytest.raises(ValueError, match="cuts the groups of an ℓ1 level"):
        pool.load_bilevel(x, "l1", (0,), shard_dim=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connect_fails_fast_without_cluster():
    """Nothing listens at the address: a clear ConnectionError within the timeout (ray.init would retry for
    minutes). Run in a fresh interpreter: this session's Ray is already initialised."""
    code = textwrap.dedent(f"""
        import time
        from pflow_dist.ray.projection_tree import connect
        t0 = time.perf_counter()
        try:
            connect("127.0.0.1:{_free_port()}", timeout_s=2)
        except ConnectionError as e:
            print("ConnectionError:", e)
        print("SECONDS", time.perf_counter() - t0)
        try:
            connect("not-an-address")
        except ValueError as e:
            print("ValueError:", e)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ConnectionError: no Ray cluster at" in res.stdout, res.stdout + res.stderr
    assert float(res.stdout.split("SECONDS")[1].split()[0]) < 10
    assert "ValueError: address must be 'host:port'" in res.stdout


@pytest.mark.slow
def test_existing_cluster_by_address(ray_local):
    """A second driver joins this session's cluster with ``address=`` and projects there."""
    address = ray_local.get_runtime_context().gcs_address
    code = textwrap.dedent(f"""
        import torch
        from pflow_dist.ray.projection_tree import ProjectionActorTree, connect
        from pflow_dist.ops.projection import bilevel_project
        connect({address!r}, timeout_s=10, log_to_driver=False)
        x = torch.randn(20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        pool = ProjectionActorTree(num_actors=2, num_cpus=0).load_bilevel(x, "linf", (0,), shard_dim=1)
        pool.project(3.0)
        print("EQUAL", torch.equal(pool.gather(), bilevel_project(x, 3.0, method="sort")))
        pool.close()
    """)
    env = {**os.environ, "RAY_ADDRESS": ""}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert "EQUAL True" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
