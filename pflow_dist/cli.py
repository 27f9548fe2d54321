"""The ``pflow-dist`` command line: ``info``, ``bench`` (more subcommands land with their issues)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="pflow_dist: very long sequence recurrent models on one GPU and many.",
                  no_args_is_help=True, add_completion=False)
console = Console(width=160) if not Console().is_terminal else Console()

_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16", "fp64": "float64", "float64": "float64"}


@app.command()
def demo(
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps (400 ≈ a minute on 2 CPU cores).")] = 400,
    out_dir: Annotated[Path, typer.Option(help="Where the plot and metrics.jsonl go.")] = Path("pflow_demo"),
    seed: Annotated[int, typer.Option(help="Model and data seed.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 1,
) -> None:
    """Train a tiny FlowLM on MQAR (associative recall) on CPU: the loss falls, recall accuracy rises, a plot."""
    from .demo import run_demo

    run_demo(steps=steps, out_dir=out_dir, seed=seed, threads=threads, console=console)


@app.command("deer-train")
def deer_train(
    seq_len: Annotated[int, typer.Option(min=2, help="Sequence length T (the cue lies in its first 10%).")] = 16384,
    steps: Annotated[int, typer.Option(min=1, help="Adam steps (at T = 16,384, H200: the loss drops near step "
                                                   "220).")] = 400,
    batch: Annotated[int, typer.Option(min=1, help="Sequences per batch.")] = 32,
    hidden: Annotated[int, typer.Option(min=1, help="GRU width.")] = 16,
    layers: Annotated[int, typer.Option(min=1, help="Stacked GRU layers.")] = 1,
    classes: Annotated[int, typer.Option(min=2, help="Labels (chance = 1/classes).")] = 2,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 1e-2,
    method: Annotated[str, typer.Option(help="DEER's Newton variant: quasi, newton or damped.")] = "quasi",
    max_iter: Annotated[int, typer.Option(min=1, help="Newton iterations per solve before DEER gives up.")] = 100,
    fallback: Annotated[bool, typer.Option(help="Run a layer sequentially for a step whose DEER solve did not "
                                                "converge (counted) instead of stopping.")] = True,
    chrono: Annotated[bool, typer.Option(help="Chrono-initialise the update gates for memories up to T steps.")] = True,
    noise: Annotated[float | None, typer.Option(min=0.0, help="Background noise std (default: 0.1·sqrt(4096/T), at "
                                                       "most 0.3).")] = None,
    compare: Annotated[bool, typer.Option(help="Also train the sequential GRU from the same weights.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Weights and data seed.")] = 0,
    out_dir: Annotated[Path, typer.Option(help="Where metrics.jsonl and the plot go.")] = Path("deer_train"),
) -> None:
    """Train the DEER-GRU classifier on the long-memory task (T = 16k by default), beside the sequential GRU."""
    from .deer_train import check_deer_train_args, run_deer_train

    try:
        device = check_deer_train_args(method, device)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    run_deer_train(seq_len=seq_len, steps=steps, batch=batch, hidden=hidden, layers=layers, classes=classes, lr=lr,
                   method=method, max_iter=max_iter, fallback=fallback, chrono=chrono, noise=noise, compare=compare,
                   device=device, seed=seed, out_dir=out_dir, console=console)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="YAML run config (configs/...); defaults when omitted.")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config and ds_config.")]
    = False,
) -> None:
    """The one training loop (plain or DeepSpeed), single process or under a launcher: train [--config F] k=v ..."""
    from .train.__main__ import main as train_main

    argv = ([f"--config={config}"] if config else []) + (["--print-config"] if print_config else []) + list(ctx.args)
    raise typer.Exit(train_main(argv))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sae(ctx: typer.Context) -> None:
    """Supervised autoencoder with bi-level l1,inf feature selection: dense vs projected (JSON lines)."""
    from .models.sae import main as sae_main

    sae_main(ctx.args)


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """Versions, CUDA devices, the Triton backend, Ray and DeepSpeed availability."""
    from .info import collect_info

    data = collect_info()
    if as_json:
        console.print_json(json.dumps(data))
        return
    from rich.table import Table

    t = Table(title="pflow-dist info", show_header=False)
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={'-' if v is None else v}" for k, v in value.items())
        elif isinstance(value, list):
            value = "; ".join(", ".join(f"{k}={v}" for k, v in d.items()) for d in value) or "none"
        t.add_row(key, str(value))
    console.print(t)


_SP_BENCH = ("sequence-parallel flow layer over ranks (one process per rank, fla context parallelism as the peer): "
             "run `pflow-dist scale`, e.g. pflow-dist scale --mode weak --world 1,2 --tokens 65536,262144,1048576 "
             "--heads 16 --dim 128 --dtype bf16 --gated --impl ours --impl fla-cp")


@app.command()
def bench(
    name: Annotated[str | None, typer.Argument(help="Benchmark to run (see --list).")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the benchmarks and exit.")] = False,
    case: Annotated[list[str] | None, typer.Option("--case", help="Run only this case (repeatable).")] = None,
    mode: Annotated[list[str] | None, typer.Option("--mode", help="fwd or fwd+bwd (repeatable).")] = None,
    impl: Annotated[list[str] | None, typer.Option("--impl", help="Only this implementation (repeatable).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Input dtype: fp32, bf16, fp16, fp64 (bench default).")] = None,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when present).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small cases (CPU smoke run).")] = False,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed warm-up calls.")] = 3,
    rep: Annotated[int, typer.Option(min=1, help="Timed calls; the median is reported.")] = 10,
    check: Annotated[bool, typer.Option(help="Measure the error against the float64 reference.")] = True,
    out: Annotated[Path | None, typer.Option(help="Append the rows to this JSONL file.")] = None,
) -> None:
    """Time ours and the peers in one process on the same inputs; print ratios; write JSONL rows."""
    from .bench.registry import BENCHES

    if list_:
        for key, (_, desc) in sorted(BENCHES.items()):
            console.print(f"[bold]{key:<10}[/bold] {desc}")
        console.print(f"[bold]{'sp':<10}[/bold] {_SP_BENCH}")
        return
    if name is None:
        raise typer.BadParameter("give a benchmark name or --list", param_hint="NAME")
    if name == "sp":
        raise typer.BadParameter(_SP_BENCH, param_hint="NAME")
    import torch

    from .bench.harness import write_jsonl
    from .bench.registry import get_bench, run_bench
    from .bench.report import format_row, print_table

    try:
        spec = get_bench(name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="NAME") from e
    if dtype is not None and dtype not in _DTYPES:
        raise typer.BadParameter(f"expected one of {sorted(_DTYPES)}, got {dtype!r}", param_hint="--dtype")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda was asked for but no CUDA device is visible", param_hint="--device")
    try:
        rows = run_bench(
            spec, device=dev, dtype=getattr(torch, _DTYPES[dtype]) if dtype else None, quick=quick,
            case_filter=case or (), modes=mode or None, impl_filter=impl or (), warmup=warmup, rep=rep,
            check=check, on_row=lambda r: console.print(format_row(r), highlight=False),
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    print_table(rows, console)
    if out is not None:
        console.print(f"wrote {len(rows)} rows to {write_jsonl(rows, out)}")


@app.command()
def scale(
    mode: Annotated[str, typer.Option(help="weak (tokens per rank fixed), strong (sequence fixed) or longest (the "
                                           "longest sequence each world size runs, from --tokens up to "
                                           "--max-tokens).")] = "weak",
    world: Annotated[str, typer.Option(help="Comma-separated world sizes, e.g. 1,2,4.")] = "1,2",
    tokens: Annotated[str, typer.Option(help="Tokens per rank (weak) or in the whole sequence (strong); "
                                              "comma-separated values are swept, e.g. 65536,262144.")] = "4096",
    batch: Annotated[str, typer.Option(help="Batch size B; comma-separated values are swept.")] = "1",
    heads: Annotated[int | None, typer.Option(help="Heads H (default 2; deer: 1).")] = None,
    dim: Annotated[int, typer.Option(help="Head dimension K = V (deer: the GRU's inputs and hidden units).")] = 32,
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
    device: Annotated[str | None, typer.Option(help="cpu (gloo processes) or cuda (one GPU per rank, NCCL).")] = None,
    warmup: Annotated[int, typer.Option(min=0)] = 1,
    rep: Annotated[int, typer.Option(min=1)] = 3,
    impl: Annotated[list[str] | None, typer.Option(help="ours and/or fla-cp (fla's context parallelism; CUDA, "
                                                         "bf16, --gated, B=1), repeatable.")] = None,
    gated: Annotated[bool, typer.Option("--gated", help="The gated delta rule (per-token log-decay).")] = False,
    passes: Annotated[str, typer.Option(help="fwd+bwd or fwd.")] = "fwd+bwd",
    op: Annotated[str, typer.Option(help="flow (sp_flow, the delta rule), scan (sp_scan, a diagonal scan over "
                                         "heads·dim channels) or deer (sp_deer, a quasi-Newton DEER-GRU; fp32/fp64)."
                                    )] = "flow",
    max_tokens: Annotated[int, typer.Option(help="--mode longest: the longest sequence tried.")] = 2**27,
    out_dir: Annotated[Path, typer.Option(help="Where the JSONL, PNG and Markdown table go.")] = Path("runs/scale"),
) -> None:
    """Weak or strong scaling of a sequence-parallel op (the flow layer, the scan or DEER; fwd+bwd) over ranks,
    swept over sequence lengths and batch sizes: JSONL, plot, table.

    Run plainly, each world size gets its own group of processes on this machine (gloo on CPU, one GPU per rank with
    NCCL). Run under torchrun (``torchrun --nnodes N --nproc-per-node G -m pflow_dist.cli scale ...``), the job's
    ranks (any number of nodes) are used: world size P runs on the first P ranks, rank 0 writes the results.
    """
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from rich.progress import Progress

    from .bench.harness import write_jsonl
    from .bench.scaling import ScaleConfig, markdown_table, plot, point_line, run_sweep, sweep_configs

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"expected one of {sorted(_DTYPES)}, got {dtype!r}", param_hint="--dtype")
    sizes, token_list, batch_list = (_int_list(v, name) for v, name in
                                     ((world, "--world"), (tokens, "--tokens"), (batch, "--batch")))
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    heads = _default_heads(heads, op)
    in_job = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if in_job and not dist.is_initialized():
        if dev == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if dev == "cuda" else "gloo", timeout=timedelta(seconds=600))
    try:
        cfg = ScaleConfig(mode=mode, world_sizes=sizes, tokens=token_list[0], batch=batch_list[0], heads=heads,
                          dim=dim, dtype=_DTYPES[dtype], device=dev, warmup=warmup, rep=rep,
                          impls=tuple(impl or ["ours"]), gated=gated, passes=passes, op=op, in_job=in_job,
                          max_tokens=max_tokens)
        sweep_configs(cfg, token_list, batch_list)  # every point is validated before the first process starts
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    lead = not in_job or dist.get_rank() == 0  # the rank that reports
    name = lambda xs: "_".join(map(str, xs))  # noqa: E731
    batch_part = "" if batch_list == (1,) else f"-B{name(batch_list)}"
    op_part = "" if op == "flow" else f"{op}-"
    stem = out_dir / (f"{op_part}{mode}-T{name(token_list)}{batch_part}-H{heads}-D{dim}{'-gated' if gated else ''}"
                      f"-{cfg.device}")
    partial = stem.with_suffix(".partial.jsonl")  # every point as it is measured: what a cut-off run leaves
    partial.unlink(missing_ok=True)
    n_points = len(sizes) * len(cfg.impls) * len(token_list) * len(batch_list)
    with Progress(console=console, transient=True, disable=not lead) as progress:
        task = progress.add_task(f"{mode} scaling", total=None if mode == "longest" else n_points)

        def on_point(row) -> None:
            if lead:
                write_jsonl([row], partial)
                progress.console.print(point_line(row), highlight=False)
            progress.advance(task)

        rows = run_sweep(cfg, token_list, batch_list, on_point=on_point)
    if in_job:
        dist.destroy_process_group()
    if not lead:
        return
    table = markdown_table(rows)
    write_jsonl(rows, stem.with_suffix(".jsonl"))
    partial.unlink(missing_ok=True)
    stem.with_suffix(".md").write_text(table + "\n")
    png = plot(rows, stem.with_suffix(".png"))
    console.print(table, highlight=False)
    console.print(f"wrote {stem.with_suffix('.jsonl')}, {stem.with_suffix('.md')}, {png}")


@app.command("sp-check")
def sp_check(
    op: Annotated[str, typer.Option(help="flow (sp_flow), scan (sp_scan over heads·dim channels) or deer (sp_deer, "
                                         "a quasi-Newton GRU with dim units; fp32/fp64).")] = "flow",
    world: Annotated[int, typer.Option(min=1, help="Ranks (processes; one GPU each on CUDA).")] = 2,
    tokens: Annotated[int, typer.Option(min=1, help="The whole sequence's length T.")] = 4096,
    batch: Annotated[int, typer.Option(min=1)] = 1,
    heads: Annotated[int | None, typer.Option(min=1, help="Heads (default 2; deer: 1).")] = None,
    dim: Annotated[int, typer.Option(min=1, help="Head dimension K = V (deer: the GRU's units).")] = 32,
    dtype: Annotated[str, typer.Option(help="fp32, bf16, fp16 (or fp64 on the torch backend).")] = "fp32",
    gated: Annotated[bool, typer.Option("--gated", help="The gated delta rule.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu (gloo) or cuda (NCCL).")] = None,
    backend: Annotated[str, typer.Option(help="auto, triton or torch.")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Append the rows to this JSONL file.")] = None,
) -> None:
    """A sequence-parallel op on --world ranks against the single-device op on the whole sequence (fwd+bwd): the
    relative RMS difference of every rank's output, gradients and final state; exits 1 if one is out of tolerance."""
    import torch

    from .bench.harness import write_jsonl
    from .bench.sp_check import CheckConfig, check_sequence_parallel

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"expected one of {sorted(_DTYPES)}, got {dtype!r}", param_hint="--dtype")
    try:
        cfg = CheckConfig(op=op, world=world, tokens=tokens, batch=batch,
                          heads=_default_heads(heads, op), dim=dim,
                          dtype=_DTYPES[dtype], gated=gated,
                          device=device or ("cuda" if torch.cuda.is_available() else "cpu"), backend=backend)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    with console.status(f"sp-check on {world} ranks, T={tokens}"):
        rows = check_sequence_parallel(cfg)
    for r in rows:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in r.extra["errors"].items())
        verdict = "ok" if r.extra["ok"] else f"OUT OF TOLERANCE ({r.extra['tolerance']:g})"
        console.print(f"rank {r.extra['rank']} ({r.shapes['local'][1]} tokens): {errs}: {verdict}", highlight=False)
    if out is not None:
        write_jsonl(rows, out)
    if not all(r.extra["ok"] for r in rows):
        raise typer.Exit(1)


def _default_heads(heads: int | None, op: str) -> int:
    """``--heads`` when given, else 1 for deer (one GRU) and 2 for flow and scan."""
    return heads if heads is not None else (1 if op == "deer" else 2)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``; a clear error for anything else."""
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None


launch_app = typer.Typer(help="Launch the training loop with DeepSpeed or Ray.", no_args_is_help=True)
app.add_typer(launch_app, name="launch")


@launch_app.command("deepspeed")
def launch_deepspeed(
    config: Annotated[Path, typer.Option(help="Training config (YAML).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides of the config.")] = None,
    num_gpus: Annotated[int, typer.Option(help="Processes (GPUs) per node.")] = 1,
    num_nodes: Annotated[int | None, typer.Option(help="Nodes (default: all hosts of the hostfile).")] = None,
    hostfile: Annotated[Path | None, typer.Option(help="OpenMPI-style hostfile: 'host slots=N' per line.")] = None,
    master_addr: Annotated[str | None, typer.Option(help="Rendezvous host (rank 0's node).")] = None,
    master_port: Annotated[int, typer.Option(help="Rendezvous port.")] = 29500,
    no_ssh: Annotated[bool, typer.Option("--no-ssh", help="One launcher per node (Kubernetes), needs --node-rank.")]
    = False,
    node_rank: Annotated[int | None, typer.Option(help="This node's rank with --no-ssh.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command instead of running it.")] = False,
) -> None:
    """Build the ``deepspeed`` command for ``pflow_dist.train`` and run it (or print it with --dry-run)."""
    import subprocess

    from .launch.deepspeed import DeepSpeedLaunch, build_command, deepspeed_executable, format_command

    spec = DeepSpeedLaunch(config=config, num_gpus=num_gpus, num_nodes=num_nodes, hostfile=hostfile,
                           master_addr=master_addr, master_port=master_port, no_ssh=no_ssh, node_rank=node_rank,
                           overrides=list(overrides or []))
    try:
        cmd = build_command(spec)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    console.print(format_command(cmd), highlight=False)
    if dry_run:
        return
    try:
        cmd[0] = deepspeed_executable()
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e)) from e
    raise typer.Exit(subprocess.call(cmd))


@app.command("k8s-check")
def k8s_check(
    overlay: Annotated[Path, typer.Argument(help="A kustomization folder, e.g. k8s/overlays/deepspeed.")],
    gpus: Annotated[int | None, typer.Option(help="GPUs the training config expects (nodes × GPUs per node).")] = None,
) -> None:
    """Render a kustomization offline and validate every manifest (schemas + project rules) before kubectl apply -k."""
    from .deploy import project_checks, render, validate_manifests

    try:
        docs = render(overlay)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="OVERLAY") from e
    problems = validate_manifests(docs) + project_checks(docs, gpus)
    for d in docs:
        console.print(f"{d['kind']:<24} {d['metadata']['name']}", highlight=False)
    for p in problems:
        console.print(f"[red]problem[/red] {p}", highlight=False)
    console.print(f"{len(docs)} manifests, {len(problems)} problem(s)")
    raise typer.Exit(1 if problems else 0)


@launch_app.command("ray")
def launch_ray_cmd(
    config: Annotated[Path, typer.Option(help="Training config (YAML).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides of the config.")] = None,
    num_workers: Annotated[int, typer.Option(help="Ray Train workers (data-parallel ranks × parallel.sp_size).")] = 1,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="One GPU per worker (NCCL).")] = False,
    address: Annotated[str | None, typer.Option(help="host:port or ray://host:port of a running cluster, or 'auto' "
                                                     "(default: RAY_ADDRESS, else a local Ray).")] = None,
    storage_path: Annotated[str | None, typer.Option(help="Checkpoint storage (shared path or URI for multi-node).")]
    = None,
    max_failures: Annotated[int, typer.Option(help="Worker-group restarts allowed (-1: unlimited).")] = 3,
    name: Annotated[str | None, typer.Option(help="Run name (default: the config's stem); the same name and "
                                                  "storage path resume the run.")] = None,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs reserved per worker.")] = 1.0,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept in storage (0: all).")] = 2,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to wait for --address to answer.")] = 10.0,
    resources_wait: Annotated[float, typer.Option(help="Seconds to wait for the CPUs/GPUs asked for (autoscaling).")]
    = 0.0,
) -> None:
    """Train with Ray Train (TorchTrainer): checkpoints reported every train.ckpt_every steps, restarts on failure."""
    from .launch.ray_train import launch_ray

    try:
        out = launch_ray(config, list(overrides or []), num_workers=num_workers, use_gpu=use_gpu, address=address,
                         storage_path=storage_path, max_failures=max_failures, name=name,
                         cpus_per_worker=cpus_per_worker, keep_checkpoints=keep_checkpoints or None,
                         connect_timeout_s=connect_timeout, resources_wait_s=resources_wait)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        raise typer.BadParameter(str(e)) from e
    metrics = {k: v for k, v in (out["metrics"] or {}).items() if k not in ("steps", "losses", "lrs")}
    console.print_json(json.dumps({"metrics": metrics, "checkpoint": out["checkpoint"], "path": out["path"]},
                                  default=str))


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
