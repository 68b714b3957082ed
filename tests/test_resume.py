"""convert --resume: an interrupted conversion continues where it stopped and gives the very file an
uninterrupted run gives; the interruption leaves no output file, only the state kept for --resume."""

import contextlib
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

import tiny_models
from cli_run import GGUFMOE, assert_one_line_error, run
from ggufmoe.gguf_out import Progress
from test_robustness import tmpfs

# IQ3_S on one thread: slow enough (several seconds) to interrupt between tensors.
ARGS = ("--type", "IQ3_S", "--threads", "1", "-q")


def convert_args(out: Path, split: str | None) -> list:
    return ["convert", tiny_models.REF_MODEL, "-o", out, *ARGS, *(["--split-max-size", split] if split else [])]


def run_until(args: list, state_dir: Path, action: Callable[[subprocess.Popen], None],
              after: int = 3) -> subprocess.CompletedProcess:
    """Run ``args``; once ``after`` tensors are complete, do ``action`` to the running process."""
    proc = subprocess.Popen([GGUFMOE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        progress = Progress.load(state_dir)
        if progress and progress.tensors >= after:
            action(proc)
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=120)
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
    proc = run_until(convert_args(out, split), state, lambda p: p.send_signal(sig))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("interrupted: ") and "--resume" in lines[0] and str(state) in lines[0]
    kept = Progress.load(state)
    assert kept is not None and 3 <= kept.tensors < 6 * 11
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


def test_interrupt_before_any_tensor_leaves_nothing(tmp_path):
    """Ctrl-C while the budget run is still calibrating: no statistics, plan or output are left."""
    proc = subprocess.Popen([GGUFMOE, "convert", str(tiny_models.REF_MODEL), "-o", str(tmp_path / "m.gguf"),
                             "--budget", "20M", "--calib", str(tiny_models.SHARED_DATA / "calib.txt"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    assert proc.poll() is None, "calibration on calib.txt takes about a minute"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == "interrupted", err
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

        proc = run_until(convert_args(out, None), state, fill_disk)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "No space left on device" in lines[0] and "--resume" in lines[0], lines[0]
        assert not out.exists() and Progress.load(state).tensors >= 3
        filler.unlink()
        proc = run(*convert_args(out, None), "--resume")
        assert proc.returncode == 0, proc.stderr
        assert gguf_files(disk) == full and not state.exists()


@pytest.mark.parametrize("resume", [False, True])
def test_second_conversion_to_the_same_output_is_refused_while_the_first_runs(tmp_path, resume):
    out, state = tmp_path / "m.gguf", tmp_path / ".m.gguf.partial"
    second = []
    first = run_until(convert_args(out, None), state,
                      lambda _: second.append(run(*convert_args(out, None), *(["--resume"] if resume else []))),
                      after=1)
    assert_one_line_error(second[0], "another ggufmoe is writing", str(out))
    assert first.returncode == 0, first.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
