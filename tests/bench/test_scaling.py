"""pflow-dist scale on CPU: real gloo process groups per world size, rows with the scaling metrics, the efficiency
definitions, the Markdown table, the plot, and config validation."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from pflow_dist.bench.harness import read_jsonl
from pflow_dist.bench.scaling import (
    ScaleConfig,
    comm_bytes,
    failure_text,
    find_longest,
    is_out_of_memory,
    longest_search,
    markdown_table,
    op_inputs,
    plot,
    point_line,
    run_scaling,
    run_sweep,
)
from pflow_dist.cli import app
from pflow_dist.testing.distributed import run_distributed

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("mode", ["weak", "strong"])
def test_sweep_rows_and_efficiency(mode, tmp_path):
    cfg = ScaleConfig(mode=mode, world_sizes=(2, 1), tokens=96, heads=2, dim=8, warmup=0, rep=2, chunk_size=16)
    rows = run_scaling(cfg)
    assert [r.extra["world_size"] for r in rows] == [1, 2]
    assert [r.extra["tokens"] for r in rows] == ([96, 192] if mode == "weak" else [96, 96])
    t1, t2 = rows[0].median_ms, rows[1].median_ms
    expected = t1 / t2 if mode == "weak" else t1 / (2 * t2)
    assert rows[0].extra["efficiency"] == pytest.approx(1.0)
    assert rows[1].extra["efficiency"] == pytest.approx(expected)
    assert rows[1].extra["tokens_per_s"] == pytest.approx(rows[1].extra["tokens"] / (t2 / 1e3))
    assert rows[0].extra["comm_bytes"] == 0 < rows[1].extra["comm_bytes"]
    table = markdown_table(rows)
    assert table.count("\n") == 3 and "| ours | 2 |" in table
    assert plot(rows, tmp_path / "p.png").stat().st_size > 1000


def test_sweep_over_sequence_lengths_and_batches(tmp_path):
    # (tokens, batch) pairs, each with its own efficiency baseline; the table and plot show every point
    base = ScaleConfig(mode="strong", world_sizes=(1, 2), heads=1, dim=8, warmup=0, rep=1, chunk_size=16)
    rows = run_sweep(base, tokens=[32, 64], batches=[1, 2])
    assert [(r.extra["config"]["tokens"], r.extra["batch"], r.extra["world_size"]) for r in rows] == [
        (32, 1, 1), (32, 1, 2), (32, 2, 1), (32, 2, 2), (64, 1, 1), (64, 1, 2), (64, 2, 1), (64, 2, 2)]
    assert all(r.status == "ok" for r in rows)
    assert [r.extra["efficiency"] for r in rows[::2]] == [pytest.approx(1.0)] * 4  # each pair's 1-rank point
    for one, two in zip(rows[::2], rows[1::2], strict=True):
        assert two.extra["efficiency"] == pytest.approx(one.median_ms / (2 * two.median_ms))
        tokens = two.extra["batch"] * two.extra["tokens"]
        assert two.extra["tokens_per_s"] == pytest.approx(tokens / two.median_ms * 1e3)
    table = markdown_table(rows)
    assert table.count("\n") == 9 and "| ours | 2 | 64 | 2 |" in table
    assert plot(rows, tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="must be non-empty"):
        run_sweep(base, tokens=[], batches=[1])
    with pytest.raises(ValueError, match="cannot use 2 ranks"):
        run_sweep(base, tokens=[64, 1], batches=[1])


def _count_comm_bytes(rank: int, world: int, cfg: ScaleConfig) -> tuple[int, int | None]:
    """Bytes this rank sends + receives in one sp_flow / sp_scan / sp_deer fwd+bwd, counted at the torch.distributed
    calls (and DEER's Newton iterations)."""
    import torch
    import torch.distributed as dist

    from pflow_dist.dist import sp_deer, sp_flow, sp_scan

    count = [0]
    real_all_gather, real_batch = dist.all_gather, dist.batch_isend_irecv

    def all_gather(tensor_list, tensor, *args, **kwargs):  # ring: P-1 copies of this tensor out, P-1 in
        count[0] += 2 * (len(tensor_list) - 1) * tensor.numel() * tensor.element_size()
        return real_all_gather(tensor_list, tensor, *args, **kwargs)

    def batch_isend_irecv(ops):
        count[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
        return real_batch(ops)

    dist.all_gather, dist.batch_isend_irecv = all_gather, batch_isend_irecv
    B, T, H, D = cfg.batch, 16, cfg.heads, cfg.dim
    gen = torch.Generator().manual_seed(rank)
    iterations = None
    if cfg.op == "deer":
        torch.manual_seed(0)
        gru = torch.nn.GRU(D, D, batch_first=True)
        leaves = [torch.randn(B, T, D, generator=gen, requires_grad=True)]
        o, _, info = sp_deer(gru, leaves[0], method="quasi", group=None)
        iterations = info.iterations
    elif cfg.op == "scan":
        leaves = [torch.rand(B, T, H * D, generator=gen, requires_grad=True),
                  torch.randn(B, T, H * D, generator=gen, requires_grad=True)]
        o = sp_scan(*leaves, group=None)[0]
    else:
        leaves = [torch.randn(B, T, H, D, generator=gen, requires_grad=True) for _ in range(3)]
        leaves.append(torch.rand(B, T, H, generator=gen, requires_grad=True))
        q, k, v, beta = leaves
        o = sp_flow(q, torch.nn.functional.normalize(k, dim=-1), v, beta, group=None, chunk_size=16)[0]
    torch.autograd.grad(o, leaves, torch.ones_like(o))
    return count[0], iterations


@pytest.mark.parametrize("op", ["flow", "scan", "deer"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_comm_bytes_match_the_collectives(world, op):
    # the reported bytes are those the busiest rank moves through the real collectives (gloo: doubling)
    cfg = ScaleConfig(heads=1 if op == "deer" else 2, dim=8, batch=2, op=op)
    counted = run_distributed(_count_comm_bytes, world, cfg)
    iterations = counted[0][1]
    assert max(c for c, _ in counted) == comm_bytes(cfg, world, iterations=iterations) > 0


def test_scan_sweep(tmp_path):
    # the diagonal scan (sp_scan) over heads · dim channels: same metrics, its own case names and comm bytes
    cfg = ScaleConfig(mode="weak", world_sizes=(1, 2), tokens=64, heads=2, dim=8, warmup=0, rep=1, op="scan")
    rows = run_scaling(cfg)
    assert [r.case for r in rows] == ["scan-P1-T64-B1-H2-D8", "scan-P2-T128-B1-H2-D8"]
    assert all(r.status == "ok" for r in rows) and rows[1].shapes == {"a_local": [1, 64, 16]}
    assert rows[1].extra["comm_bytes"] == comm_bytes(cfg, 2) == 2 * (2 * 16 * 4)  # one (M, D) message fwd, one bwd
    assert plot(rows, tmp_path / "p.png").stat().st_size > 1000


def test_longest_search_doubles_then_bisects():
    tried = []

    def runs(T):  # fits up to 300 tokens
        tried.append(T)
        return T <= 300

    assert longest_search(64, 10_000, 16, runs) == 288
    assert tried == [64, 128, 256, 512, 384, 320, 288]  # doubling, then 3 bisection steps on multiples of 16
    tried.clear()
    assert longest_search(64, 200, 16, runs) == 128 and tried == [64, 128]  # the cap stops the doubling
    assert longest_search(400, 10_000, 16, runs) is None  # the first try already fails
    assert longest_search(70, 10_000, 64, lambda T: T <= 1000, refine=10) == 960  # lengths stay multiples of 64
    with pytest.raises(ValueError, match="granule must be >= 1"):
        longest_search(64, 1000, 0, runs)


def test_out_of_memory_is_told_apart_from_other_failures():
    import torch

    with pytest.raises(RuntimeError) as cpu_oom:  # the CPU allocator's real refusal (nothing is allocated)
        torch.empty(2**62, dtype=torch.uint8)
    assert is_out_of_memory(f"RuntimeError: {cpu_oom.value}")
    assert is_out_of_memory("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not is_out_of_memory("ValueError: k must have 4 or 5 dimensions")
    # a rank's traceback: the allocator's words first, then a long tail of advice; the verdict reads all of it
    long = RuntimeError("rank(s) [0] failed: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 5.00 GiB. "
                        + "If reserved but unallocated memory is large try expandable_segments. " * 20)
    text, oom = failure_text(long, limit=400)
    assert oom and len(text) < 420 and text.startswith("RuntimeError: rank(s) [0]") and text.endswith("segments. ")
    assert failure_text(ValueError("bad k")) == ("ValueError: bad k", False)


def test_find_longest_rows_table_and_plot(tmp_path):
    cfg = ScaleConfig(mode="longest", world_sizes=(1, 2), tokens=128, max_tokens=512, heads=1, dim=8, warmup=0,
                      rep=1)
    rows = find_longest(cfg)
    assert [(r.extra["world_size"], r.extra["tokens"]) for r in rows] == [(1, 128), (1, 256), (1, 512), (2, 128),
                                                                          (2, 256), (2, 512)]
    assert all(r.status == "ok" and r.bench == "scale-longest" for r in rows)
    assert [r.extra.get("longest", False) for r in rows] == [False, False, True] * 2
    assert "| ours | 2 | **512** (longest) | 1 |" in markdown_table(rows)
    assert plot(rows, tmp_path / "p.png").stat().st_size > 1000
    assert point_line(rows[0]).startswith("ours P=1 T=128 B=1: ") and " tokens/s" in point_line(rows[0])
    oom = dataclasses.replace(rows[1], status="error", error="OutOfMemoryError: CUDA out of memory",
                              extra={**rows[1].extra, "out_of_memory": True})
    assert point_line(oom) == "ours P=1 T=256 B=1: out of memory"
    crash = dataclasses.replace(oom, error="DistributedRunError: rank 0 of 1 failed:\nTraceback (most recent call "
                                "last):\n  File x\nValueError: bad k", extra={**oom.extra, "out_of_memory": False})
    table = markdown_table([oom, crash]).splitlines()  # one line per row whatever the error's shape
    assert len(table) == 4 and "| 256 | 1 | out of memory |" in table[2]
    assert table[3].endswith("| 256 | 1 | error: ValueError: bad k |" + " |" * 5)
    with pytest.raises(ValueError, match="max_tokens"):
        ScaleConfig(mode="longest", tokens=1024, max_tokens=512)


def test_comm_bytes_grow_with_ranks():
    cfg = ScaleConfig(heads=2, dim=8)
    m = 2 * (8 * 8 + 8 * 8) * 4  # one rank's (M, D) in bytes
    for algorithm in ("allgather", "doubling"):
        assert comm_bytes(cfg, 1, algorithm) == 0 < comm_bytes(cfg, 2, algorithm)
        assert comm_bytes(cfg, 2, algorithm) < comm_bytes(cfg, 4, algorithm)
    assert comm_bytes(cfg, 4, "allgather") == 2 * 2 * 3 * m  # fwd + bwd, each 3 maps out and 3 in
    assert comm_bytes(cfg, 8, "doubling") == 2 * 5 * m  # the busiest rank: 3 rounds, 5 messages
    assert 2 * comm_bytes(dataclasses.replace(cfg, passes="fwd"), 3) == comm_bytes(cfg, 3)
    with pytest.raises(ValueError, match="algorithm None, 'allgather' or 'doubling'"):
        comm_bytes(cfg, 2, "ring")
    with pytest.raises(ValueError, match="world must be >= 1"):
        comm_bytes(cfg, 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="diagonal"), "mode must be one of"),
    (dict(world_sizes=(0, 1)), "world_sizes must be positive"),
    (dict(mode="strong", tokens=2, world_sizes=(1, 4)), "cannot use 4 ranks"),
    (dict(device="tpu"), "device must be 'cpu' or 'cuda'"),
    (dict(impls=("ours", "mamba")), "impls must be a non-empty subset"),
    (dict(passes="bwd"), "passes must be one of"),
    (dict(op="attention"), "op must be one of"),
    (dict(op="scan", gated=True), "op 'scan'.*takes neither gated=True nor a peer"),
    (dict(op="deer", impls=("ours", "fla-cp"), gated=True, device="cuda", dtype="bfloat16"),
     "op 'deer'.*takes neither gated=True nor a peer"),
    (dict(op="deer", heads=2), "op 'deer'.*takes heads=1 and float32/float64, got heads=2"),
    (dict(op="deer", heads=1, dtype="bfloat16"), "takes heads=1 and float32/float64, got heads=1, dtype=bfloat16"),
    (dict(impls=("fla-cp",), mode="strong", batch=2, tokens=33, world_sizes=(1, 2), chunk_size=128),
     "fla-cp' needs CUDA GPUs.*bf16/fp16.*batch 1.*gated=True.*not by \\[2\\].*chunk_size 16, 32 or 64 \\(got 128\\)"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScaleConfig(**kwargs)


def test_cli_writes_jsonl_table_and_plot(tmp_path):
    res = CliRunner().invoke(app, ["scale", "--world", "1,2", "--tokens", "64", "--heads", "1", "--dim", "8",
                                   "--warmup", "0", "--rep", "1", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    stem = tmp_path / "weak-T64-H1-D8-cpu"
    rows = read_jsonl(stem.with_suffix(".jsonl"))
    assert [r["extra"]["world_size"] for r in rows] == [1, 2] and all(r["bench"] == "scale-weak" for r in rows)
    assert stem.with_suffix(".png").exists() and "efficiency" in stem.with_suffix(".md").read_text()
    # each point is told as it arrives; its partial record goes once the whole sweep is written
    assert "ours P=1 T=64 B=1: " in res.output and "ours P=2 T=128 B=1: " in res.output
    assert not stem.with_suffix(".partial.jsonl").exists()
    res = CliRunner().invoke(app, ["scale", "--world", "1,2", "--tokens", "24,32", "--batch", "1,2", "--heads", "1",
                                   "--dim", "8", "--warmup", "0", "--rep", "1", "--mode", "strong",
                                   "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = read_jsonl(tmp_path / "strong-T24_32-B1_2-H1-D8-cpu.jsonl")
    assert {(r["extra"]["tokens"], r["extra"]["batch"]) for r in rows} == {(24, 1), (24, 2), (32, 1), (32, 2)}
    res = CliRunner().invoke(app, ["scale", "--op", "scan", "--world", "1,2", "--tokens", "32", "--heads", "1",
                                   "--dim", "8", "--warmup", "0", "--rep", "1", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert [r["case"] for r in read_jsonl(tmp_path / "scan-weak-T32-H1-D8-cpu.jsonl")] == [
        "scan-P1-T32-B1-H1-D8", "scan-P2-T64-B1-H1-D8"]
    res = CliRunner().invoke(app, ["scale", "--world", "1,x"])
    assert res.exit_code != 0 and "comma-separated integers" in res.output
    res = CliRunner().invoke(app, ["scale", "--mode", "strong", "--world", "1,4", "--tokens", "64,2"])
    assert res.exit_code != 0 and "cannot use 4 ranks" in res.output
    res = CliRunner().invoke(app, ["scale", "--impl", "fla-cp", "--device", "cpu"])
    assert res.exit_code != 0 and "needs CUDA GPUs" in res.output


def test_cli_deer_sweep(tmp_path):
    # the sequence-parallel DEER-GRU: one hidden size (heads defaults to 1), its iterations and bytes in every row
    res = CliRunner().invoke(app, ["scale", "--op", "deer", "--mode", "strong", "--world", "1,2", "--tokens", "48",
                                   "--dim", "4", "--warmup", "0", "--rep", "1", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = read_jsonl(tmp_path / "deer-strong-T48-H1-D4-cpu.jsonl")
    assert [r["case"] for r in rows] == ["deer-P1-T48-B1-H1-D4", "deer-P2-T48-B1-H1-D4"]
    assert all(r["status"] == "ok" and r["shapes"]["x_local"][2] == 4 for r in rows)
    cfg = ScaleConfig(mode="strong", world_sizes=(1, 2), tokens=48, heads=1, dim=4, op="deer")
    for r in rows:
        it = r["extra"]["iterations"]
        assert 1 <= it <= 100 and r["extra"]["comm_bytes"] == comm_bytes(cfg, r["extra"]["world_size"], iterations=it)
    assert rows[0]["extra"]["comm_bytes"] == 0 < rows[1]["extra"]["comm_bytes"]
    table = (tmp_path / "deer-strong-T48-H1-D4-cpu.md").read_text().splitlines()
    assert table[0].endswith("| iterations |") and table[2].endswith(f"| {rows[0]['extra']['iterations']} |")
    with pytest.raises(ValueError, match="needs the forward's Newton iterations"):
        comm_bytes(cfg, 2)
    res = CliRunner().invoke(app, ["scale", "--op", "deer", "--heads", "2"])
    assert res.exit_code != 0 and "takes heads=1" in res.output


def test_cli_under_torchrun_uses_the_jobs_ranks(tmp_path):
    # a real torchrun job of 3 gloo ranks: world sizes 1, 2, 3 run on sub-groups of it, rank 0 alone reports
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m",
           "pflow_dist.cli", "scale", "--device", "cpu", "--world", "1,2,3", "--tokens", "48", "--heads", "1",
           "--dim", "8", "--warmup", "0", "--rep", "1", "--out-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = read_jsonl(tmp_path / "weak-T48-H1-D8-cpu.jsonl")
    assert [r["extra"]["world_size"] for r in rows] == [1, 2, 3] and all(r["status"] == "ok" for r in rows)
    assert rows[0]["extra"]["efficiency"] == pytest.approx(1.0) and rows[2]["extra"]["comm_bytes"] > 0
    assert res.stdout.count("| ours | 3 | 144 |") == 1  # one table, from rank 0
    cmd[cmd.index("1,2,3")] = "1,4"  # more ranks than the job has: a clear error on every rank
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert res.returncode != 0 and "the job has 3" in res.stdout + res.stderr


def test_gated_forward_sweep_and_error_rows_in_the_table(tmp_path):
    cfg = ScaleConfig(mode="weak", world_sizes=(1, 2), tokens=40, heads=1, dim=8, warmup=0, rep=1, chunk_size=16,
                      gated=True, passes="fwd")
    rows = run_scaling(cfg)
    assert [r.mode for r in rows] == ["fwd", "fwd"] and all(r.case.endswith("-gated") for r in rows)
    assert all(r.status == "ok" and r.extra["tokens_per_s"] > 0 for r in rows)
    # a peer that refused at one world size: its row carries the reason, the table and the plot skip its numbers
    failed = dataclasses.replace(rows[1], impl="fla-cp", status="error", error="RuntimeError: refused", median_ms=None,
                                 extra={k: v for k, v in rows[1].extra.items()
                                        if k in ("world_size", "tokens", "batch", "config")})
    table = markdown_table([*rows, failed])
    assert "| fla-cp | 2 | 80 | 1 | error: RuntimeError: refused" in table
    assert plot([*rows, failed], tmp_path / "p.png").stat().st_size > 1000


def test_op_inputs_shapes_and_ranges():
    gen = torch.Generator().manual_seed(0)
    x = op_inputs("flow", (2, 5, 3, 4), torch.float32, torch.device("cpu"), gen, gated=True)
    assert {k: list(v.shape) for k, v in x.items()} == {"q": [2, 5, 3, 4], "k": [2, 5, 3, 4], "v": [2, 5, 3, 4],
                                                        "beta": [2, 5, 3], "g": [2, 5, 3]}
    assert torch.allclose(x["k"].norm(dim=-1), torch.ones(2, 5, 3)) and bool((x["g"] <= 0).all())
    a = op_inputs("scan", (2, 5, 3, 4), torch.float64, torch.device("cpu"), gen)["a"]
    assert a.shape == (2, 5, 12) and a.dtype == torch.float64 and bool(((a >= 0.5) & (a <= 1)).all())
    assert op_inputs("deer", (2, 5, 1, 4), torch.float32, torch.device("cpu"), gen)["x"].shape == (2, 5, 4)
    with pytest.raises(ValueError, match="op must be one of"):
        op_inputs("gru", (1, 1, 1, 1), torch.float32, torch.device("cpu"), gen)
