"""One configuration: defaults declared once, flags and GRUSERVE_* variables derived from
them, bad values refused with one line naming the flag."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from gruserve.runtime import cli
from gruserve.runtime.cli_config import config_from_args
from gruserve.runtime.client import GruserveClient
from gruserve.runtime.config import (
    ConfigError,
    SchedulerConfig,
    ServerConfig,
    env_of,
    flag_of,
    sections,
)

from .serving import running_server


def parse(argv, environ=None):
    args = cli.build_parser().parse_args(["serve", *argv])
    return config_from_args(args, environ={} if environ is None else environ)


def every_setting():
    for name, cls in sections().items():
        for f in dataclasses.fields(cls):
            if f.metadata["setting"].cli:
                yield name, f


def test_no_flags_and_no_environment_give_the_declared_defaults():
    assert parse([]) == ServerConfig()


def test_every_setting_has_a_flag_and_a_variable_named_after_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for _, f in every_setting():
        flag = flag_of(f)
        assert flag in help_text, flag
        assert env_of(flag) in help_text, env_of(flag)
    assert "flag > environment > default" in help_text


def test_the_knobs_that_were_unreachable_reach_the_config():
    config = parse([
        "--max-batch-size", "8", "--max-admit-per-step", "3", "--max-stop-tokens", "2",
        "--max-beams", "5", "--device-id", "1", "--num-slots", "16",
    ])
    assert config.scheduler == SchedulerConfig(
        num_slots=16, max_batch_size=8, max_admit_per_step=3, max_stop_tokens=2, max_beams=5
    )
    assert config.session.device_id == 1


def test_flag_beats_environment_beats_default():
    env = {"GRUSERVE_NUM_SLOTS": "12", "GRUSERVE_GRACE": "2.5", "GRUSERVE_CUDA_GRAPHS": "yes",
           "GRUSERVE_MAX_TOKENS_LIMIT": ""}  # empty counts as unset
    config = parse([], env)
    assert config.scheduler.num_slots == 12
    assert config.lifecycle.grace_s == 2.5
    assert config.session.cuda_graphs is True
    assert config.scheduler.max_tokens == SchedulerConfig().max_tokens
    config = parse(["--num-slots", "20", "--no-cuda-graphs"], env)
    assert config.scheduler.num_slots == 20 and config.session.cuda_graphs is False


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-queued", "0"], {}, "--max-queued: must be >= 1, got 0"),
        (["--port", "70000"], {}, "--port: must be <= 65535, got 70000"),
        (["--port", "-1"], {}, "--port: must be >= 0, got -1"),
        (["--metrics-port", "70000"], {}, "--metrics-port: must be <= 65535"),
        (["--grace", "-5"], {}, "--grace: must be >= 0"),
        (["--grace", "nan"], {}, "--grace: must be a finite number, got nan"),
        (["--shutdown-delay", "-1"], {}, "--shutdown-delay: must be >= 0, got -1"),
        (["--shutdown-delay", "inf"], {}, "--shutdown-delay: must be a finite number"),
        ([], {"GRUSERVE_SHUTDOWN_DELAY": "-2"}, "--shutdown-delay: must be >= 0, got -2 (from"),
        (["--threads", "-3"], {}, "--threads: must be >= 0"),
        (["--num-slots", "4", "--max-batch-size", "5"], {}, "--max-batch-size: must be at most"),
        ([], {"GRUSERVE_NUM_SLOTS": "0"}, "--num-slots: must be >= 1, got 0 (from $GRUSERVE_NUM_"),
        ([], {"GRUSERVE_NUM_SLOTS": "many"}, "--num-slots: not an integer: 'many' (from $GRUS"),
        ([], {"GRUSERVE_WARMUP": "maybe"}, "--warmup: not a boolean"),
        (["--tls-key", "k.pem"], {}, "--tls-cert: TLS needs both"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(argv, env, message, capsys, monkeypatch):
    with pytest.raises(ConfigError) as info:
        parse(argv, env)
    assert str(info.value).startswith(message), str(info.value)
    # and on the command line: exit 2, one line, no traceback
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_a_flag_that_does_not_parse_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["serve", "--num-slots", "x"])
    assert info.value.code == 2
    assert "--num-slots: not an integer: 'x'" in capsys.readouterr().err


def test_overrides_find_the_section_and_refuse_unknown_names():
    config = ServerConfig().with_overrides(num_slots=8, port=0, warmup=False)
    assert (config.scheduler.num_slots, config.transport.port) == (8, 0)
    assert config.lifecycle.warmup is False
    with pytest.raises(TypeError, match="no setting 'slots'"):
        ServerConfig().with_overrides(slots=8)


def test_limits_set_by_configuration_reach_the_served_api(synthetic_bundle_dir):
    with running_server(synthetic_bundle_dir, max_beams=2, max_stop_tokens=1, max_tokens=20) as s:
        with GruserveClient(s.target) as client:
            info = client.model_info()
            assert (info.max_beams, info.max_stop_tokens, info.max_tokens) == (2, 1, 20)
            pair = dict(user=s.bundle.users[0], item=s.bundle.items[0])
            assert client.generate(**pair, strategy="beam", num_beams=2).token_ids
            for kwargs, field in (
                (dict(strategy="beam", num_beams=3), "parameters.num_beams"),
                (dict(stop_token_ids=[4, 5]), "parameters.stop_token_ids"),
                (dict(max_tokens=21), "parameters.max_tokens"),
            ):
                with pytest.raises(grpc.RpcError) as error:
                    client.generate(**pair, **kwargs)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert error.value.details().startswith(f"{field}: ")


def test_the_engine_layer_imports_neither_onnxruntime_nor_grpc():
    """Engine, core, scheduler and validation speak plain dataclasses: a fresh interpreter
    that imports them has loaded no ORT, gRPC or protobuf code."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import gruserve.runtime.engine, gruserve.runtime.core, gruserve.runtime.request_builder\n"
        "banned = ('onnxruntime', 'grpc', 'google.protobuf', 'torch')\n"
        "print([m for m in banned if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
