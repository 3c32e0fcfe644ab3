"""What the distribution says about itself: its version (one literal, read by pyproject),
its license, and that it is typed."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import shutil
import subprocess
import sys
import zipfile
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


def _setuptools_at_least(major: int) -> bool:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return int(version.split(".")[0]) >= major


def test_the_wheel_builds_from_what_the_image_copies(tmp_path):
    """The Dockerfile builds the wheel from the files it COPYs (the .dockerignore lets in
    nothing else): they must be enough, LICENSE and the gruserve package root included."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    wheel_stage = dockerfile.split("FROM ", 2)[1]  # the first stage builds the wheel
    copied = [
        name.rstrip("/") for line in wheel_stage.splitlines() if line.startswith("COPY ")
        for name in line.split()[1:-1]
    ]
    assert "LICENSE" in copied
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert set(copied) <= allowed
    source = tmp_path / "src"
    for name in copied:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    # pyproject asks setuptools>=77 (SPDX license expressions): with an older one here, pip
    # builds in isolation, fetching it as the image's build does
    isolation = ["--no-build-isolation"] if _setuptools_at_least(77) else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
         "--wheel-dir", str(tmp_path / "wheels"), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "wheels").glob("gruserve-*.whl")
    assert wheel.name.startswith(f"gruserve-{gruserve.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"gruserve/__init__.py", "gruserve/py.typed", "gruserve/runtime/server.py",
            "gruserve/v1/gruserve_pb2.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
