"""Checks that start a Ray of their own run beside the rest of the suite, from its first test.

A two-node cluster (test_serve_cluster, test_placement) and the CLI's own local Ray (test_cli) cannot share the
session's Ray, and each spends much of its time waiting (for nodes, replicas, health checks): measured over a whole
suite run here, 55-65% of the 2 cores while one of them ran, against 75-95% for the tests on the session's Ray. Their
assertions do not depend on the machine's load (exact tokens, where replicas land, what a lost node is answered);
``dynpart serve``'s (test_serve_run) do (which pool a short prompt goes to), so it runs alone, after them. So a module declares such a check as a command (``BACKGROUND``: test name -> how to
build its command from the session's models), the session starts every selected one as a subprocess at its first
test (``conftest.background_checks``), the modules that need no Ray run first, beside them, and the check's test reads
the finished process (``result``: waiting for it if it is still running, killing it past its timeout).

Each check gets a core-claims folder of its own (``placement/cores.py``): it pins its replicas as a fresh machine
would, whatever the session's replicas hold.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from placement.cores import CLAIMS_DIR_ENV

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Check:
    """A command to run in the background: what it runs, where, for how long at most."""

    argv: list[str]
    cwd: str
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)  # added to the session's environment


Builder = Callable[[SimpleNamespace], Check]  # the session's models (chat_tiny, tiny_models, smollm2) -> the check


class Running:
    """One check's process, its output going to files (a pipe nobody reads would block it)."""

    def __init__(self, name: str, check: Check, folder: Path):
        self.name, self.check, self.started = name, check, time.monotonic()
        self.out, self.err = open(folder / f"{name}.out", "w+"), open(folder / f"{name}.err", "w+")
        claims = tempfile.mkdtemp(prefix=f"dynpart-cores-{name}-", dir=folder)
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout's code
        env = {**os.environ, CLAIMS_DIR_ENV: claims, "RAY_ADDRESS": "", "PYTHONPATH": path, **check.env}
        self.proc = subprocess.Popen(check.argv, cwd=check.cwd, env=env, stdout=self.out, stderr=self.err,
                                     start_new_session=True)  # its own process group: a timeout kills all of it

    def result(self) -> subprocess.CompletedProcess:
        """The finished process (waited for up to its timeout from its start; then killed and raised)."""
        left = self.check.timeout_s - (time.monotonic() - self.started)
        try:
            code = self.proc.wait(timeout=max(1.0, left))
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        waited = time.monotonic() - self.started
        self.out.seek(0)
        self.err.seek(0)
        out, err = self.out.read(), self.err.read()
        print(f"background check {self.name}: exit {code} after {waited:.0f} s from the session's start")
        return subprocess.CompletedProcess(self.check.argv, code, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


class Checks:
    """The session's running checks, by test name."""

    def __init__(self, folder: Path):
        self.folder, self.running = folder, {}

    def start(self, name: str, check: Check) -> None:
        if name not in self.running:
            self.running[name] = Running(name, check, self.folder)

    def result(self, name: str) -> subprocess.CompletedProcess:
        return self.running.pop(name).result()

    def close(self) -> None:
        for run in self.running.values():
            run.kill()
        self.running.clear()
