"""Benchmark scripts that no other test drives, run end to end in their --quick form, so that
a refactor of the modules they share (bench/reference_model.py, cpu.py, serve.py) cannot
break them unseen: bench/oip.py failed at start-up twice that way before it had this test.
The figures are not checked (performance is measured, never asserted), only that the script
runs, serves both protocols and finds them giving the same tokens."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_oip_benchmark_runs_and_both_protocols_agree(tmp_path):
    pytest.importorskip("torch", reason="the reference model is built in PyTorch (export extra)")
    pytest.importorskip("tritonclient.grpc", reason="the OIP client is tritonclient (dev extra)")
    report = tmp_path / "oip.md"
    out = subprocess.run(
        [sys.executable, "oip.py", "--quick", "--out", str(report)],
        cwd=BENCH, capture_output=True, text=True, timeout=600, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = report.read_text()
    agree = re.search(r"same tokens on both protocols for (\d+)/(\d+)", text)
    assert agree and agree[1] == agree[2] and int(agree[2]) > 0, text
    # one row per protocol and round, none with errors
    rows = re.findall(r"^\| \d+ \| (v1|oip) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| (\d+) \|", text, re.M)
    assert sorted(p for p, _ in rows) == ["oip", "oip", "v1", "v1"], text
    assert all(errors == "0" for _, errors in rows), text
