"""``ggufmoe`` with test hooks installed, for tests that act on a run at a known point (run as a script:
``python tests/hooked_cli.py ARGS...``; :func:`cli_run.cli_command` picks it when a hook is set).

The production code calls hooks that do nothing (:func:`ggufmoe.gguf.writer.tensor_recorded`,
:func:`ggufmoe.stats.layer_pass.layer_half_done`); this launcher replaces them from its environment:

- ``GGUFMOE_TEST_WAIT_AFTER=N`` and ``GGUFMOE_TEST_WAIT_FILE=PATH``: once the N-th tensor is complete and
  recorded, create ``PATH.ready`` and wait until PATH exists. The test sends SIGINT/SIGTERM, or fills the disk,
  meanwhile, then creates PATH; a signal raises here, between two complete tensors, as in a real run.
- ``GGUFMOE_TEST_INTERRUPT_LAYER=N``: SIGINT in the middle of decoder layer N of a streamed calibration.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

WAIT_AFTER, WAIT_FILE = "GGUFMOE_TEST_WAIT_AFTER", "GGUFMOE_TEST_WAIT_FILE"
INTERRUPT_LAYER = "GGUFMOE_TEST_INTERRUPT_LAYER"
HOOKS = (WAIT_AFTER, WAIT_FILE, INTERRUPT_LAYER)
WAIT_DEADLINE = 600.0  # against a test that never opens the gate: not a timing assumption


def wait_for(gate: Path) -> None:
    gate.with_name(gate.name + ".ready").touch()
    deadline = time.monotonic() + WAIT_DEADLINE
    while not gate.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{gate} did not appear within {WAIT_DEADLINE:.0f} s")
        time.sleep(0.01)


def install(env: dict[str, str]) -> None:
    if env.get(WAIT_AFTER) and env.get(WAIT_FILE):
        from ggufmoe.gguf import writer

        after, gate = int(env[WAIT_AFTER]), Path(env[WAIT_FILE])
        writer.tensor_recorded = lambda done: wait_for(gate) if done == after else None
    if env.get(INTERRUPT_LAYER):
        from ggufmoe.stats import layer_pass  # torch: only for the runs that calibrate

        layer = int(env[INTERRUPT_LAYER])
        layer_pass.layer_half_done = lambda k: signal.raise_signal(signal.SIGINT) if k == layer else None


if __name__ == "__main__":
    install(dict(os.environ))
    from ggufmoe.cli import main

    sys.argv[0] = "ggufmoe"
    main()
