"""What the distribution says about itself: its version (one literal, read by pyproject),
its license, and that it is typed."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import subprocess
import sys
from pathlib import Path

import pytest

import gruserve
from gruserve.runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_is_one_value_everywhere(capsys):
    # pyproject's dynamic version is read from gruserve.__version__: the installed
    # metadata must agree with the source
    assert gruserve.__version__ == importlib.metadata.version("gruserve")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gruserve {gruserve.__version__}"


def test_the_version_needs_no_runtime_dependency():
    """`import gruserve` alone (what packaging tools do) loads nothing heavy."""
    code = "import sys, gruserve; print(gruserve.__version__, 'grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [gruserve.__version__, "False"]


def test_license_is_apache_2_and_declared_as_spdx():
    metadata = importlib.metadata.metadata("gruserve")
    assert metadata["License-Expression"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the whole text, not a stub


def test_the_package_is_marked_typed():
    assert importlib.resources.files("gruserve").joinpath("py.typed").is_file()
