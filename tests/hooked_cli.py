"""``ggufmoe`` with test hooks installed, for tests that act on a run at a known point (run as a script:
``python tests/hooked_cli.py ARGS...``; :func:`cli_run.cli_command` picks it when a hook is set).

The production code calls hooks that do nothing (:func:`ggufmoe.gguf.writer.tensor_recorded`,
:func:`ggufmoe.stats.layer_pass.layer_half_done`); this launcher replaces them from its environment:

- ``GGUFMOE_TEST_WAIT_AFTER=N`` and ``GGUFMOE_TEST_WAIT_FDS=READY,GO`` (two pipe ends the test passes on):
  once the N-th tensor is complete and recorded, write a byte to READY and block reading GO. The test, blocked
  reading READY until then, sends SIGINT/SIGTERM, fills the disk or runs a second command meanwhile, then
  writes to GO (or closes it); a signal raises here, between two complete tensors, as in a real run. No
  polling and no clock: each side blocks on a pipe, and a side that dies closes its ends.
- ``GGUFMOE_TEST_INTERRUPT_LAYER=N``: SIGINT in the middle of decoder layer N of a streamed calibration.
"""

from __future__ import annotations

import os
import signal
import sys

WAIT_AFTER, WAIT_FDS = "GGUFMOE_TEST_WAIT_AFTER", "GGUFMOE_TEST_WAIT_FDS"
INTERRUPT_LAYER = "GGUFMOE_TEST_INTERRUPT_LAYER"
HOOKS = (WAIT_AFTER, WAIT_FDS, INTERRUPT_LAYER)


def pause(ready: int, go: int) -> None:
    """Say so on ``ready``, then wait for a byte (or the end) on ``go``."""
    os.write(ready, b"r")
    os.close(ready)
    os.read(go, 1)


def install(env: dict[str, str]) -> None:
    if env.get(WAIT_AFTER) and env.get(WAIT_FDS):
        from ggufmoe.gguf import writer

        after = int(env[WAIT_AFTER])
        ready, go = map(int, env[WAIT_FDS].split(","))
        writer.tensor_recorded = lambda done: pause(ready, go) if done == after else None
    if env.get(INTERRUPT_LAYER):
        from ggufmoe.stats import layer_pass  # torch: only for the runs that calibrate

        layer = int(env[INTERRUPT_LAYER])
        layer_pass.layer_half_done = lambda k: signal.raise_signal(signal.SIGINT) if k == layer else None


if __name__ == "__main__":
    install(dict(os.environ))
    from ggufmoe.cli import main

    sys.argv[0] = "ggufmoe"
    main()
