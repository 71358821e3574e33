"""Run the `rewardtune` CLI as real, separate processes without paying torch's import for each one.

`python -m rewardtune.cli` spends ~10 s importing torch/diffusers before doing anything; the fault and
bad-input tests start dozens of processes. So `run_cli` forks each one from a multiprocessing
forkserver that imported those modules once (and never ran a torch op, so forking is safe): every run
is still its own process with its own stdout/stderr file descriptors, its own environment and exit
status, and can be SIGKILLed without touching pytest. `run_cli_exec` is the plain `python -m` path.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PRELOAD = ["rewardtune.cli", "rewardtune.trainer", "rewardtune.evaluate", "rewardtune.report", "tests.cli_runner"]
_context: multiprocessing.context.ForkServerContext | None = None


@dataclass
class CliResult:
    returncode: int  # negative: killed by that signal (as subprocess reports it)
    stdout: str
    stderr: str

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def _ctx() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(argv: list[str], env: dict[str, str | None], cwd: str, out: str, err: str) -> None:
    """Entry point of a forked run: its own fds 1/2, environment and cwd, then exactly what `main` does."""
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.chdir(cwd)
    from rewardtune.cli import main

    sys.exit(main(argv))  # an uncaught exception prints its traceback to fd 2 and exits 1, as python does


class RunningCli:
    """A forked `rewardtune` run in progress; `stderr_so_far()` lets a test react to what it logs."""

    def __init__(self, argv: list[str], env: Mapping[str, str | None] | None, cwd: str | Path | None) -> None:
        self.argv = list(argv)
        self._tmp = tempfile.TemporaryDirectory(prefix="rt-cli-")
        self.out, self.err = os.path.join(self._tmp.name, "stdout"), os.path.join(self._tmp.name, "stderr")
        self.process = _ctx().Process(target=_child, args=(self.argv, dict(env or {}), str(cwd or os.getcwd()), self.out, self.err))
        self.process.start()

    def stderr_so_far(self) -> str:
        return Path(self.err).read_text() if os.path.exists(self.err) else ""

    def wait(self, timeout: float = 300) -> CliResult:
        try:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
                raise TimeoutError(f"rewardtune {' '.join(self.argv)} ran longer than {timeout} s")
            return CliResult(self.process.exitcode, Path(self.out).read_text(), Path(self.err).read_text())
        finally:
            self._tmp.cleanup()


def start_cli(argv: list[str], env: Mapping[str, str | None] | None = None, cwd: str | Path | None = None) -> RunningCli:
    """`rewardtune ARGV` in a forked process, not waited for."""
    return RunningCli(argv, env, cwd)


def run_cli(argv: list[str], env: Mapping[str, str | None] | None = None, cwd: str | Path | None = None,
            timeout: float = 300) -> CliResult:
    """`rewardtune ARGV` in a forked process; env values of None unset that variable."""
    return start_cli(argv, env, cwd).wait(timeout)


def cli_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "rewardtune.cli", *argv]


def exec_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """os.environ plus `env`, with this interpreter's sys.path so the package under test is the one imported."""
    merged = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def run_cli_exec(argv: list[str], env: Mapping[str, str | None] | None = None, timeout: float = 300) -> CliResult:
    """`python -m rewardtune.cli ARGV` as a fresh interpreter (slow: a full import)."""
    proc = subprocess.run(cli_command(argv), env=exec_env(env), capture_output=True, text=True, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)
