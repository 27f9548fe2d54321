# The supervised autoencoder (SAE) sparsified by the bi-level ℓ1,∞ projection (Barlaud, Perez & Marmorat,
# arXiv 2407.16293; Perez & Barlaud, arXiv 2405.02086; the authors' "netBio" in SAE-Supervised-Autoencoder-Omics).
#
# Encoder Linear(F→h) → SiLU → Linear(h→K) whose output is the class logits (the latent space is the classes);
# decoder Linear(K→h) → SiLU → Linear(h→F). Loss = CrossEntropy(logits, y) + λ · SmoothL1(x̂, x).
# "Double descent" (the authors' two training phases, not the statistical curve):
#   1. train; 2. project the first encoder weight W1 [h, F] onto the bi-level ℓ1,∞ ball with column groups
#   (reduce over dim 0: one group per input feature); a column clipped to 0 removes that feature; 3. mask: the
#   dead columns stay 0 (gradients masked and weights re-zeroed after every step); 4. retrain.
# Under DeepSpeed with bf16 the optimizer owns fp32 master weights and overwrites the bf16 parameters from them at each
# step: the projection runs on the fp32 master (safe_get/set_full_fp32_param) and the same values are copied into the
# bf16 parameter, else the next forward would use unprojected weights and the next step would resurrect them. Under
# ZeRO-3 the ℓ1,∞ projection and the mask run on each rank's partitions with one all-reduce of the column maxima
# (sae_zero3.py), bitwise the projection of the full matrix; ℓ1/ℓ2 inner norms gather the full master instead.
"""Supervised autoencoder with bi-level ℓ1,∞ feature selection (train, project, mask, retrain), plain or DeepSpeed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.omics import OmicsData
from ..ops.projection import bilevel_project, mixed_norm
from .sae_zero3 import is_zero3, mask_partitioned_, project_partitioned_

__all__ = ["DeepSpeedStepper", "PlainStepper", "SAEConfig", "SAEResult", "SupervisedAutoencoder", "accuracy",
           "apply_mask_", "compare_projection", "feature_mask", "fit_sae", "get_master_weight",
           "project_first_layer_", "sae_loss", "set_master_weight_", "train_epochs"]


class SupervisedAutoencoder(nn.Module):
    """The authors' netBio: the encoder's output is the class logits, the decoder reconstructs the input.

    Args:
        n_features: F, input features.
        n_classes: K, classes (= latent size).
        hidden: h, hidden width of encoder and decoder (the authors use 100 or 300).

    Example:
        >>> m = SupervisedAutoencoder(20, 3, hidden=8)
        >>> logits, recon = m(torch.randn(5, 20))
        >>> logits.shape, recon.shape
        (torch.Size([5, 3]), torch.Size([5, 20]))
    """

    def __init__(self, n_features: int, n_classes: int, hidden: int = 100) -> None:
        super().__init__()
        if min(n_features, n_classes, hidden) < 1:
            raise ValueError(f"sizes must be >= 1, got n_features={n_features}, n_classes={n_classes}, "
                             f"hidden={hidden}")
        self.encoder = nn.Sequential(nn.Linear(n_features, hidden), nn.SiLU(), nn.Linear(hidden, n_classes))
        self.decoder = nn.Sequential(nn.Linear(n_classes, hidden), nn.SiLU(), nn.Linear(hidden, n_features))

    @property
    def first_layer(self) -> nn.Linear:
        """The layer whose columns (input features) the projection selects."""
        return self.encoder[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, F]`` -> ``(logits [B, K], reconstruction [B, F])``."""
        z = self.encoder(x)
        return z, self.decoder(z)


def sae_loss(logits: torch.Tensor, recon: torch.Tensor, x: torch.Tensor, y: torch.Tensor, recon_weight: float
             ) -> torch.Tensor:
    """CrossEntropy(logits, y) + recon_weight · SmoothL1(recon, x), both averaged over the batch (in float32)."""
    return F.cross_entropy(logits.float(), y) + recon_weight * F.smooth_l1_loss(recon.float(), x.float())


# ---------------------------------------------------------------- master weights (plain torch or DeepSpeed)


def get_master_weight(param: torch.Tensor) -> torch.Tensor:
    """The fp32 master copy of ``param`` under DeepSpeed (ZeRO 1–3 / bf16 optimizer), else ``param`` itself."""
    with contextlib.suppress(ImportError):
        from deepspeed.utils import safe_get_full_fp32_param

        if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
            full = safe_get_full_fp32_param(param)
            if full is not None:
                return full
    return param.data


def set_master_weight_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` into the master copy of ``param`` and into ``param`` itself (its low-precision copy)."""
    with torch.no_grad():
        if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(param, value)
            if hasattr(param, "ds_id"):  # ZeRO-3: the bf16 parameter is partitioned too
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.data.copy_(value.to(param.dtype))
                return
        if value.data_ptr() != param.data.data_ptr():
            param.data.copy_(value.to(param.dtype))


def feature_mask(weight: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """Features (columns of ``weight [h, F]``) whose largest |w| exceeds ``tol``: a bool ``[F]``."""
    return weight.detach().abs().amax(0) > tol


def project_first_layer_(model: SupervisedAutoencoder, eta: float | None = None, *, eta_frac: float | None = None,
                         inner: str = "linf") -> tuple[torch.Tensor, float]:
    """Project the first encoder weight (its fp32 master under DeepSpeed) onto the bi-level ℓ1,``inner`` ball of
    column groups, in place.

    Args:
        model: the SAE (or a DeepSpeed engine's ``module``).
        eta: the radius; or ``eta_frac``: the radius as a fraction of the current ``‖W1‖_{1,inner}``.
        inner: the group norm (``"linf"``: the paper's BP^{1,∞}).

    Returns:
        ``(kept, eta)``: the bool ``[F]`` mask of surviving features and the radius used.
    """
    if (eta is None) == (eta_frac is None):
        raise ValueError("give exactly one of eta and eta_frac")
    w = model.first_layer.weight
    if is_zero3(w) and inner == "linf":  # partitioned: no gather, one all-reduce of the column maxima
        return project_partitioned_(w, eta, eta_frac=eta_frac, reduce_dim=0)
    master = get_master_weight(w).float()
    if eta is None:
        eta = float(eta_frac) * float(mixed_norm(master, ("l1", inner), ((1,), (0,))))
    projected = bilevel_project(master, eta, inner, (0,))
    set_master_weight_(w, projected)
    return feature_mask(projected), float(eta)


def apply_mask_(model: SupervisedAutoencoder, kept: torch.Tensor) -> None:
    """Zero the first-layer columns of removed features, in the master copy and the parameter."""
    w = model.first_layer.weight
    if is_zero3(w):
        mask_partitioned_(w, kept, reduce_dim=0)
        return
    master = get_master_weight(w)
    set_master_weight_(w, master * kept.to(master.dtype))


# ---------------------------------------------------------------- training


class PlainStepper:
    """One-process training: torch Adam on the model's parameters."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        self.module = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def forward(self, x: torch.Tensor):
        return self.module(x)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class DeepSpeedStepper:
    """Training through a DeepSpeed engine (ZeRO stage and bf16 from ``config``; torch Adam as client optimizer,
    which runs on DeepSpeed's CPU accelerator too). The process group must exist or be creatable
    (``deepspeed.init_distributed``)."""

    def __init__(self, model: nn.Module, lr: float, config: dict[str, Any]) -> None:
        import deepspeed

        cfg = {"zero_allow_untested_optimizer": True, **config}
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
        self.module = self.engine.module
        self.dtype = next(self.module.parameters()).dtype

    def forward(self, x: torch.Tensor):
        return self.engine(x.to(self.dtype))

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> float:
    """Fraction of correctly classified samples (argmax of the logits)."""
    dtype = next(model.parameters()).dtype
    correct = 0
    for i in range(0, x.shape[0], batch):
        logits, _ = model(x[i:i + batch].to(dtype))
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, x.shape[0])


@dataclass(frozen=True)
class SAEConfig:
    """Hyper-parameters of :func:`fit_sae` (defaults: the authors' architecture; epochs and batch scaled to the
    synthetic data).

    Attributes:
        hidden: hidden width.
        recon_weight: λ of the reconstruction term.
        lr: Adam learning rate.
        batch_size: mini-batch size.
        epochs: descent 1 (before the projection).
        retrain_epochs: descent 2 (after projection and mask).
        eta: absolute radius of the ℓ1,∞ ball of W1; or eta_frac: the radius relative to ``‖W1‖_{1,∞}`` after
            descent 1 (used when ``eta`` is None).
        inner: group norm of the bi-level projection.
        seed: initialisation and shuffling seed.
    """

    hidden: int = 100
    recon_weight: float = 0.1
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 20
    retrain_epochs: int = 20
    eta: float | None = None
    eta_frac: float = 0.1
    inner: str = "linf"
    seed: int = 0


@dataclass
class SAEResult:
    """What :func:`fit_sae` measured.

    Attributes:
        projected: whether the projection/mask/retrain path ran (False: the same epochs without projection).
        accuracy: test accuracy at the end.
        accuracy_before_projection: test accuracy after descent 1.
        accuracy_after_projection: test accuracy right after the projection (before retraining).
        features_kept: fraction of input features whose column in W1 is not all zero.
        kept: indices of the kept features.
        eta: radius used (None without projection).
        informative_recall: fraction of the truly informative features that are kept (synthetic data only).
        informative_precision: fraction of the kept features that are truly informative (synthetic data only).
        losses: mean training loss per epoch.
    """

    projected: bool
    accuracy: float
    accuracy_before_projection: float
    accuracy_after_projection: float | None
    features_kept: float
    kept: torch.Tensor
    eta: float | None
    informative_recall: float | None
    informative_precision: float | None
    losses: list[float] = field(default_factory=list)


def train_epochs(stepper, data: OmicsData, cfg: SAEConfig, n: int, gen: torch.Generator,
                 kept: torch.Tensor | None = None, losses: list[float] | None = None) -> list[float]:
    """Run ``n`` epochs of mini-batch training; with ``kept``, removed features stay exactly 0 (masked gradients,
    weights re-zeroed after each step). Appends the mean loss of each epoch to ``losses`` and returns it."""
    losses = [] if losses is None else losses
    x, y = data.x_train, data.y_train
    model = stepper.module
    hook = None
    if kept is not None:  # masked features get no gradient; apply_mask_ below also undoes momentum-driven drift
        mask = kept.to(model.first_layer.weight.dtype)
        hook = model.first_layer.weight.register_hook(lambda g: g * mask)
    try:
        for _ in range(n):
            perm = torch.randperm(x.shape[0], generator=gen)
            total, count = 0.0, 0
            for i in range(0, x.shape[0], cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                xb, yb = x[idx], y[idx]
                logits, recon = stepper.forward(xb)
                loss = sae_loss(logits, recon, xb, yb, cfg.recon_weight)
                stepper.step(loss)
                if kept is not None:
                    apply_mask_(model, kept)
                total += float(loss.detach()) * idx.numel()
                count += idx.numel()
            losses.append(total / count)
    finally:
        if hook is not None:
            hook.remove()
    return losses


def fit_sae(
    data: OmicsData,
    cfg: SAEConfig = SAEConfig(),
    *,
    project: bool = True,
    make_stepper: Callable[[nn.Module], Any] | None = None,
) -> SAEResult:
    """Train the SAE with the authors' double descent: train, project W1 (bi-level ℓ1,∞, column groups), mask, retrain.

    Args:
        data: the split data (e.g. :func:`~pflow_dist.data.omics.make_omics`).
        cfg: hyper-parameters.
        project: False trains the same number of epochs without projection (the dense baseline).
        make_stepper: builds the training engine from the model (default :class:`PlainStepper`; pass
            ``lambda m: DeepSpeedStepper(m, cfg.lr, ds_config)`` for DeepSpeed).

    Returns:
        :class:`SAEResult`.

    Example:
        >>> from pflow_dist.data.omics import make_omics
        >>> r = fit_sae(make_omics(200, 50, 5), SAEConfig(hidden=16, epochs=3, retrain_epochs=3))
        >>> 0 < r.features_kept <= 1
        True
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = SupervisedAutoencoder(data.n_features, data.n_classes, cfg.hidden)
    stepper = make_stepper(model) if make_stepper is not None else PlainStepper(model, cfg.lr)
    model = stepper.module
    losses: list[float] = []
    train_epochs(stepper, data, cfg, cfg.epochs, gen, None, losses)
    acc_before = accuracy(model, data.x_test, data.y_test)
    acc_proj, eta, kept_mask = None, None, None
    if project:
        kept_mask, eta = project_first_layer_(model, cfg.eta, eta_frac=None if cfg.eta is not None else cfg.eta_frac,
                                              inner=cfg.inner)
        acc_proj = accuracy(model, data.x_test, data.y_test)
    train_epochs(stepper, data, cfg, cfg.retrain_epochs, gen, kept_mask, losses)
    kept_final = feature_mask(get_master_weight(model.first_layer.weight))
    kept = kept_final.nonzero().squeeze(1)
    recall = precision = None
    if data.informative is not None:
        hit = torch.isin(data.informative, kept).sum().item()
        recall = hit / data.informative.numel()
        precision = hit / max(1, kept.numel())
    return SAEResult(project, accuracy(model, data.x_test, data.y_test), acc_before, acc_proj,
                     kept.numel() / data.n_features, kept, eta, recall, precision, losses)


def compare_projection(data: OmicsData, cfg: SAEConfig = SAEConfig()) -> dict[str, SAEResult]:
    """The dense baseline and the projected SAE on the same data and seed: ``{"dense": ..., "projected": ...}``."""
    return {"dense": fit_sae(data, cfg, project=False), "projected": fit_sae(data, cfg, project=True)}


def main(argv: list[str] | None = None) -> None:
    """``python -m pflow_dist.models.sae``: dense vs projected SAE on synthetic omics data (or a scikit-learn set);
    prints one JSON line per (radius, variant)."""
    import argparse
    import json
    import time

    from ..data.omics import load_sklearn, make_omics

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--features", type=int, default=1000)
    p.add_argument("--informative", type=int, default=16)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--sklearn", default=None, help="use this scikit-learn data set instead (if installed)")
    p.add_argument("--eta-frac", type=float, action="append", default=None)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--retrain-epochs", type=int, default=20)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    data = (load_sklearn(a.sklearn, seed=a.seed) if a.sklearn else
            make_omics(a.samples, a.features, a.informative, a.classes, seed=a.seed))
    fracs = a.eta_frac or [0.02, 0.05, 0.1]
    for i, frac in enumerate(fracs):
        cfg = SAEConfig(hidden=a.hidden, epochs=a.epochs, retrain_epochs=a.retrain_epochs, eta_frac=frac, seed=a.seed)
        variants = [True] if i else [False, True]  # the dense baseline does not depend on the radius
        for project in variants:
            t0 = time.perf_counter()
            r = fit_sae(data, cfg, project=project)
            print(json.dumps({
                "data": data.name, "variant": "projected" if project else "dense",
                "eta_frac": frac if project else None, "eta": r.eta, "accuracy": r.accuracy,
                "accuracy_before_projection": r.accuracy_before_projection,
                "accuracy_after_projection": r.accuracy_after_projection, "features_kept": r.features_kept,
                "n_kept": int(r.kept.numel()), "informative_recall": r.informative_recall,
                "informative_precision": r.informative_precision, "seconds": round(time.perf_counter() - t0, 2),
                "epochs": [cfg.epochs, cfg.retrain_epochs], "seed": cfg.seed}), flush=True)


if __name__ == "__main__":
    main()
