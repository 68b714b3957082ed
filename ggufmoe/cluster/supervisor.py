"""A command with ``--ray`` runs in a child process this one waits for. Ray ends a driver whose cluster went away at
once (its raylet or head gone: the process exits with no Python code run), which would end the command with no word
of what happened; the parent then says it in one line, and that the work done is kept for ``--resume`` (a
conversion's complete tensors, a calibration's complete shares and layers, a sweep's finished points)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = "GGUFMOE_RAY_CHILD"  # set in the child: the file its own end is recorded in


def wants_ray(args: list[str]) -> bool:
    return any(a == "--ray" or a.startswith("--ray=") for a in args)


def supervised() -> bool:
    """Whether this process is the child of :func:`run_in_child`."""
    return CHILD in os.environ


def ended() -> None:
    """This process ends by itself (having said why, when it fails): recorded for the parent."""
    if CHILD in os.environ:
        try:
            Path(os.environ[CHILD]).touch()
        except OSError:  # a process that inherited the variable from a command long gone
            pass


def run_in_child() -> int:
    """This process's command line run again in a child process (with the files this process was handed); its exit
    code. Ctrl-C reaches the child (the terminal's process group), SIGTERM is handed on to it."""
    with tempfile.TemporaryDirectory(prefix="ggufmoe-ray-") as tmp:
        marker = Path(tmp) / "ended"
        child = subprocess.Popen(sys.orig_argv, env={**os.environ, CHILD: str(marker)}, close_fds=False)
        signal.signal(signal.SIGINT, lambda *_: None)  # the child has it too, and ends as it does without --ray
        signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        code = child.wait()
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        code = 128 - code if code < 0 else code
        if not marker.exists():
            print(f"error: the command ended without finishing ({how}; Ray ends a command whose cluster went away); "
                  "what was complete is kept: run the same command with --resume to continue", file=sys.stderr)
            return code or 1
        return code
