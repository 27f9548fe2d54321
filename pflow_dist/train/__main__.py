"""``python -m pflow_dist.train --config FILE.yaml [section.key=value ...]`` and the DeepSpeed launcher path
``deepspeed --num_gpus N --module pflow_dist.train --config FILE.yaml ...`` (the launcher's ``--local_rank=N`` is
accepted and ignored: the rank comes from the environment). Thin by design: parse → build → train → close."""

from __future__ import annotations

import argparse
import json
import sys

# absolute imports: this file also runs as a script (``deepspeed --num_gpus N pflow_dist/train/__main__.py ...``)
from pflow_dist.train.config import RunConfig, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pflow_dist.train", description=__doc__)
    p.add_argument("--config", help="YAML run config (configs/...); defaults when omitted")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100 parallel.zero_stage=2")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and the DeepSpeed JSON")
    return p.parse_intermixed_args(argv)


def run(cfg: RunConfig, print_config: bool = False) -> dict | None:
    """Train ``cfg`` (or only print it with its DeepSpeed JSON); rank 0 prints the summary as one JSON line.

    Returns the summary without its history (None with ``print_config``).
    """
    if print_config:
        from pflow_dist.train.ds_config import build_ds_config

        print(json.dumps({"config": cfg.to_dict(), "ds_config(world_size=1)": build_ds_config(cfg, 1)}, indent=2))
        return None
    import torch.distributed as dist

    from pflow_dist.train import train

    summary = train(cfg)
    summary.pop("history", None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(summary, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run(load_config(args.config, args.overrides), print_config=args.print_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
