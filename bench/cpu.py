"""Who used the cores during a measurement: a server's whole process tree, this process, and
everything else on the machine (other people's jobs: noise the figures carry). Linux /proc;
elsewhere the figures are None."""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """root and all its descendants (a PyTriton server is python -> tritonserver -> stubs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_seconds(roots: list[int]) -> float:
    """CPU seconds (user + system, all threads) of the live processes under roots."""
    ticks = 0
    for root in roots:
        for pid in process_tree(root):
            if (fields := _stat_fields(pid)) is not None:
                ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICK


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (/proc/stat), None off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK  # less idle and iowait


class CpuWindow:
    """`with CpuWindow(server_roots) as w: ...` then w.usage: cores used over the block by
    the servers' trees ('server'), this process ('client'), and the rest ('others')."""

    def __init__(self, server_roots: list[int]) -> None:
        self.server_roots = list(server_roots)
        self.usage: dict[str, float] | None = None

    def __enter__(self) -> CpuWindow:
        self._start = (time.monotonic(), tree_seconds(self.server_roots), time.process_time(),
                       machine_busy_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall0, server0, self0, busy0 = self._start
        busy1 = machine_busy_seconds()
        wall = max(time.monotonic() - wall0, 1e-9)
        server = (tree_seconds(self.server_roots) - server0) / wall
        client = (time.process_time() - self0) / wall
        self.usage = {"server": server, "client": client}
        if busy0 is not None and busy1 is not None:
            self.usage["others"] = max((busy1 - busy0) / wall - server - client, 0.0)
