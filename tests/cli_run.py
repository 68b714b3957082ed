"""Running the installed `ggufmoe` command as a user would, and checking its one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

from hooked_cli import HOOKS

GGUFMOE = str(Path(sys.executable).with_name("ggufmoe"))
HOOKED = [sys.executable, str(Path(__file__).with_name("hooked_cli.py"))]


def cli_command(env: dict | None = None) -> list[str]:
    """The installed ``ggufmoe``, or the launcher that installs the test hooks when ``env`` sets one of them."""
    return HOOKED if env and any(k in env for k in HOOKS) else [GGUFMOE]


def run(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``ggufmoe ARGS``, with ``env`` added to the environment (test hooks included: :mod:`hooked_cli`)."""
    return subprocess.run([*cli_command(env), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 1, one `error:` line on stderr holding every one of ``words``, no traceback."""
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
