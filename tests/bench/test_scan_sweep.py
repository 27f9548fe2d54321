"""The diagonal-scan tile sweep (pflow_dist.bench.scan_sweep): through the Triton interpreter on CPU, natively on
CUDA."""

from __future__ import annotations

import pytest

from pflow_dist.bench import scan_sweep
from pflow_dist.testing import kernel_device

DEV = kernel_device()  # CUDA natively, else CPU through the Triton interpreter


def test_sweep_rows_check_every_configuration_against_three_pass():
    grid = lambda B, N: [dict(algorithm="lookback", block_n=4, block_t=8, num_warps=4),  # noqa: E731
                         dict(algorithm="loop", block_n=4, block_t=8, num_warps=2),
                         dict(algorithm="lookback", block_n=4, block_t=3, num_warps=4)]  # not a power of two
    rows = list(scan_sweep.sweep([(2, 40, 6)], DEV, warmup=0, rep=1, grid=grid))
    assert [r["algorithm"] for r in rows] == ["lookback", "loop", "lookback"]
    for r in rows[:2]:  # 5 tiles per sequence, 2 channel groups: the look-back and the carried loop state
        assert r["case"] == "B2-T40-N6" and r["ms"] > 0 and r["err"] < 1e-6 and "error" not in r
    assert "ms" not in rows[2] and rows[2]["error"]


def test_default_grid_and_cli(tmp_path, capsys):
    kinds = {c["algorithm"] for c in scan_sweep.configs(16, 256)}
    assert kinds == {"lookback", "loop", "chunk", "auto"}
    assert "loop" not in {c["algorithm"] for c in scan_sweep.configs(1, 256)}  # 8-16 programs cannot fill a GPU
    with pytest.raises(SystemExit):
        scan_sweep.main(["--case", "1,2"])
    assert "a case is B,T,N" in capsys.readouterr().err


def test_wide_grid_runs_wide_rows_and_checks_them():
    grid = list(scan_sweep.wide_configs(1, 64))
    assert {c["block_n"] for c in grid if "block_n" in c} == {64}  # rows never wider than the channels
    assert {c["window"] for c in grid if "window" in c} == {2, 16}
    wide = [c for c in grid if c.get("block_n") == 64 and c["num_warps"] == 2 and c["block_t"] == 64]
    # 3 tiles of 64 steps x 64 channels (the last one partial): the look-back over 64-channel state words
    rows = list(scan_sweep.sweep([(1, 150, 64)], DEV, warmup=0, rep=1, grid=lambda B, N: wide))
    assert len(rows) == 2 and all(r["err"] < 1e-6 and "error" not in r for r in rows)


@pytest.mark.parametrize("adjoint", [False, True], ids=["forward", "adjoint"])
def test_channel_major_sweep_forward_and_adjoint(adjoint):
    """``--grid cm`` runs on ``[B, N, T]``-stored inputs, and ``--adjoint`` times the backward kernel (λ and da both
    checked against the three-pass adjoint of ``[B, T, N]`` memory): 5 tiles per sequence, loop and look-back."""
    grid = lambda B, N: [dict(algorithm="lookback", block_n=2, block_t=8, num_warps=2),  # noqa: E731
                         dict(algorithm="loop", block_n=1, block_t=8, num_warps=2)]
    rows = list(scan_sweep.sweep([(2, 40, 3)], DEV, warmup=0, rep=1, grid=grid, channel_major=True,
                                 adjoint=adjoint))
    assert len(rows) == 2
    for r in rows:
        assert r["layout"] == "BNT" and r.get("kernel") == ("adjoint" if adjoint else None)
        assert "error" not in r and r["err"] < 1e-6 and r["ms"] > 0
    assert {c["algorithm"] for c in scan_sweep.cm_configs(16, 256)} == {"lookback", "loop", "auto"}
