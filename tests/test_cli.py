"""The command line as operators use it: help texts, and clear one-line refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gruserve.runtime.cli import main

COMMANDS = [
    "serve", "generate", "rank", "info", "loadtest", "train", "export", "verify", "evaluate",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"gruserve {command}" in out
    assert "--" in out  # it documents options


def _serve(bundle_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gruserve.runtime", "serve", str(bundle_dir), "--port", "0",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )


def test_serve_refuses_a_bundle_with_a_missing_file(synthetic_bundle_dir, tmp_path):
    broken = shutil.copytree(synthetic_bundle_dir, tmp_path / "bundle")
    (broken / "decoder_step.onnx").unlink()
    result = _serve(broken)
    assert result.returncode == 2
    assert "decoder_step.onnx" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_altered_bundle_file(synthetic_bundle_dir, tmp_path):
    broken = shutil.copytree(synthetic_bundle_dir, tmp_path / "bundle")
    vocab = broken / "vocab.json"
    words = json.loads(vocab.read_text())
    words[10] = "tampered"
    vocab.write_text(json.dumps(words))
    result = _serve(broken)
    assert result.returncode == 2
    assert "vocab.json" in result.stderr and "sha256" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_directory_that_is_no_bundle(tmp_path):
    result = _serve(tmp_path)
    assert result.returncode == 2
    assert "manifest.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_prints_a_table_or_json(tiny_checkpoint, tmp_path, capsys):
    from gruserve.export.synthetic import SyntheticSpec, write_synthetic_corpus

    from .conftest import TINY_SPEC

    write_synthetic_corpus(tmp_path / "data", SyntheticSpec(**TINY_SPEC))
    _, checkpoint_path = tiny_checkpoint
    args = ["evaluate", str(checkpoint_path), "--data", str(tmp_path / "data")]
    assert main([*args, "--out", str(tmp_path / "eval")]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and not table.lstrip().startswith("{")
    assert (tmp_path / "eval" / "metrics.json").is_file()
    assert main([*args, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["fmr"] <= 1 and metrics["perplexity"] > 1


def test_serve_given_a_checkpoint_says_so_and_how_to_export_it(capsys):
    # the demo model's own checkpoint, kept in the repository (torch is not needed to tell)
    checkpoint_path = Path(__file__).resolve().parent.parent / "runtime/demo_model/checkpoint.pt"
    assert checkpoint_path.is_file()
    assert main(["serve", str(checkpoint_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "training checkpoint" in err
    assert f"gruserve export {checkpoint_path} --out" in err


def test_a_bad_stop_id_list_names_the_flag_and_the_item(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--user", "u", "--item", "i", "--stop-ids", "1,x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --stop-ids: not a comma-separated list of token ids: 'x'" in err
    assert "<lambda>" not in err
