# The multi-level projection of Perez & Barlaud (arXiv 2405.02086, §2.2) on a tree of Ray actors.
#
# The tensor never moves: each shard actor owns a slice of x along ``shard_dim`` (a set of sub-trees) and runs the
# upward pass on it; only the values at the level that holds ``shard_dim`` travel to the root actor:
#   case A, shard_dim in the root block (sub-trees aligned with actors): each actor sends its slice of the root
#           vector A[0]; the root concatenates them, computes τ and sends back one float64 scalar;
#   case B, shard_dim in a lower block c (groups cut by the shards, e.g. a row-sharded W with column groups):
#           each actor sends partial group norms of level c (max for ℓ∞, Σ x² for ℓ2); the root combines them
#           (max / sum), finishes the upward pass, solves the root and runs the downward pass to level c-1, and sends
#           back the radii of level c's groups (and their norms, for ℓ2).
# The actors then run the rest of the downward pass locally, in place. Every step is the code of the single-process
# projection (pflow_dist/ops/projection_tree.py) on the same values in the same order, so with ℓ∞ levels (max is
# exact) the result is bit-identical to `multilevel_project`; sums (ℓ1, ℓ2) at a level cut by the shards are
# combined from partial sums and agree to rounding only. A cut ℓ1 level would need a per-group distributed threshold
# and is refused. The root solves τ once and broadcasts it (research/projection.md §6.3: no ulp drift across actors).
# The driver only chains ObjectRefs (upward → root → downward) and waits once per projection.
"""Multi-level projection of a tensor sharded over Ray actors; ``connect`` to a local or existing Ray cluster."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from pflow_dist.kernels.common.checks import check_tensor
from pflow_dist.kernels.projection.shapes import ProjectionTree, bilevel_tree, check_radius, make_tree
from pflow_dist.ops import projection_tree as _t

__all__ = ["ProjectionActorTree", "RootWorker", "ShardWorker", "connect"]


def _resolve_auto() -> str | None:
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    current = Path("/tmp/ray/ray_current_cluster")
    return current.read_text().strip() or None if current.exists() else None


def connect(address: str | None = None, *, timeout_s: float = 5.0, **init_kwargs: Any) -> None:
    """Start or join Ray, failing fast (no hang) when nothing listens at ``address``.

    Args:
        address: ``None`` or ``"local"``: start a local instance (``ray.init()``); ``"auto"``: the cluster of
            ``RAY_ADDRESS`` or of ``ray start`` on this node; ``"host:port"`` (GCS) or ``"ray://host:port"``
            (Ray Client): an existing cluster.
        timeout_s: how long to wait for a TCP connection to ``address`` before giving up.
        init_kwargs: passed to ``ray.init`` (e.g. ``num_cpus=4, include_dashboard=False``).

    Raises:
        ConnectionError: no Ray cluster answers at ``address`` (ray.init itself would retry for minutes).

    Example:
        >>> connect(num_cpus=4, include_dashboard=False)  # doctest: +SKIP
    """
    if ray.is_initialized():
        return
    if address in (None, "local"):
        ray.init(**init_kwargs)
        return
    target = _resolve_auto() if address == "auto" else address
    if target is None:
        raise ConnectionError("address='auto' but no Ray cluster runs here (RAY_ADDRESS unset, no `ray start`); "
                              "use address=None for a local instance")
    hostport = target.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be 'host:port' or 'ray://host:port', got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster at {target!r}: cannot connect to {host}:{port} within {timeout_s} s "
                              f"({e}); start one with `ray start --head` or pass address=None") from e
    ray.init(address=target, **init_kwargs)


def _cut_level(tree: ProjectionTree, shard_dim: int) -> int:
    c = tree.level_of_dim(shard_dim)
    if c > 0 and tree.norms[c] == "l1":
        raise ValueError(f"shard_dim={shard_dim} cuts the groups of an ℓ1 level (level {c}); shard along a dim of "
                         f"the root block {tree.blocks[0]} or of an ℓ∞/ℓ2 level")
    return c


class ShardWorker:
    """The body of a shard actor: owns ``shard`` (a slice of x along ``shard_dim``) and runs its sub-trees."""

    def __init__(self, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.x: torch.Tensor | None = None
        self._A: list[torch.Tensor | None] | None = None

    def load(self, shard: torch.Tensor, tree: ProjectionTree, shard_dim: int, method: str = "sort") -> int:
        """Take ownership of ``shard`` and of its sub-trees; returns its number of entries."""
        self.tree, self.shard_dim, self.method = tree, shard_dim, method
        self.cut = _cut_level(tree, shard_dim)
        self.x = shard.contiguous()
        self._A = None
        return self.x.numel()

    def upward(self) -> torch.Tensor:
        """Local upward pass; returns this shard's root values (case A) or partial norms of the cut level (case B)."""
        A = _t.upward(self.x, self.tree, stop=self.cut)
        self._A = A
        if self.cut == 0:
            return A[0]
        a, norm, dims = A[self.cut], self.tree.norms[self.cut], self.tree.blocks[self.cut]
        if norm == "linf":
            return _t.group_norm(a, "linf", dims)
        return a.to(_t.acc_dtype(a.dtype, "l2")).square().sum(dims, keepdim=True)  # ℓ2: partial Σ x²

    def downward(self, msg: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None) -> int:
        """Apply the root's answer (``None``: inside the ball) and finish the downward pass in place.

        Returns:
            The number of entries of this shard.
        """
        A, tree = self._A, self.tree
        if A is None:
            raise RuntimeError("downward() before upward()")
        self._A = None
        if msg is None:
            return self.x.numel()
        k = tree.depth
        if self.cut == 0:
            R, start = _t.root_radii(A[0], msg), 1
        else:
            r, n = msg
            c = self.cut
            R = _t.level_project(A[c], r, n, tree.norms[c], tree.blocks[c], leaf=c == k - 1, method=self.method,
                                 out=self.x if c == k - 1 else None)
            start = c + 1
        for i in range(start, k):
            leaf = i == k - 1
            R = _t.level_project(A[i], R, A[i - 1], tree.norms[i], tree.blocks[i], leaf=leaf, method=self.method,
                                 out=self.x if leaf else None)
        return self.x.numel()

    def get(self) -> torch.Tensor:
        """This shard's current values."""
        return self.x

    def set(self, shard: torch.Tensor) -> None:
        """Replace this shard's values (same shape)."""
        if shard.shape != self.x.shape:
            raise ValueError(f"shard must keep shape {tuple(self.x.shape)}, got {tuple(shard.shape)}")
        self.x = shard.contiguous()


class RootWorker:
    """The body of the root actor: combines the shards' messages, solves the ℓ1 root, answers each shard."""

    def load(self, tree: ProjectionTree, shard_dim: int, method: str = "sort") -> None:
        """Set the tree this root serves."""
        self.tree, self.shard_dim, self.method = tree, shard_dim, method
        self.cut = _cut_level(tree, shard_dim)

    def solve(self, eta: float, *parts: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Root step. Returns ``None`` (inside the ball), τ (case A) or ``(radii, norms)`` of the cut level (case B).

        Raises:
            ValueError: the shards' norms are not finite (NaN/Inf in x).
        """
        tree, c = self.tree, self.cut
        if c == 0:
            a0 = torch.cat(parts, dim=self.shard_dim)
            if self._inside(a0, eta):
                return None
            return _t.root_threshold(a0, eta, self.method)
        if tree.norms[c] == "linf":
            combined = torch.stack(parts).amax(0)
        else:
            combined = torch.stack(parts).sum(0).sqrt_()
        A: list[torch.Tensor | None] = [None] * c
        A[c - 1] = combined
        for i in range(c - 1, 0, -1):
            A[i - 1] = _t.group_norm(A[i], tree.norms[i], tree.blocks[i])
        if self._inside(A[0], eta):
            return None
        R = _t.root_radii(A[0], _t.root_threshold(A[0], eta, self.method))
        for i in range(1, c):
            R = _t.level_project(A[i], R, A[i - 1], tree.norms[i], tree.blocks[i], leaf=False, method=self.method)
        return R, combined

    @staticmethod
    def _inside(a0: torch.Tensor, eta: float) -> bool:
        total = a0.sum(dtype=torch.float64).item()
        if not math.isfinite(total):
            raise ValueError("x must be finite: NaN or Inf found in the shards' group norms")
        return total <= eta


class ProjectionActorTree:
    """A tensor sharded over Ray actors, projected in place by the multi-level projection.

    The actors (``num_actors`` shard actors and one root actor) live as long as this object; :meth:`load` hands them
    a new tensor or tree, so one pool serves every layer of a model.

    Args:
        num_actors: number of shard actors.
        num_cpus: CPUs reserved per shard actor; the root actor reserves none.
        torch_threads: intra-op threads in each shard actor (Ray's default is 1).

    Example:
        >>> connect(num_cpus=4, include_dashboard=False)  # doctest: +SKIP
        >>> W = torch.randn(1000, 800, dtype=torch.float64)
        >>> pool = ProjectionActorTree(num_actors=4)  # doctest: +SKIP
        >>> pool.load_bilevel(W, reduce_dims=(0,), shard_dim=1).project(5.0)  # doctest: +SKIP
        >>> torch.equal(pool.gather(), bilevel_project(W, 5.0, method="sort"))  # doctest: +SKIP
        True
    """

    def __init__(self, num_actors: int = 2, *, num_cpus: float = 1, torch_threads: int | None = None) -> None:
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call pflow_dist.ray.projection_tree.connect() first")
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        shard_cls = ray.remote(num_cpus=num_cpus)(ShardWorker)
        self.actors = [shard_cls.remote(torch_threads) for _ in range(num_actors)]
        self.root = ray.remote(num_cpus=0)(RootWorker).remote()
        self.tree: ProjectionTree | None = None
        self.active: list[Any] = []

    def load(
        self,
        x: torch.Tensor | Sequence[Any],
        norms: Sequence[object] = ("l1", "linf"),
        blocks: Sequence[int | Sequence[int]] | None = None,
        *,
        shard_dim: int = 0,
        method: str = "sort",
    ) -> ProjectionActorTree:
        """Scatter ``x`` over the actors and set the tree of norms.

        Args:
            x: a tensor (split along ``shard_dim`` with ``torch.tensor_split`` into ``min(num_actors, size)``
                slices), or a sequence of slices (tensors or ObjectRefs, in order along ``shard_dim``, at most one per
                actor) that were produced elsewhere.
            norms, blocks: the tree of norms (see :func:`~pflow_dist.ops.projection.multilevel_project`).
            shard_dim: the dim along which actors own slices.
            method: ℓ1 threshold method of the root and of ℓ1 levels (``"sort"`` does not depend on the order of
                the root vector).

        Returns:
            ``self`` (for chaining).

        Raises:
            ValueError: bad tree, ``shard_dim`` cuts an ℓ1 level, more slices than actors.
        """
        if isinstance(x, torch.Tensor):
            check_tensor("x", x)
            ndim = x.dim()
            shard_dim = shard_dim % max(ndim, 1)
            n = min(len(self.actors), max(1, x.shape[shard_dim]))
            # clone: pickling a view would ship its whole storage to every actor
            shards: list[Any] = [s.clone(memory_format=torch.contiguous_format)
                                 for s in torch.tensor_split(x, n, dim=shard_dim)]
        else:
            shards = list(x)
            if not 1 <= len(shards) <= len(self.actors):
                raise ValueError(f"need 1..{len(self.actors)} slices (one per actor), got {len(shards)}")
            first = ray.get(shards[0]) if isinstance(shards[0], ray.ObjectRef) else shards[0]
            ndim = first.dim()
            shard_dim = shard_dim % max(ndim, 1)
        tree = make_tree(ndim, norms, blocks)
        _cut_level(tree, shard_dim)
        self.tree, self.shard_dim = tree, shard_dim
        self.active = self.actors[: len(shards)]
        ray.get([a.load.remote(s, tree, shard_dim, method) for a, s in zip(self.active, shards, strict=True)]
                + [self.root.load.remote(tree, shard_dim, method)])
        return self

    def load_bilevel(self, x: torch.Tensor, inner: str = "linf", reduce_dims: int | Sequence[int] | None = None,
                     **kwargs: Any) -> ProjectionActorTree:
        """:meth:`load` with a bi-level tree (conventions of :func:`~pflow_dist.ops.projection.bilevel_project`)."""
        t = bilevel_tree(x.dim(), inner, reduce_dims)
        return self.load(x, t.norms, t.blocks, **kwargs)

    def project(self, eta: float, timeout_s: float | None = None) -> None:
        """Project the sharded tensor onto the ball of radius ``eta``, in place in the actors.

        Raises:
            ValueError: bad ``eta``, or non-finite values (found by the root actor, re-raised here).
            ray.exceptions.GetTimeoutError: not done within ``timeout_s``.
        """
        eta = check_radius(eta)
        if self.tree is None:
            raise RuntimeError("nothing loaded: call load() first")
        parts = [a.upward.remote() for a in self.active]
        msg = self.root.solve.remote(eta, *parts)
        done = [a.downward.remote(msg) for a in self.active]
        try:
            ray.get(done, timeout=timeout_s)
        except ray.exceptions.RayTaskError as e:
            for ref in done:  # collect the sibling failures too (else Ray logs them as unhandled)
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError:
                    pass
            cause = e.as_instanceof_cause()
            if isinstance(cause, ValueError):
                raise ValueError(str(cause).strip().splitlines()[-1]) from None
            raise

    def gather(self) -> torch.Tensor:
        """The whole tensor, concatenated on the driver (for checks and small tensors)."""
        return torch.cat(ray.get([a.get.remote() for a in self.active]), dim=self.shard_dim)

    def close(self) -> None:
        """Kill the actors."""
        for a in [*self.actors, self.root]:
            ray.kill(a)
        self.actors, self.active = [], []
