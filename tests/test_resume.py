"""convert --resume: an interrupted conversion continues where it stopped and gives the very file an
uninterrupted run gives; the interruption leaves no output file, only the state kept for --resume.

Nothing here depends on timing: the writer's hook, installed by tests/hooked_cli.py
(``GGUFMOE_TEST_WAIT_AFTER``/``_FDS``), pauses a run after a known number of complete tensors on a pipe, and
the test acts (a real SIGINT or SIGTERM, a full disk, a second run) while it waits."""

import contextlib
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

import tiny_models
from cli_run import GGUFMOE, assert_one_line_error, cli_command, run
from hooked_cli import WAIT_AFTER, WAIT_FDS
from ggufmoe.gguf.writer import Progress
from test_robustness import tmpfs

# IQ3_S on one thread: several seconds, many tensors.
ARGS = ("--type", "IQ3_S", "--threads", "1", "-q")
TIMEOUT = 300  # generous: for a loaded machine, never reached by a working run


def convert_args(out: Path, split: str | None) -> list:
    return ["convert", tiny_models.REF_MODEL, "-o", out, *ARGS, *(["--split-max-size", split] if split else [])]


def run_paused(args: list, action: Callable[[subprocess.Popen], None], after: int = 3) -> subprocess.CompletedProcess:
    """Run ``args``; once exactly ``after`` tensors are complete and recorded, the writer waits: do
    ``action`` to the waiting process, then let it go on. Both sides block on pipes (no polling, no clock)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    hooks = {WAIT_AFTER: str(after), WAIT_FDS: f"{ready_w},{go_r}"}
    try:
        proc = subprocess.Popen([*cli_command(hooks), *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, **hooks},
                                pass_fds=(ready_w, go_r))
    finally:
        os.close(ready_w)  # the child holds its own copies: ready reads the end when it exits
        os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"r":  # the end of the pipe: the child exited before the pause
            out, err = proc.communicate()
            pytest.fail(f"exited ({proc.returncode}) before {after} tensors were complete: {err}")
        action(proc)
        with contextlib.suppress(BrokenPipeError):  # the action may have ended the process (a cluster gone)
            os.write(go_w, b"g")
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        for fd in (ready_r, go_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def gguf_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.gguf"))}


@pytest.mark.parametrize("split, sig", [(None, signal.SIGINT), ("5M", signal.SIGTERM)])
def test_interrupted_conversion_resumes_to_the_identical_file(tmp_path, split, sig):
    (tmp_path / "full").mkdir()
    (tmp_path / "part").mkdir()
    assert run(*convert_args(tmp_path / "full" / "m.gguf", split)).returncode == 0
    full = gguf_files(tmp_path / "full")
    assert len(full) == 1 if split is None else len(full) >= 2

    out = tmp_path / "part" / "m.gguf"
    state = tmp_path / "part" / ".m.gguf.partial"
    proc = run_paused(convert_args(out, split), lambda p: p.send_signal(sig))  # a real signal, after tensor 3
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("interrupted: ") and "--resume" in lines[0] and str(state) in lines[0]
    kept = Progress.load(state)
    assert kept is not None and kept.tensors == 3
    assert gguf_files(tmp_path / "part") == {}, "no output file before the conversion is complete"

    # without --resume the kept work is neither lost nor overwritten
    assert_one_line_error(run(*convert_args(out, split)), "--resume", str(state))
    # other settings do not continue it either
    assert_one_line_error(run(*convert_args(out, split), "--resume", "--type", "Q8_0"), "another source, plan")
    assert Progress.load(state) == kept

    proc = run(*convert_args(out, split), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming: {kept.tensors} of " in proc.stderr
    assert gguf_files(tmp_path / "part") == full
    assert not state.exists()


def read_until(proc: subprocess.Popen, word: bytes) -> bytes:
    """What ``proc`` writes on stderr up to and including ``word`` (progress bars end no lines)."""
    fd, seen = proc.stderr.fileno(), b""
    deadline = time.monotonic() + TIMEOUT
    while word not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            pytest.fail(f"no {word!r} on stderr within {TIMEOUT} s: {seen!r}")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            proc.wait()
            pytest.fail(f"exited ({proc.returncode}) before {word!r}: {seen.decode(errors='replace')}")
        seen += chunk
    return seen


def test_interrupt_before_any_tensor_leaves_nothing(tmp_path):
    """Ctrl-C while the budget run is still calibrating: no statistics, plan or output are left."""
    proc = subprocess.Popen([GGUFMOE, "convert", str(tiny_models.REF_MODEL), "-o", str(tmp_path / "m.gguf"),
                             "--budget", "112MiB", "--ctx", "1024", "--calib", str(tiny_models.TEST_DATA / "calib.txt")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # the streamed calibration draws its first layer's bar as that layer starts; the layer runs many
        # seconds on calib.txt, and nothing is kept before it is complete
        seen = read_until(proc, b"layer 1/")
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = (seen + rest).decode(errors="replace")
    lines = err.replace("\r", "\n").strip().splitlines()
    assert proc.returncode == 130 and lines[-1] == "interrupted" and "Traceback" not in err, err
    assert not any(line.startswith(("error", "interrupted: ")) for line in lines), err
    assert "convert:" not in err, "interrupted while calibrating, before converting"
    assert list(tmp_path.iterdir()) == []


def test_resume_without_kept_state_converts_normally(tmp_path):
    proc = run("convert", tiny_models.REF_MODEL, "-o", tmp_path / "m.gguf", "--type", "Q8_0", "-q", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" not in proc.stderr and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_disk_filled_during_conversion_then_resumed(tmp_path):
    """Someone else fills the disk mid-conversion: one line, the complete tensors kept; space freed, --resume."""
    (tmp_path / "full").mkdir()
    assert run(*convert_args(tmp_path / "full" / "m.gguf", None)).returncode == 0
    full = gguf_files(tmp_path / "full")
    size = len(full["m.gguf"])
    with tmpfs(tmp_path / "disk", f"{size // 1024 + 2048}k") as disk:
        out, state, filler = disk / "m.gguf", disk / ".m.gguf.partial", disk / "filler"

        def fill_disk(_):
            with open(filler, "wb") as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(bytes(1 << 20))
                        f.flush()

        proc = run_paused(convert_args(out, None), fill_disk)  # full after tensor 3
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "No space left on device" in lines[0] and "--resume" in lines[0], lines[0]
        assert not out.exists() and Progress.load(state).tensors == 3
        filler.unlink()
        proc = run(*convert_args(out, None), "--resume")
        assert proc.returncode == 0, proc.stderr
        assert gguf_files(disk) == full and not state.exists()


@pytest.mark.parametrize("resume", [False, True])
def test_second_conversion_to_the_same_output_is_refused_while_the_first_runs(tmp_path, resume):
    out = tmp_path / "m.gguf"
    second = []
    first = run_paused(convert_args(out, None),  # the second runs while the first waits after tensor 1
                       lambda _: second.append(run(*convert_args(out, None), *(["--resume"] if resume else []))),
                       after=1)
    assert_one_line_error(second[0], "another ggufmoe is writing", str(out))
    assert first.returncode == 0, first.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
