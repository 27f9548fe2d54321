"""FlowLM under sequence parallelism on 2 and 3 real gloo processes equals the single-process model on the whole
sequence: logits, the loss (a mean over the scored tokens of all ranks, with ignored labels), and every parameter
gradient summed over the group; T not divisible by P, shards shorter than the conv halo (the halo spans two ranks),
short conv on and off, gated and not, rank 1 and rank 2 (sum and product forms), the hybrid with attention layers.
Float64, tight tolerance.

Every rank builds the same model and batch from one seed, runs the single-process reference on the whole sequence,
then the model on its shard with ``sp_group``, and returns its errors; the test asserts on all ranks' errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pflow_dist.dist import shard_bounds
from pflow_dist.models.flow_lm import FlowLM, FlowLMConfig
from pflow_dist.testing import error_stats, run_distributed

pytestmark = pytest.mark.dist

BASE = dict(vocab_size=11, d_model=12, n_layers=2, n_heads=2, chunk_size=4, backend="torch")
CASES = {
    "rank1-conv": dict(rank=1, T=23),
    "rank2-conv-gated": dict(rank=2, use_gate=True, T=23),
    "rank2-product-noconv": dict(rank=2, rank_form="product", use_short_conv=False, T=14),
    "rank2-conv-gated-tiny-shards": dict(rank=2, use_gate=True, conv_size=4, T=5),  # P=3: shards 2, 2, 1
    "hybrid-rank2": dict(rank=2, use_gate=True, attn_every=2, attn_window=5, attn_n_global=2, T=19),
}
TOL = 1e-11


def _worker(rank, world, names):
    out = {}
    group = dist.group.WORLD
    for name in names:
        spec = dict(CASES[name])
        T = spec.pop("T")
        torch.manual_seed(7)
        model = FlowLM(FlowLMConfig(**BASE, **spec)).double()
        gen = torch.Generator().manual_seed(3)
        B = 2
        ids = torch.randint(0, BASE["vocab_size"], (B, T), generator=gen)
        labels = torch.randint(0, BASE["vocab_size"], (B, T), generator=gen)
        labels[0, :3] = -100  # ignored positions (on the first rank's shard: uneven token counts per rank)
        labels[1, T // 2] = -100
        up = torch.randn(B, T, BASE["vocab_size"], generator=gen, dtype=torch.float64) * 1e-2

        logits = model(ids)
        loss = FlowLM.loss(logits, labels)
        (loss + (logits * up).sum()).backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)

        a, b = shard_bounds(T, world)[rank]
        logits_p = model(ids[:, a:b], sp_group=group)
        loss_p = FlowLM.loss(logits_p, labels[:, a:b], sp_group=group)
        (loss_p + (logits_p * up[:, a:b]).sum()).backward()
        err = {"logits": error_stats(logits[:, a:b], logits_p).rms_ratio,
               "loss": abs(float(loss) - float(loss_p)) / abs(float(loss))}
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g, group=group)  # sequence-parallel gradient reduction: the sum over the group
            err["d" + n] = error_stats(ref[n], g).rms_ratio
        out[name] = err
    return out


@pytest.mark.parametrize("world,names", [
    (2, ["rank1-conv", "rank2-conv-gated", "rank2-product-noconv", "hybrid-rank2"]),
    (3, ["rank2-conv-gated", "rank2-conv-gated-tiny-shards", "hybrid-rank2"]),
], ids=["P2", "P3"])
def test_flow_lm_sequence_parallel_equals_single_process(world: int, names: list[str]) -> None:
    res = run_distributed(_worker, world, names, timeout_s=300)
    for rank, per_case in enumerate(res):
        for name in names:
            err = per_case[name]
            assert len(err) > 10, err  # every parameter was compared
            bad = {k: v for k, v in err.items() if not v < TOL}  # `not <` also catches NaN
            assert not bad, f"rank {rank} of {world}, {name}: {bad}"
