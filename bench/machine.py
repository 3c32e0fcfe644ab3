"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import platform
import subprocess


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
