"""The documentation's examples against the code they describe."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gruserve.v1 import gruserve_pb2 as pb

from .serving import running_server

ROOT = Path(__file__).resolve().parent.parent


def _code_blocks(doc: str, language: str) -> list[str]:
    text = (ROOT / "docs" / doc).read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_grpcurl_sample_answer_uses_the_proto_field_names():
    """grpcurl prints the proto's names (request_id), not protobuf's camelCase JSON names."""
    (sample,) = [b for b in _code_blocks("api.md", "json") if "finish_reason" in b]
    answer = json.loads(sample)
    fields = {f.name for f in pb.GenerateResponse.DESCRIPTOR.fields}
    assert set(answer) <= fields
    assert set(answer["timing"]) <= {f.name for f in pb.Timing.DESCRIPTOR.fields}


def test_the_loadtest_python_example_runs():
    """Against the demo model (the embedded bundle), whose ids the example uses: run it for
    real, shortened."""
    from gruserve.runtime.demo import demo_bundle_dir

    (example,) = [b for b in _code_blocks("loadtest.md", "python") if "run_loadtest" in b]
    with running_server(demo_bundle_dir()) as server:
        code = example.replace("127.0.0.1:50051", server.target)
        code = code.replace("duration_s=30", "duration_s=0.5").replace("seconds=2", "seconds=0")
        assert code != example
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
    assert out.returncode == 0, out.stderr
    assert "{}" in out.stdout  # no errors by status code


def test_the_training_defaults_table_matches_the_cli_and_trainconfig():
    """docs/training.md lists what `gruserve train` starts from (DEMO_TRAIN) and what
    TrainConfig() defaults to; both columns must be the code's values."""
    pytest.importorskip("torch")
    from gruserve.export.demo import DEMO_TRAIN
    from gruserve.export.train import TrainConfig

    text = (ROOT / "docs" / "training.md").read_text()
    text = text.partition("| field | `gruserve train` default |")[2].partition("\n\n")[0]
    rows = re.findall(r"^\| ([a-z_, ]+) \| ([^|]+) \| ([^|]+) \| [^|]+ \|$", text, flags=re.M)
    seen = set()
    for names, cli_values, python_values in rows:
        names = [n.strip() for n in names.split(",")]
        for config, values in ((DEMO_TRAIN, cli_values), (TrainConfig(), python_values)):
            shown = [v.strip() for v in values.split(",")]
            assert shown == [str(getattr(config, n)) for n in names], (names, values)
        seen.update(names)
    assert seen == {f.name for f in dataclasses.fields(TrainConfig)}
