"""The embedded demo model: served from the installed package with no bundle given, and,
where the export extra is installed, exactly what its shipped checkpoint exports to."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gruserve.runtime.bundle import MANIFEST, load_bundle, sha256_file
from gruserve.runtime.client import GruserveClient
from gruserve.runtime.demo import DEMO_BUNDLE
from gruserve.v1 import gruserve_pb2 as pb

from .serving import ServeProcess

REPOSITORY = Path(__file__).resolve().parents[1]
# the repository's copy: the installed one (DEMO_BUNDLE) is the same in the editable full
# lane, and a copy made by `pip install .` in the torch-free lane
SHIPPED_CHECKPOINT = REPOSITORY / "runtime" / "demo_model" / "checkpoint.pt"
SHIPPED_BUNDLE = REPOSITORY / "runtime" / "demo_model" / "bundle"
# what a verify report holds that depends on when and where it ran, not on the bundle
RUN_FIELDS = ("created_at", "seconds", "bundle")


def test_gruserve_serve_without_a_bundle_answers_from_the_embedded_demo(tmp_path):
    """The installed `gruserve` script, as a user runs it: no bundle, no GRUSERVE_HOME."""
    script = Path(sys.executable).with_name("gruserve")
    child = ServeProcess(None, tmp_path, command=[str(script)])
    try:
        target = child.wait_serving()
        with GruserveClient(target) as client:
            info = client.model_info()
            reply = client.generate(user="u0001", item="i0002")
        child.proc.send_signal(signal.SIGINT)
        assert child.finish() == 0, "".join(child.stderr)
    finally:
        if child.proc.poll() is None:
            child.finish(0.1)
    bundle = load_bundle(DEMO_BUNDLE)
    assert info.model_name == "nrt-demo" and info.num_users == 200 and info.num_items == 100
    assert 0 < len(reply.token_ids) <= bundle.max_len
    assert reply.text == " ".join(bundle.vocab[t] for t in reply.token_ids)
    assert reply.finish_reason == pb.FINISH_REASON_EOS  # a trained tip ends by itself
    assert 1.0 <= reply.predicted_rating <= 5.0


def test_the_shipped_bundle_is_intact_and_was_verified():
    bundle = load_bundle(SHIPPED_BUNDLE)  # every listed file present, every hash right
    verify = bundle.manifest["verify"]
    assert verify["ok"] and verify["with_checkpoint"]
    assert verify["greedy"]["num_identical"] == verify["greedy"]["num_pairs"] >= 200
    # the installed copy (site-packages in the torch-free lane) is the repository's
    assert _hashes(DEMO_BUNDLE) == _hashes(SHIPPED_BUNDLE)


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in directory.iterdir()}


def _report_without_run_fields(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in RUN_FIELDS}


@pytest.mark.slow
def test_the_shipped_bundle_is_what_the_shipped_checkpoint_exports_to(tmp_path):
    pytest.importorskip("torch", reason="exporting needs the export extra")
    from gruserve.export.demo import export_demo_bundle

    fresh, report = export_demo_bundle(SHIPPED_CHECKPOINT, tmp_path / "bundle")
    shipped = json.loads((SHIPPED_BUNDLE / MANIFEST).read_text())
    rebuilt = json.loads((fresh / MANIFEST).read_text())
    # the same graphs, vocabulary and entities, byte for byte
    assert {r: g["sha256"] for r, g in rebuilt["graphs"].items()} == {
        r: g["sha256"] for r, g in shipped["graphs"].items()
    }
    assert rebuilt["files"] == shipped["files"]
    for key in ("model_config", "special_ids", "training", "precision", "opset"):
        assert rebuilt[key] == shipped[key], key
    # and the same parity report, figure for figure
    assert _report_without_run_fields(rebuilt["verify"]) == _report_without_run_fields(
        shipped["verify"]
    )
    assert report.ok


@pytest.mark.slow
def test_the_shipped_bundle_passes_gruserve_verify(tmp_path):
    pytest.importorskip("torch", reason="verify against the checkpoint needs the export extra")
    bundle = Path(shutil.copytree(SHIPPED_BUNDLE, tmp_path / "bundle"))  # verify only reads
    result = subprocess.run(
        [sys.executable, "-m", "gruserve.runtime", "verify", str(bundle),
         "--checkpoint", str(SHIPPED_CHECKPOINT)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout


def test_the_wheel_carries_the_demo_bundle_but_not_its_checkpoint(tmp_path):
    pytest.importorskip("setuptools", minversion="69", reason="builds a wheel offline")
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    source = tmp_path / "source"
    for name in ("export", "runtime", "protos"):
        shutil.copytree(REPOSITORY / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("gruserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in SHIPPED_BUNDLE.iterdir():
        assert f"gruserve/runtime/demo_model/bundle/{path.name}" in names
    assert not [n for n in names if n.endswith(".pt")]
