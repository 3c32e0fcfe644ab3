"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

# the instruction-set extensions that decide how fast ORT's CPU kernels run: AVX-512 and the
# VNNI dot products (int8), AMX tiles (bf16/int8 matrix units on recent Xeons)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx")


def cpu_model() -> str:
    """lscpu's model name (what BENCHMARKS.md cites), else the platform's guess."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def isa_flags(cpuinfo: str | None = None) -> dict[str, bool]:
    """ISA_FLAGS -> present, from /proc/cpuinfo ('amx': any amx_* flag); {} off Linux."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    present = {name: name in flags for name in ISA_FLAGS}
    present["amx"] = any(f.startswith("amx") for f in flags)
    return present


def machine_line() -> str:
    """'AMD EPYC, 2 logical CPUs; ISA: avx2 yes, avx512f no, ...' for reports."""
    flags = isa_flags()
    isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()) or "unknown"
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs; ISA: {isa}"
