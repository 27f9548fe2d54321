"""DeepSpeed launcher shim: build (and run) ``deepspeed [launcher flags] --module pflow_dist.train --config ...``.

``pflow-dist launch deepspeed --config configs/train/x.yaml --num-gpus 8 [--hostfile hosts] [-- key=value ...]``.
Launcher flags go before the module, training overrides after it; ``--dry-run`` prints the command instead.
"""

from __future__ import annotations

import shlex
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .hostfile import parse_hostfile

__all__ = ["DeepSpeedLaunch", "build_command", "free_port"]


def free_port() -> int:
    """A free TCP port on this machine (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DeepSpeedLaunch:
    """What to launch. ``num_gpus`` is processes per node; with a hostfile, ``num_nodes`` defaults to its length."""

    config: Path
    num_gpus: int = 1
    num_nodes: int | None = None
    hostfile: Path | None = None
    master_addr: str | None = None
    master_port: int = 29500
    no_ssh: bool = False
    node_rank: int | None = None
    module: str = "pflow_dist.train"
    overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ``ValueError``/``FileNotFoundError`` for a launch that cannot work."""
        if not Path(self.config).is_file():
            raise FileNotFoundError(f"config {self.config} does not exist")
        if self.num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {self.num_gpus}")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be in 1..65535, got {self.master_port}")
        if self.hostfile is not None:
            hosts = parse_hostfile(self.hostfile)
            nodes = self.num_nodes or len(hosts)
            if nodes > len(hosts):
                raise ValueError(f"num_nodes={nodes} but the hostfile lists {len(hosts)} host(s)")
            short = [h.name for h in hosts[:nodes] if h.slots < self.num_gpus]
            if short:
                raise ValueError(f"num_gpus={self.num_gpus} exceeds the slots of {short} in {self.hostfile}")
        elif self.num_nodes not in (None, 1):
            raise ValueError(f"num_nodes={self.num_nodes} needs a hostfile listing the nodes")
        if self.no_ssh and (self.node_rank is None or self.master_addr is None):
            raise ValueError("--no-ssh runs one launcher per node: give --node-rank and --master-addr")
        for o in self.overrides:
            if "=" not in o:
                raise ValueError(f"overrides must be key=value, got {o!r}")


def build_command(launch: DeepSpeedLaunch) -> list[str]:
    """The ``deepspeed`` command line (validated first)."""
    launch.validate()
    cmd = ["deepspeed", f"--num_gpus={launch.num_gpus}", f"--master_port={launch.master_port}"]
    if launch.hostfile is not None:
        cmd.append(f"--hostfile={launch.hostfile}")
        cmd.append(f"--num_nodes={launch.num_nodes or len(parse_hostfile(launch.hostfile))}")
    if launch.master_addr:
        cmd.append(f"--master_addr={launch.master_addr}")
    if launch.no_ssh:
        cmd += ["--no_ssh", f"--node_rank={launch.node_rank}"]
    cmd += ["--module", launch.module, "--config", str(launch.config), *launch.overrides]
    return cmd


def deepspeed_executable() -> str:
    """Path of the ``deepspeed`` launcher; ``FileNotFoundError`` with the fix when it is not installed."""
    exe = shutil.which("deepspeed")
    if exe is None:
        raise FileNotFoundError("the 'deepspeed' launcher is not on PATH: pip install deepspeed")
    return exe


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
