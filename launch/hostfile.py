"""OpenMPI-style hostfiles (``hostname slots=N`` per line), as the DeepSpeed launcher reads them, validated up front so
a typo fails with its line number instead of a hang at rendezvous."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Host", "parse_hostfile"]

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?)\s+slots=(?P<slots>\d+)$")


@dataclass(frozen=True)
class Host:
    """One node: its hostname and the number of GPU slots (processes) on it."""

    name: str
    slots: int


def parse_hostfile(path: str | Path) -> list[Host]:
    """Parse and validate a hostfile.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a malformed line (with its number), a duplicated host, zero slots, or no host at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hostfile {path} does not exist")
    hosts: list[Host] = []
    for no, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"{path}:{no}: expected 'hostname slots=N', got {raw.strip()!r}")
        host = Host(m["host"], int(m["slots"]))
        if host.slots < 1:
            raise ValueError(f"{path}:{no}: {host.name} has slots={host.slots}, need at least 1")
        if any(h.name == host.name for h in hosts):
            raise ValueError(f"{path}:{no}: host {host.name} is listed twice")
        hosts.append(host)
    if not hosts:
        raise ValueError(f"{path}: no host listed")
    return hosts
