"""Supervised autoencoder with bi-level ℓ1,∞ feature selection (arXiv 2407.16293): projection of W1, masked
retraining, the synthetic omics data, and the same pipeline under DeepSpeed (CPU accelerator, bf16; ZeRO-1 in one
process, ZeRO-3 on two ranks) where the fp32 master weights are projected."""

from __future__ import annotations

import pytest
import torch

from pflow_dist.data.omics import load_sklearn, make_omics
from pflow_dist.kernels.projection.naive import naive_bilevel_project, naive_mixed_norm
from pflow_dist.models.sae import (
    PlainStepper,
    SAEConfig,
    SupervisedAutoencoder,
    feature_mask,
    fit_sae,
    project_first_layer_,
    sae_loss,
    train_epochs,
)
from pflow_dist.ops.projection import bilevel_project
from pflow_dist.testing import assert_close, run_distributed


def test_omics_generator_is_deterministic_and_informative():
    a = make_omics(240, 90, 6, n_classes=3, seed=3)
    b = make_omics(240, 90, 6, n_classes=3, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.informative, b.informative)
    assert a.x_train.shape == (180, 90) and a.x_test.shape == (60, 90) and a.n_classes == 3
    assert torch.allclose(a.x_train.mean(0), torch.zeros(90), atol=1e-5)
    # class separation (between-class variance of the class means) is larger on informative features
    means = torch.stack([a.x_train[a.y_train == c].mean(0) for c in range(3)])
    spread = means.var(0)
    noise = torch.ones(90, dtype=torch.bool)
    noise[a.informative] = False
    assert spread[a.informative].mean() > 5 * spread[noise].mean()
    with pytest.raises(ValueError, match="n_informative"):
        make_omics(100, 10, 11)


def test_load_sklearn_optional():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="scikit-learn"):
            load_sklearn("breast_cancer")
    else:
        d = load_sklearn("breast_cancer")
        assert d.n_features == 30 and d.n_classes == 2 and d.informative is None
    with pytest.raises(ValueError, match="must be one of"):
        load_sklearn("mnist")


def test_sae_on_a_scikit_learn_data_set():
    pytest.importorskip("sklearn", reason="scikit-learn is in the dev extra; without it load_sklearn raises (above)")
    data = load_sklearn("breast_cancer", seed=0)  # 569 samples, 30 features, shipped inside the wheel
    cfg = SAEConfig(hidden=16, epochs=8, retrain_epochs=8, eta_frac=0.1, batch_size=32)
    dense, proj = fit_sae(data, cfg, project=False), fit_sae(data, cfg, project=True)
    assert dense.features_kept == 1.0 and 0 < proj.features_kept < 1.0
    assert dense.accuracy > 0.9 and proj.accuracy > 0.85  # the classes are 63% / 37%


def test_project_first_layer_matches_bilevel_reference():
    torch.manual_seed(0)
    m = SupervisedAutoencoder(23, 3, hidden=9)
    w0 = m.first_layer.weight.detach().clone()
    total = naive_mixed_norm(w0.double(), ("l1", "linf"), ((1,), (0,)))
    kept, eta = project_first_layer_(m, eta_frac=0.2)
    assert eta == pytest.approx(0.2 * total, rel=1e-6)
    w = m.first_layer.weight.detach()
    assert_close("W1", naive_bilevel_project(w0.double(), eta, "linf", (0,)), w, 1e-6)
    assert torch.equal(kept, feature_mask(w)) and 0 < int(kept.sum()) < 23
    assert naive_mixed_norm(w.double(), ("l1", "linf"), ((1,), (0,))) <= eta * (1 + 1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        project_first_layer_(m)


def test_sae_loss_backward_reaches_every_parameter():
    torch.manual_seed(1)
    m = SupervisedAutoencoder(7, 2, hidden=5)
    x, y = torch.randn(6, 7), torch.randint(0, 2, (6,))
    logits, recon = m(x)
    sae_loss(logits, recon, x, y, 0.5).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_double_descent_selects_features_and_keeps_mask():
    data = make_omics(400, 60, 6, seed=0, effect=1.2)
    cfg = SAEConfig(hidden=16, epochs=6, retrain_epochs=6, eta_frac=0.05, batch_size=32)
    dense = fit_sae(data, cfg, project=False)
    proj = fit_sae(data, cfg, project=True)
    assert dense.features_kept == 1.0 and dense.eta is None
    assert 0 < proj.features_kept < 0.9
    assert proj.accuracy > 0.8 and dense.accuracy > 0.7  # 2 classes: chance is 0.5
    assert proj.informative_recall >= 0.5  # the projection keeps the features that carry the class
    assert proj.informative_precision > 6 / 60  # better than a random subset
    assert proj.losses[-1] < proj.losses[0]


def test_masked_retraining_keeps_removed_features_at_zero():
    data = make_omics(200, 30, 4, seed=2)
    cfg = SAEConfig(hidden=8, epochs=2, retrain_epochs=3, batch_size=16)
    torch.manual_seed(0)
    model = SupervisedAutoencoder(30, 2, cfg.hidden)
    stepper = PlainStepper(model, cfg.lr)
    gen = torch.Generator().manual_seed(0)
    train_epochs(stepper, data, cfg, 2, gen)
    kept, _ = project_first_layer_(model, eta_frac=0.1)
    before = model.first_layer.weight.detach().clone()
    train_epochs(stepper, data, cfg, 3, gen, kept)
    w = model.first_layer.weight.detach()
    assert bool((w[:, ~kept] == 0).all())
    assert not torch.equal(w[:, kept], before[:, kept])  # the kept features were retrained


def _full_lp(w: torch.Tensor) -> torch.Tensor:
    """The full 16-bit parameter (gathered under ZeRO-3; a collective there)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([w]):
        return w.detach().clone()


def _deepspeed_sae(rank: int, world_size: int, stage: int = 1, persistence_threshold: int | None = None) -> dict:
    """One rank: SAE under DeepSpeed (bf16 params, fp32 master, ZeRO ``stage``) on the CPU accelerator."""
    import os

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from pflow_dist.models.sae import DeepSpeedStepper, accuracy, get_master_weight

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))  # what a launcher sets
    deepspeed.init_distributed(dist_backend="gloo")
    data = make_omics(256, 40, 4, seed=1, effect=1.5)
    cfg = SAEConfig(hidden=12, epochs=3, retrain_epochs=3, batch_size=16, lr=3e-3)
    torch.manual_seed(0)
    model = SupervisedAutoencoder(40, 2, cfg.hidden)
    ds_cfg = {"train_micro_batch_size_per_gpu": cfg.batch_size, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage}}
    if persistence_threshold is not None:  # ZeRO-3 keeps parameters below this many entries gathered between steps
        ds_cfg["zero_optimization"]["stage3_param_persistence_threshold"] = persistence_threshold
    stepper = DeepSpeedStepper(model, cfg.lr, ds_cfg)
    gen = torch.Generator().manual_seed(0)
    train_epochs(stepper, data, cfg, cfg.epochs, gen)
    w = stepper.module.first_layer.weight
    master0 = safe_get_full_fp32_param(w).clone()
    kept, eta = project_first_layer_(stepper.module, eta_frac=0.1)
    master1 = get_master_weight(w).clone()
    lp1 = _full_lp(w)
    train_epochs(stepper, data, cfg, cfg.retrain_epochs, gen, kept)
    master2 = get_master_weight(w).clone()
    return {"param_dtype": str(w.dtype), "master0": master0, "master1": master1, "lp1": lp1, "master2": master2,
            "lp2": _full_lp(w), "kept": kept, "eta": eta, "partitioned": hasattr(w, "ds_id"),
            "acc": accuracy(stepper.module, data.x_test, data.y_test)}


def _check_deepspeed_run(out: dict) -> None:
    assert out["param_dtype"] == "torch.bfloat16" and out["master1"].dtype == torch.float32
    ref = naive_bilevel_project(out["master0"].double(), out["eta"], "linf", (0,))
    assert_close("fp32 master after projection", ref, out["master1"], 1e-6)
    assert torch.equal(out["lp1"], out["master1"].to(torch.bfloat16))  # the bf16 copy follows the master
    kept = out["kept"]
    assert 0 < int(kept.sum()) < 40 and torch.equal(kept, feature_mask(out["master1"]))
    for name in ("master2", "lp2"):  # masked retraining: removed features stay 0 in both copies
        assert bool((out[name][:, ~kept] == 0).all()), name
    assert not torch.equal(out["master2"][:, kept], out["master1"][:, kept])
    assert out["acc"] > 0.6


@pytest.mark.slow
@pytest.mark.dist
def test_deepspeed_projects_fp32_master_weights():
    _check_deepspeed_run(run_distributed(_deepspeed_sae, 1, timeout_s=300)[0])


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("persistence_threshold", [0, 10**5], ids=["released", "resident"])
def test_deepspeed_zero3_projects_partitioned_master_like_one_process(persistence_threshold):
    """ZeRO-3 on 2 ranks: W1 [12, 40] is cut into two flat halves (column groups span both); the projection of the
    partitions equals, bitwise, the single-process projection of the full fp32 master. W1 (480 entries) is either
    released between uses or, under the default persistence threshold, kept gathered (its full copy must follow)."""
    outs = run_distributed(_deepspeed_sae, 2, 3, persistence_threshold, timeout_s=300)
    for out in outs:
        assert out["partitioned"]
        _check_deepspeed_run(out)
        one_process = bilevel_project(out["master0"], out["eta"], "linf", (0,))
        assert torch.equal(out["master1"], one_process)
    a, b = outs
    assert a["eta"] == b["eta"] and torch.equal(a["kept"], b["kept"]) and torch.equal(a["master2"], b["master2"])
