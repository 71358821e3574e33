"""Run `rewardtune.cli.main(argv)` inside the test process and capture what a user would see.

A forked or exec'd process per case costs a fork and a model import each; the fuzz and reliability
tests run hundreds of cases, so they call `main` directly. What a separate process would show is
reproduced: stdout, stderr (including log records, which `main` sends to stderr), the exit status
(argparse's SystemExit included), and an escaping exception as what Python would print and return
(a traceback on stderr, exit status 1).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import traceback
from collections.abc import Iterator, Mapping

from tests.cli_runner import CliResult


@contextlib.contextmanager
def _env(changes: Mapping[str, str | None]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in changes}
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_main(argv: list[str], env: Mapping[str, str | None] | None = None) -> CliResult:
    """`rewardtune ARGV` in this process; returns (exit status, stdout, stderr) like a subprocess would."""
    from accelerate.state import AcceleratorState

    from rewardtune.cli import main

    # a process starts without accelerate's singleton state: a case with another mixed_precision than the last
    # one's must not meet "AcceleratorState has already been initialized" (accelerate's own tests reset it so)
    AcceleratorState._reset_state(reset_partial_state=True)
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with _env(env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # what the interpreter would do with an escaping exception
                err.write(traceback.format_exc())
                code = 1
    finally:
        root.removeHandler(handler)
    return CliResult(code, out.getvalue(), err.getvalue())
