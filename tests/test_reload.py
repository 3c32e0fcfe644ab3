"""Reload without dropping a request: SIGHUP (or GruServer.reload) loads the bundle directory
again; new requests go to the new engine, in-flight ones finish on the old, which then stops;
a bad bundle is refused and the old one keeps serving."""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path

import grpc
import pytest

from gruserve.runtime.client import GruserveClient, build_request

from .serving import ServeProcess, StepGate, running_server, wait_for

LONG = 30


def _variant(src: Path, dst: Path, name: str) -> Path:
    """A copy of a bundle whose manifest differs (so does its version), same weights."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["model_name"] = name
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def _corrupted(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    step = dst / "decoder_step.onnx"
    data = bytearray(step.read_bytes())
    data[len(data) // 2] ^= 0xFF
    step.write_bytes(bytes(data))
    return dst


def _point(link: Path, target: Path) -> None:
    """Atomically repoints a symlink, the way a deployment swaps a bundle directory."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


class ClosedLoop:
    """Threads sending Generate and GenerateStream back to back until stopped; records every
    outcome."""

    def __init__(self, target: str, pair: dict, num_threads: int = 6) -> None:
        self.target, self.pair = target, pair
        self.stop = threading.Event()
        self.tokens: list[tuple[int, ...]] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(num_threads)]

    def _run(self, index: int) -> None:
        with GruserveClient(self.target, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    if index % 2:
                        chunks = list(client.stream(**self.pair, max_tokens=12, min_tokens=12))
                        tokens = tuple(t for c in chunks for t in c.token_ids)
                    else:
                        tokens = tuple(
                            client.generate(**self.pair, max_tokens=12, min_tokens=12).token_ids
                        )
                    self.tokens.append(tokens)
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> ClosedLoop:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def _version(target: str) -> str:
    with GruserveClient(target) as client:
        return client.model_info().bundle_version


def test_sighup_reloads_under_load_without_a_failed_request(
    synthetic_bundle_dir, synthetic_bundle, tmp_path
):
    v1 = _variant(synthetic_bundle_dir, tmp_path / "v1", "tips-v1")
    v2 = _variant(synthetic_bundle_dir, tmp_path / "v2", "tips-v2")
    bad = _corrupted(v2, tmp_path / "bad")
    current = tmp_path / "current"
    _point(current, v1)
    pair = {"user": synthetic_bundle.users[0], "item": synthetic_bundle.items[0]}
    child = ServeProcess(current, tmp_path, "--num-slots", "8")
    try:
        target = child.wait_serving()
        first = _version(target)
        versions = {v1: first}
        with ClosedLoop(target, pair) as load:
            wait_for(lambda: len(load.tokens) >= 10, "the load to run")
            # back and forth several times: each switch races requests in flight
            for target_dir in (v2, v1, v2, v1, v2):
                before = len(load.tokens)
                _point(current, target_dir)
                child.proc.send_signal(signal.SIGHUP)
                if target_dir in versions:
                    wait_for(lambda d=target_dir: _version(target) == versions[d], "reload")
                else:
                    wait_for(lambda: _version(target) != first, "reload")
                    versions[target_dir] = _version(target)
                wait_for(lambda b=before: len(load.tokens) >= b + 10, "requests after reload")
            served = _version(target)
            # a corrupted bundle is refused: the old one keeps serving, nothing fails
            _point(current, bad)
            child.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload refused" in "".join(child.stderr), "the refusal")
            before = len(load.tokens)
            wait_for(lambda: len(load.tokens) >= before + 10, "requests after the refusal")
            assert _version(target) == served
        assert load.errors == []
        assert len(set(load.tokens)) == 1  # same weights: every answer is the same tip
        assert versions[v1] != versions[v2]
        child.proc.send_signal(signal.SIGTERM)
        assert child.finish() == 0, "".join(child.stderr)
    finally:
        if child.proc.poll() is None:
            child.finish(0.1)
    log = "".join(child.stderr)
    assert "Traceback" not in log
    assert log.count("reloaded ") == 5
    refusal = [line for line in log.splitlines() if "reload refused" in line]
    assert len(refusal) == 1 and "decoder_step.onnx" in refusal[0] and "sha256" in refusal[0]


def test_in_flight_requests_finish_on_the_old_engine_which_then_stops(
    synthetic_bundle_dir, synthetic_bundle, tmp_path
):
    v2 = _variant(synthetic_bundle_dir, tmp_path / "v2", "tips-v2")
    pair = {"user": synthetic_bundle.users[0], "item": synthetic_bundle.items[0]}
    with running_server(synthetic_bundle_dir, num_slots=4) as server:
        old = server.engine
        with GruserveClient(server.target) as client, StepGate(old) as gate:
            call = client.stub.Generate.future(
                build_request(**pair, max_tokens=LONG, min_tokens=LONG), timeout=60
            )
            gate.wait_blocked()  # the long request is inside the old engine
            assert server.call(server.server.reload(v2)) is True
            assert server.engine is not old
            # new requests are answered by the new engine while the old one is held
            assert client.model_info().model_name == "tips-v2"
            assert len(client.generate(**pair).token_ids) > 0
            assert old.healthy and old.num_in_flight == 1
            gate.open()
            assert len(call.result().token_ids) == LONG  # finished where it started
        wait_for(lambda: not old.healthy, "the replaced engine to stop")
        assert server.engine.healthy
        # the same directory again: nothing changes
        assert server.call(server.server.reload(v2)) is False


@pytest.mark.parametrize("damage", ["missing", "not a bundle"])
def test_a_bad_directory_is_refused_and_the_old_bundle_serves(
    synthetic_bundle_dir, synthetic_bundle, tmp_path, damage, caplog
):
    path = tmp_path / "nowhere"
    if damage == "not a bundle":
        path.mkdir()
        (path / "manifest.json").write_text("{}")
    with running_server(synthetic_bundle_dir, num_slots=2) as server:
        engine, version = server.engine, server.server.bundle.version
        assert server.call(server.server.reload(path)) is False
        assert server.engine is engine and engine.healthy
        with GruserveClient(server.target) as client:
            assert client.model_info().bundle_version == version
    assert any("reload refused" in r.getMessage() for r in caplog.records)
