"""DEER (pflow_dist.ops.deer) against the sequential float64 GRU (kernels/deer/naive.py, = torch.nn.GRU): values,
final states and every gradient (x, h0, all four GRU weights) for newton, quasi and damped, on the torch path and on
Triton (interpreter on CPU); the analytic GRU Jacobian against torch.func; generic cells through torch.func; a
diverging cell (clear report); named errors."""

from __future__ import annotations

import pytest
import torch

from pflow_dist.kernels.deer.gru import gru_linearize_torch, gru_linearize_triton
from pflow_dist.kernels.deer.naive import GRUWeights, gru_cell, naive_rnn
from pflow_dist.ops.deer import DEERConvergenceError, deer_rnn
from pflow_dist.ops.scan import structured_dense
from pflow_dist.testing import assert_close

F64 = torch.float64


def make_gru(I, n, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.GRU(I, n, batch_first=True).to(dtype)


def sequential_reference(gru, x, h0, g, gT):
    """float64 nn.GRU outputs and gradients w.r.t. (x, h0, weight_ih, weight_hh, bias_ih, bias_hh)."""
    gru64 = torch.nn.GRU(gru.input_size, gru.hidden_size, batch_first=True).double()
    gru64.load_state_dict(gru.state_dict())
    x64 = x.detach().double().requires_grad_()
    h064 = h0.detach().double().requires_grad_()
    h, hT = gru64(x64, h064[None])
    loss = (h * g.double()).sum() + (hT[0] * gT.double()).sum()
    grads = torch.autograd.grad(loss, [x64, h064, *gru64.parameters()])
    return h.detach(), hT[0].detach(), grads


def check_deer_gru(method, backend, B, T, I, n, tol, seed=0, **kw):
    gru = make_gru(I, n, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, I, generator=gen).requires_grad_()
    h0 = torch.randn(B, n, generator=gen).requires_grad_()
    h, hT, info = deer_rnn(gru, x, h0, method, backend=backend, atol=1e-6, rtol=1e-6, **kw)
    assert info.converged and 1 <= info.iterations <= T + 1 and info.resets == 0
    g, gT = torch.randn(B, T, n, generator=gen), torch.randn(B, n, generator=gen)
    grads = torch.autograd.grad((h * g).sum() + (hT * gT).sum(), [x, h0, *gru.parameters()])
    rh, rT, rgrads = sequential_reference(gru, x, h0, g, gT)
    assert_close("h", rh, h, tol)
    assert_close("h_T", rT, hT, tol)
    names = ["dx", "dh0", "dweight_ih", "dweight_hh", "dbias_ih", "dbias_hh"]
    for name, r, out in zip(names, rgrads, grads):
        assert_close(name, r, out, tol)
    return info


@pytest.mark.parametrize("method", ["newton", "quasi", "damped"])
def test_deer_gru_torch(method):
    info = check_deer_gru(method, "torch", B=2, T=63, I=3, n=5, tol=2e-6)
    if method == "newton":  # quadratic convergence: a handful of iterations, far fewer than T
        assert info.iterations <= 8


@pytest.mark.parametrize("method", ["newton", "quasi"])
def test_deer_gru_triton(method):
    """Triton pointwise GRU terms + look-back diagonal scan (quasi) or structured dense scan (newton), adjoint by
    the structured dense reverse scan."""
    check_deer_gru(method, "triton", B=2, T=20, I=3, n=4, tol=2e-6)


def test_deer_gru_long_quasi_and_newton_agree():
    """T = 3000 on the torch path: both methods reach the sequential trajectory; Newton in fewer iterations."""
    gru = make_gru(8, 8, seed=1)
    x = torch.randn(2, 3000, 8)
    with torch.no_grad():
        ref, _ = naive_rnn(lambda h, x_: gru_cell(h, x_, GRUWeights.from_module(gru).to(F64)), x.double(),
                           torch.zeros(2, 8, dtype=F64))
        hn, _, info_n = deer_rnn(gru, x, method="newton")
        hq, _, info_q = deer_rnn(gru, x, method="quasi")
    assert_close("h newton", ref, hn, 1e-5)
    assert_close("h quasi", ref, hq, 1e-4)
    assert info_n.iterations < info_q.iterations


def test_deer_float64_exact():
    gru = make_gru(3, 6, seed=2, dtype=F64)
    x = torch.randn(2, 80, 3, dtype=F64)
    with torch.no_grad():
        h, hT, info = deer_rnn(gru, x, method="newton", atol=1e-13, rtol=0.0)
        ref, refT = gru(x)
    assert_close("h", ref, h, 1e-12)
    assert_close("h_T", refT[0], hT, 1e-12)


def test_deer_T1_and_gru_cell_module():
    cell = torch.nn.GRUCell(3, 4)
    x, h0 = torch.randn(2, 1, 3), torch.randn(2, 4)
    with torch.no_grad():
        h, hT, info = deer_rnn(cell, x, h0)
        ref = cell(x[:, 0], h0)
    assert info.iterations <= 2
    assert_close("h", ref, h[:, 0], 1e-6)
    assert_close("h_T", ref, hT, 1e-6)


@pytest.mark.parametrize("structured", [True, False], ids=["dense", "diag"])
def test_gru_jacobian_matches_autodiff(structured):
    """The analytic GRU Jacobian (structured coefficients, and its diagonal) equals torch.func.jacrev of the cell."""
    n, I, B, T = 5, 3, 2, 7
    w = GRUWeights.from_module(make_gru(I, n, seed=3)).to(F64)
    x, h, h0 = torch.randn(B, T, I, dtype=F64), torch.randn(B, T, n, dtype=F64), torch.randn(B, n, dtype=F64)
    hp = torch.cat([h0[:, None], h[:, :-1]], 1)
    gi = x @ w.weight_ih.T + w.bias_ih
    gh = hp @ w.weight_hh.T + w.bias_hh
    wdiag = torch.diagonal(w.weight_hh.view(3, n, n), dim1=-2, dim2=-1)
    res, out = gru_linearize_torch(gi, gh, h, h0, wdiag, structured)
    J = torch.func.vmap(torch.func.jacrev(lambda h_, x_: gru_cell(h_, x_, w)))(hp.reshape(-1, n), x.reshape(-1, I))
    J = J.reshape(B, T, n, n)
    assert_close("residual", gru_cell(hp, x, w) - h, res, 1e-13)
    if structured:
        assert_close("J", J, structured_dense(out, w.weight_hh.view(3, n, n)), 1e-13)
    else:
        assert_close("diag J", torch.diagonal(J, dim1=-2, dim2=-1), out, 1e-13)


@pytest.mark.parametrize("structured", [True, False], ids=["dense", "diag"])
def test_gru_linearize_triton_matches_torch(structured):
    n, B, T = 6, 2, 9
    gen = torch.Generator().manual_seed(4)
    gi, G = torch.randn(B, T, 3 * n, generator=gen), torch.randn(B, T, 3 * n, generator=gen)
    gh0, bias = torch.randn(B, 3 * n, generator=gen), torch.randn(3 * n, generator=gen)
    h, h0, wdiag = torch.randn(B, T, n, generator=gen), torch.randn(B, n, generator=gen), torch.randn(3, n)
    gh = torch.cat([gh0[:, None], G[:, :-1] + bias], dim=1)  # the Triton kernel shifts G itself
    r1, o1 = gru_linearize_torch(gi, gh, h, h0, wdiag, structured, 0.7)
    r2, o2 = gru_linearize_triton(gi, G, gh0, bias, h, h0, wdiag, structured, 0.7)
    assert_close("residual", r1, r2, 1e-6)
    assert_close("terms", o1, o2, 1e-6)


class TanhCell(torch.nn.Module):
    """A vanilla tanh RNN cell h' = tanh(W [h; x] + b): the generic (torch.func) path."""

    def __init__(self, n, I):
        super().__init__()
        self.lin = torch.nn.Linear(n + I, n)

    def forward(self, h, x):
        return torch.tanh(self.lin(torch.cat([h, x], dim=-1)))


@pytest.mark.parametrize("method", ["newton", "quasi"])
def test_deer_generic_cell(method):
    torch.manual_seed(5)
    n, I, B, T = 4, 3, 2, 40
    cell = TanhCell(n, I)
    x, h0 = torch.randn(B, T, I, requires_grad=True), torch.randn(B, n, requires_grad=True)
    h, hT, info = deer_rnn(cell, x, h0, method, atol=1e-6, rtol=1e-6)
    g = torch.randn(B, T, n)
    params = [x, h0, *cell.parameters()]
    grads = torch.autograd.grad((h * g).sum(), params)
    ref, _ = naive_rnn(cell, x, h0)
    rgrads = torch.autograd.grad((ref * g).sum(), params)
    assert_close("h", ref.detach(), h, 2e-6)
    for name, r, out in zip(["dx", "dh0", "dW", "db"], rgrads, grads):
        assert_close(name, r, out, 2e-6)


def exploding_cell(h, x):
    return 3.0 * h + x  # h_T ≈ 3^T overflows float32 for T ≳ 80


def test_deer_diverging_cell_raises_clear_error():
    x, h0 = torch.randn(1, 200, 2), torch.zeros(1, 2)
    with pytest.raises(DEERConvergenceError, match=r"did not converge in 6 iterations.*NaN/Inf and were reset"):
        deer_rnn(exploding_cell, x, h0, max_iter=6)


def test_deer_not_converged_warns_when_not_strict():
    x, h0 = torch.randn(1, 200, 2), torch.zeros(1, 2)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        h, _, info = deer_rnn(exploding_cell, x, h0, method="quasi", max_iter=3, strict=False)
    assert not info.converged and info.resets >= 1 and info.iterations == 3
    assert torch.isfinite(h).all()  # non-finite values were reset, never returned silently


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("x_2d", ValueError, r"x must have 3 dimensions \[B, T, I\]"),
        ("x_int", TypeError, r"x must have dtype in \(float32, float64\), got int64"),
        ("method", ValueError, r"method must be one of .* got 'gauss'"),
        ("h0_shape", ValueError, r"h0 must have shape \[B, n=4\], got \[2, 3\]"),
        ("input_size", ValueError, r"x must have shape \[B, T, I=3\] for this GRU, got \[2, 5, 2\]"),
        ("no_h0_generic", ValueError, r"h0 is required for a generic cell"),
        ("damping", ValueError, r"damping must be in \[0, 1\), got 1.5"),
        ("two_layers", ValueError, r"only one-layer, unidirectional GRUs"),
        ("not_callable", TypeError, r"cell must be a torch.nn.GRU/GRUCell, GRUWeights or a callable"),
        ("max_iter", ValueError, r"max_iter must be a positive int, got 0"),
        ("T0", ValueError, r"T >= 1"),
    ],
)
def test_deer_errors(case, exc, match):
    cell, x, h0, kw = make_gru(3, 4), torch.randn(2, 5, 3), torch.randn(2, 4), {}
    if case == "x_2d":
        x = x[:, 0]
    elif case == "x_int":
        x = x.long()
    elif case == "method":
        kw["method"] = "gauss"
    elif case == "h0_shape":
        h0 = h0[:, :3]
    elif case == "input_size":
        x = x[..., :2]
    elif case == "no_h0_generic":
        cell, h0 = exploding_cell, None
    elif case == "damping":
        kw["damping"] = 1.5
    elif case == "two_layers":
        cell = torch.nn.GRU(3, 4, num_layers=2, batch_first=True)
    elif case == "not_callable":
        cell = 3
    elif case == "max_iter":
        kw["max_iter"] = 0
    elif case == "T0":
        x = x[:, :0]
    with pytest.raises(exc, match=match):
        deer_rnn(cell, x, h0, **kw)


def test_iterative_adjoint_matches_dense_adjoint():
    """The adjoint used when the dense reverse scan is out of reach (n > 64 on GPU): diagonal reverse scans plus
    off-diagonal GEMMs, iterated, equal the float64 dense adjoint with the structured GRU-form Jacobian."""
    from pflow_dist.ops.deer import _iterative_adjoint
    from pflow_dist.ops.scan import scan_adjoint

    gen = torch.Generator().manual_seed(6)
    B, T, n = 2, 50, 70
    coef = torch.randn(B, T, 4, n, generator=gen) * 0.3
    mats = torch.randn(3, n, n, generator=gen) * (0.3 / n**0.5)
    g = torch.randn(B, T, n, generator=gen)
    lam = _iterative_adjoint(coef, mats, g, "torch")
    ref, _, _ = scan_adjoint(None, g.double(), None, "torch", coef=coef.double(), mats=mats.double())
    assert_close("lambda", ref, lam, 1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy under the interpreter: ∞ − ∞
def test_deer_update_triton_matches_torch():
    """The fused update (h += δ, max violation over finite entries, non-finite count) on both paths."""
    from pflow_dist.kernels.deer.update import deer_update

    gen = torch.Generator().manual_seed(7)
    h, d = torch.randn(3, 5000, generator=gen), torch.randn(3, 5000, generator=gen) * 1e-3
    d[1, 7], d[2, 9] = float("nan"), float("inf")
    h1, h2 = h.clone(), h.clone()
    v1, bad1 = deer_update(h1, d, 1e-4, 1e-3, use_triton=False)
    v2, bad2 = deer_update(h2, d, 1e-4, 1e-3, use_triton=True)
    assert bad1 == bad2 == 2
    assert abs(v1 - v2) <= 1e-7 * max(1.0, abs(v1))
    fin = torch.isfinite(h1)
    assert torch.equal(fin, torch.isfinite(h2)) and torch.allclose(h1[fin], h2[fin])
