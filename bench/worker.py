"""The JSON-lines protocol between bench/serve.py and its worker processes (the load clients
and the raw loop): one command per line on the worker's stdin, one reply per line on its
stdout. Workers live for the whole run, so no point pays for a Python start and its imports.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path


def serve_commands(handle: Callable[[dict], dict]) -> None:
    """The worker side: answers commands until stdin closes; a failed command answers
    {"error": ...} (the traceback goes to stderr, the worker's log) and the worker goes on."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = handle(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


class WorkerError(RuntimeError):
    pass


class Worker:
    """The parent side: starts `cmd`, waits for its ready line; ask() sends a command."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict | None = None,
                 start_timeout_s: float = 120.0) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=env)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._read(start_timeout_s)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _read(self, timeout_s: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise WorkerError(f"{self.name}: no answer within {timeout_s:.0f} s; see "
                              f"{self.log_path}") from None
        if line is None:
            raise WorkerError(f"{self.name} exited; see {self.log_path}")
        return json.loads(line)

    def ask(self, command: dict, timeout_s: float = 600.0) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        reply = self._read(timeout_s)
        if "error" in reply:
            raise WorkerError(f"{self.name}: {reply['error']} (see {self.log_path})")
        return reply

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._log.close()
