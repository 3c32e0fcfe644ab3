"""The runtime installs and serves without torch (and without onnx): the export extra is for
training and export only.

In the torch-free lane (`make test-runtime`: a `pip install ".[dev]"` venv, TEST_LANE=runtime,
not a GRUSERVE_* variable: those configure the server) the first test proves the lane is what
it claims; the second runs in both lanes and proves a real `gruserve serve` process never
imports them, even where they are installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sys
from pathlib import Path

import pytest

import gruserve.runtime
from gruserve.runtime.client import GruserveClient

from .serving import ServeProcess

EXPORT_ONLY = ("torch", "onnx")
IN_RUNTIME_LANE = os.environ.get("TEST_LANE") == "runtime"


@pytest.mark.skipif(not IN_RUNTIME_LANE, reason="checks the torch-free lane (make test-runtime)")
def test_the_runtime_lane_has_neither_torch_nor_onnx_and_tests_the_installed_package():
    for name in EXPORT_ONLY:
        assert importlib.util.find_spec(name) is None, f"{name} is installed in the runtime lane"
    # a regular (non-editable) install: the tests exercise what `pip install .` put on disk,
    # package data included, not the source tree
    installed = Path(gruserve.runtime.__file__).resolve().parent
    sources = Path(__file__).resolve().parents[1] / "runtime"
    assert installed != sources and installed.parts[-3:] == ("site-packages", "gruserve",
                                                             "runtime"), installed


def _imported_modules(importtime_log: str) -> set[str]:
    """Module names from `python -X importtime` output ('import time: self | cumul | name')."""
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", importtime_log, re.M)
    return set(names)


def test_serving_imports_neither_torch_nor_onnx(synthetic_bundle_dir, tmp_path):
    child = ServeProcess(
        synthetic_bundle_dir, tmp_path,
        command=[sys.executable, "-X", "importtime", "-m", "gruserve.runtime"],
    )
    try:
        target = child.wait_serving()
        with GruserveClient(target) as client:
            assert client.generate(user="u01", item="i02").token_ids
        child.proc.send_signal(signal.SIGINT)
        assert child.finish() == 0, "".join(child.stderr)
    finally:
        if child.proc.poll() is None:
            child.finish(0.1)
    modules = _imported_modules("".join(child.stderr))
    # the log was read: what serving does need is there
    assert {"onnxruntime", "grpc", "gruserve.runtime.server"} <= modules
    loaded = sorted({m.split(".")[0] for m in modules} & set(EXPORT_ONLY))
    assert not loaded, f"gruserve serve imported {loaded}"
