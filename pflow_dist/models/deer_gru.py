# A GRU sequence classifier whose recurrences are evaluated by DEER (DESIGN.md §9; DEER's EigenWorms model:
# Lim et al., ICLR 2024, arXiv 2309.12252, experiments/04_rnn_eigenworms: encoder → stacked [LayerNorm → GRU →
# residual] → classifier on the last step). Each layer holds a plain torch.nn.GRU, so the same weights run either
# through pflow_dist.ops.deer.deer_rnn (parallel over T, adjoint gradients) or through the module itself
# (sequential: cuDNN on GPU): the `mode` switch is how tests check that training curves agree.
"""DEER-GRU sequence classifier and a small Adam training loop on the long-memory task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.long_memory import LongMemoryTask, make_long_memory
from ..ops.deer import DEERConvergenceError, deer_rnn

__all__ = ["DEERGRUClassifier", "TrainResult", "train_long_memory"]

MODES = ("deer", "sequential")


class DEERGRUClassifier(nn.Module):
    """Linear encoder → ``n_layers`` × [LayerNorm → GRU → residual] → linear head on the last step.

    Args:
        in_dim: input features I.
        hidden: GRU state size n (= model width).
        n_classes: output classes.
        n_layers: stacked GRU layers.
        mode: ``"deer"`` (parallel Newton, :func:`~pflow_dist.ops.deer.deer_rnn`) or ``"sequential"`` (the
            ``nn.GRU`` module itself).
        method, atol, rtol, max_iter, backend: passed to ``deer_rnn``.
        fallback: when DEER does not converge within ``max_iter``, run that layer with the ``nn.GRU`` module itself
            (exact, sequential; gradients by its own backward) instead of raising
            :class:`~pflow_dist.ops.deer.DEERConvergenceError`; ``last_fallbacks`` counts such layers per forward.
        chrono: when given, the "chrono" initialisation of the update gates for memories up to this many steps
            (Tallec & Ollivier 2018, "Can recurrent neural networks warp time?", arXiv 1804.11188): the bias of
            z (h' = (1 − z) n + z h) is log u with u ~ U(1, chrono − 1), split between bias_ih and bias_hh, so unit
            i starts with a retention time of about 1 + u_i steps instead of ~2.

    Shapes:
        ``x [B, T, I]`` → logits ``[B, n_classes]``.

    Example::

        >>> model = DEERGRUClassifier(in_dim=8, hidden=16, n_classes=4)
        >>> model(torch.randn(2, 100, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_dim: int, hidden: int, n_classes: int, n_layers: int = 1, mode: str = "deer",
                 method: str = "quasi", atol: float | None = None, rtol: float | None = None, max_iter: int = 100,
                 backend: str = "auto", chrono: int | None = None, fallback: bool = False) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if min(in_dim, hidden, n_classes, n_layers) < 1:
            raise ValueError(f"in_dim, hidden, n_classes and n_layers must be >= 1, got {in_dim}, {hidden}, "
                             f"{n_classes}, {n_layers}")
        self.mode = mode
        self.deer_kw = dict(method=method, atol=atol, rtol=rtol, max_iter=max_iter, backend=backend)
        self.fallback = fallback
        self.last_fallbacks = 0
        self.encoder = nn.Linear(in_dim, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(n_layers))
        self.grus = nn.ModuleList(nn.GRU(hidden, hidden, batch_first=True) for _ in range(n_layers))
        self.head = nn.Linear(hidden, n_classes)
        self.last_iterations: list[int] = []
        if chrono is not None:
            if chrono < 3:
                raise ValueError(f"chrono must be >= 3 steps, got {chrono}")
            with torch.no_grad():
                for gru in self.grus:
                    b = torch.log(torch.empty(hidden).uniform_(1.0, chrono - 1.0))
                    gru.bias_ih_l0[hidden:2 * hidden] = b / 2  # gate order r, z, n: z is the second block
                    gru.bias_hh_l0[hidden:2 * hidden] = b / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must have 3 dimensions [B, T, I], got shape {tuple(x.shape)}")
        z = self.encoder(x)
        self.last_iterations, self.last_fallbacks = [], 0
        for norm, gru in zip(self.norms, self.grus):
            u = norm(z)
            if self.mode == "deer":
                try:
                    h, _, info = deer_rnn(gru, u, None, **self.deer_kw)
                    self.last_iterations.append(info.iterations)
                except DEERConvergenceError:
                    if not self.fallback:
                        raise
                    h, _ = gru(u)
                    self.last_iterations.append(self.deer_kw["max_iter"])
                    self.last_fallbacks += 1
            else:
                h, _ = gru(u)
            z = z + h
        return self.head(z[:, -1])


@dataclass
class TrainResult:
    """Per-step training loss and accuracy, DEER iterations per step (per layer), layers that fell back to the
    sequential GRU per step, final eval accuracy."""

    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    iterations: list[list[int]] = field(default_factory=list)
    fallbacks: list[int] = field(default_factory=list)
    eval_accuracy: float | None = None


def train_long_memory(
    model: DEERGRUClassifier,
    task: LongMemoryTask,
    steps: int,
    batch: int,
    lr: float = 3e-3,
    seed: int = 0,
    eval_batch: int = 0,
    device: torch.device | str | None = None,
    on_step: Callable[[int, float, float, list[int]], None] | None = None,
) -> TrainResult:
    """Train ``model`` with Adam on fresh batches of the long-memory task (the same batches for the same seed).

    Args:
        model: the classifier (its mode decides DEER vs sequential).
        task: the task sizes.
        steps, batch, lr: Adam steps, batch size, learning rate.
        seed: the data seed (two models trained with the same seed see the same batches).
        eval_batch: size of a held-out batch scored at the end (0: none).
        device: where to train (the model is moved there).
        on_step: called after every step with ``(step, loss, accuracy, DEER iterations per layer)`` (progress).

    Returns:
        :class:`TrainResult`.
    """
    model.to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    out = TrainResult()
    for _ in range(steps):
        x, y = make_long_memory(task, batch, gen, device)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.losses.append(loss.item())
        out.accuracies.append((logits.argmax(-1) == y).float().mean().item())
        out.iterations.append(list(model.last_iterations))
        out.fallbacks.append(model.last_fallbacks)
        if on_step is not None:
            on_step(len(out.losses), out.losses[-1], out.accuracies[-1], out.iterations[-1])
    if eval_batch:
        x, y = make_long_memory(task, eval_batch, torch.Generator().manual_seed(seed + 10**6), device)
        with torch.no_grad():
            out.eval_accuracy = (model(x).argmax(-1) == y).float().mean().item()
    return out
