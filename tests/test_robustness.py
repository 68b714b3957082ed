"""Bad inputs and hostile environments: one `error:` line, exit code 1, no output left behind.

Complements test_cli.py (missing source or shard, corrupt safetensors, unsupported architecture,
missing output folder), test_gguf_source.py (truncated GGUF) and test_resume.py (Ctrl-C).
"""

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tiny_models
from cli_run import assert_one_line_error, cli_command, run
from hooked_cli import INTERRUPT_LAYER
from ggufmoe.arch import architecture_for
from ggufmoe.errors import GgufmoeError, Interrupted
from ggufmoe.pipeline import planning as budget_flow
from ggufmoe.pipeline.planning import convert_to_budget
from ggufmoe.pipeline.convert import ConvertOptions
from ggufmoe.plan.budget import Budget
from ggufmoe.quant.rules import TypeRules
from ggufmoe.source.gguf_in import GGUFSource
from ggufmoe.stats.stream import StreamedRun
from ggufmoe.units import parse_size

REF = tiny_models.REF_MODEL


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *options: str):
    """A small file system of its own (needs root: mount); skips the test where it cannot be mounted."""
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_not_enough_free_disk_is_checked_before_writing(tmp_path):
    with tmpfs(tmp_path / "small", "8m") as small:
        proc = run("convert", REF, "-o", small / "m.gguf", "--type", "Q8_0", "-q")
        assert_one_line_error(proc, "not enough free disk", "m.gguf", "needs 33.")
        assert list(small.iterdir()) == []


def test_read_only_output_folder(tmp_path):
    with tmpfs(tmp_path / "ro", "64m", "ro") as ro:
        assert_one_line_error(run("convert", REF, "-o", ro / "m.gguf", "--type", "Q8_0", "-q"), "cannot write in")
        assert list(ro.iterdir()) == []


def test_shape_that_disagrees_with_config(tmp_path):
    src = tmp_path / "m"
    shutil.copytree(REF, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["moe_intermediate_size"] *= 2
    (src / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("convert", src, "-o", tmp_path / "o.gguf", "--type", "Q8_0", "-q"), "shape")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_budget_too_small_for_convert(tmp_path):
    stats = tmp_path / "s.gguf"
    assert run("calibrate", REF, "--text", tiny_models.TEST_DATA / "calib.txt", "--max-tokens", "256",
               "--no-local-errors", "-o", stats, "-q").returncode == 0
    proc = run("convert", REF, "-o", tmp_path / "o.gguf", "--budget", "1M", "--stats", stats, "--weights-only", "-q",
               "--calib", tiny_models.TEST_DATA / "calib.txt")
    assert_one_line_error(proc, "smallest feasible plan needs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.gguf"]


# --- convert --budget that calibrates: a failed run leaves nothing it made (issue 17) ----------------

def small_calib(folder: Path) -> Path:
    calib = folder / "calib.txt"
    calib.write_text((tiny_models.TEST_DATA / "calib.txt").read_text()[:20_000])
    return calib


# A budget that no plan meets with every tensor pinned to F32 (refused from the sizes alone); one that the sizes
# allow (so calibration runs) but that no plan meets at a speed target of 1 KiB read per token (found in planning).
BUDGET, PINS = "20M", ".*=F32"
ROOMY, TOO_FAST = "200M", "1K"
FAILS_IN_PLANNING = "per token"


def budget_run(folder: Path, *more, env: dict | None = None) -> subprocess.CompletedProcess:
    """``convert --budget`` with a speed target no plan meets, so it calibrates and then fails in planning (from
    the local errors: no probes)."""
    args = ["convert", REF, "-o", folder / "o.gguf", "--budget", ROOMY, "--max-active", TOO_FAST, "--weights-only",
            "--sensitivity", "local", "--calib", folder / "calib.txt", *more]
    return subprocess.run([*cli_command(env), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_failed_budget_conversion_leaves_no_statistics(tmp_path):
    """Calibrated, then the plan fails: no statistics file, plan or calibration state is left behind."""
    small_calib(tmp_path)
    assert_one_line_error(budget_run(tmp_path, "-q"), FAILS_IN_PLANNING)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_budget_calibration_that_fails_leaves_no_state(tmp_path, monkeypatch):
    """A calibration error after complete layers (not an interruption): its state directory goes too."""
    real = StreamedRun.layer

    def layer(self, skeleton, k, *args):
        if k == 2:
            raise GgufmoeError("the test breaks layer 2")
        return real(self, skeleton, k, *args)

    monkeypatch.setattr(StreamedRun, "layer", layer)
    types = TypeRules.parse(None)
    with pytest.raises(GgufmoeError, match="the test breaks layer 2"):
        convert_to_budget(REF, ConvertOptions(out=tmp_path / "o.gguf", types=types, progress=False),
                          Budget(parse_size(ROOMY), weights_only=True), small_calib(tmp_path), types)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_budget_interrupted_while_planning_keeps_the_statistics(tmp_path, monkeypatch):
    """Ctrl-C after the calibration: the statistics stay, and say so; --resume plans from them, and a resumed
    run that fails (pins no plan within the budget can have: refused from the sizes alone) leaves them as they
    were (it did not make them)."""
    free, types = TypeRules.parse(None), TypeRules.parse(None, (PINS,))
    opts = ConvertOptions(out=tmp_path / "o.gguf", types=free, progress=False)
    budget = Budget(parse_size(BUDGET), weights_only=True)
    calib = small_calib(tmp_path)
    real = budget_flow.build_plan

    def interrupt(source, plan_budget, stats_path=None, *args, **kwargs):
        """Ctrl-C in the planning from the statistics; the check of the sizes before calibrating runs as usual."""
        if stats_path is None:
            return real(source, plan_budget, stats_path, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(budget_flow, "build_plan", interrupt)
        with pytest.raises(Interrupted, match="statistics are kept in .*o.stats.gguf: run the same command with "
                                              "--resume"):
            convert_to_budget(REF, opts, budget, calib, free)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "o.stats.gguf"]
    kept = (tmp_path / "o.stats.gguf").read_bytes()
    monkeypatch.setattr(budget_flow, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    with pytest.raises(GgufmoeError, match="smallest feasible plan needs"):
        convert_to_budget(REF, replace(opts, resume=True, types=types), budget, calib, types)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "o.stats.gguf"]
    assert (tmp_path / "o.stats.gguf").read_bytes() == kept


def test_budget_calibration_interrupted_then_resumed(tmp_path):
    """Interrupted in the middle of a layer, the complete layers are kept (and said so); --resume continues
    the calibration; the run that then fails leaves nothing."""
    small_calib(tmp_path)
    state = tmp_path / ".o.stats.gguf.partial"
    proc = budget_run(tmp_path, "-q", env={INTERRUPT_LAYER: "2"})
    assert proc.returncode == 130 and proc.stderr.strip().splitlines() == [
        f"interrupted: 2 of 6 layers are kept in {state}: run the same command with --resume to continue"], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.name, "calib.txt"]
    assert_one_line_error(budget_run(tmp_path, "-q"), str(state), "interrupted calibration", "--resume")
    proc = budget_run(tmp_path, "--resume")  # with progress: it says it resumes
    lines = proc.stderr.replace("\r", "\n").strip().splitlines()
    assert proc.returncode == 1 and "resuming: 2 of 6 layers are done already" in lines, proc.stderr
    assert lines[-1].startswith("error: ") and FAILS_IN_PLANNING in lines[-1], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


# --- GGUF sources ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random Qwen3-MoE as an F16 GGUF, split in two."""
    work = tmp_path_factory.mktemp("tiny")
    tiny_models.build("qwen3moe", work / "hf")
    proc = run("convert", work / "hf", "-o", work / "t.gguf", "--type", "F16", "-q", "--split-max-size", "200K")
    assert proc.returncode == 0, proc.stderr
    return sorted(work.glob("t-*-of-*.gguf"))[0]


def test_missing_gguf_shard(tiny_gguf, tmp_path):
    shards = sorted(tiny_gguf.parent.glob("t-*-of-*.gguf"))
    for s in shards[:-1]:
        shutil.copy(s, tmp_path / s.name)
    assert_one_line_error(run("convert", tmp_path / shards[0].name, "-o", tmp_path / "o.gguf", "-q"), shards[-1].name)
    assert not (tmp_path / "o.gguf").exists()


def test_unsupported_gguf_architecture(tiny_gguf, tmp_path):
    src = GGUFSource(tiny_gguf)
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(bad, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert architecture_for(src)  # the good one reads
    assert_one_line_error(run("convert", bad, "-o", tmp_path / "o.gguf", "-q"), "gpt2")
    assert not (tmp_path / "o.gguf").exists()


def test_invalid_utf8_in_a_gguf_string_is_one_line_error(tiny_gguf, tmp_path):
    """A damaged byte inside a metadata string (gguf-py decodes strings lazily) is refused on open."""
    data = bytearray(tiny_gguf.read_bytes())
    at = data.index(b"qwen3moe")  # the value of general.architecture
    data[at] = 0xFF
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    for args in (["convert", bad, "-o", tmp_path / "o.gguf", "-q"], ["inspect", bad]):
        assert_one_line_error(run(*args), "bad.gguf", "truncated or corrupt GGUF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> bytes:
    """A small complete GGUF model file (the tiny model at F16, one file)."""
    work = tmp_path_factory.mktemp("fuzz")
    tiny_models.build("qwen3moe", work / "hf")
    assert run("convert", work / "hf", "-o", work / "t.gguf", "--type", "F16", "-q").returncode == 0
    return (work / "t.gguf").read_bytes()


def read_everything(path: Path) -> None:
    """What `convert` and `inspect` read of a GGUF source: metadata, architecture, every tensor."""
    src = GGUFSource(path)
    arch = architecture_for(src)
    for spec in arch.tensors():
        for i in range(min(spec.n_parts, 2)):
            spec.load(i)
            if spec.raw is not None:
                spec.raw(i)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_gguf_header_is_read_or_refused(small_gguf, tmp_path_factory, data):
    """Mutated header bytes (metadata and tensor infos): the reader reads the file or says it is damaged."""
    header_end = min(len(small_gguf), 64 * 1024)
    buf = bytearray(small_gguf)
    for _ in range(data.draw(st.integers(1, 8), label="mutations")):
        pos = data.draw(st.integers(0, header_end - 1), label="position")
        buf[pos] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[: data.draw(st.integers(0, len(buf)), label="length")]
    path = tmp_path_factory.mktemp("f") / "m.gguf"
    path.write_bytes(bytes(buf))
    try:
        read_everything(path)
    except GgufmoeError as e:
        assert "\n" not in str(e)


# --- an output that would overwrite an input -------------------------------------------------------

@pytest.fixture(scope="module")
def single_gguf(tmp_path_factory) -> Path:
    """A tiny random Qwen3-MoE as one F16 GGUF file."""
    work = tmp_path_factory.mktemp("single")
    tiny_models.build("qwen3moe", work / "hf")
    assert run("convert", work / "hf", "-o", work / "t.gguf", "--type", "F16", "-q").returncode == 0
    return work / "t.gguf"


def _assert_refused_unchanged(proc, src: Path, before: bytes) -> None:
    assert_one_line_error(proc, "would overwrite the input")
    assert src.read_bytes() == before
    assert not list(src.parent.glob(".*.partial"))


def test_output_that_is_the_source_is_refused(single_gguf, tmp_path):
    src = tmp_path / "m.gguf"
    shutil.copy(single_gguf, src)
    before = src.read_bytes()
    _assert_refused_unchanged(run("convert", src, "-o", src, "--type", "Q4_K", "-q"), src, before)


def test_output_through_a_symlink_or_hard_link_to_the_source_is_refused(single_gguf, tmp_path):
    src = tmp_path / "m.gguf"
    shutil.copy(single_gguf, src)
    before = src.read_bytes()
    (tmp_path / "link.gguf").symlink_to(src)
    (tmp_path / "src-link.gguf").symlink_to(src)
    (tmp_path / "hard.gguf").hardlink_to(src)
    _assert_refused_unchanged(run("convert", src, "-o", tmp_path / "link.gguf", "--type", "Q8_0", "-q"), src, before)
    _assert_refused_unchanged(run("convert", tmp_path / "src-link.gguf", "-o", src, "-q"), src, before)
    _assert_refused_unchanged(run("convert", src, "-o", tmp_path / "hard.gguf", "-q"), src, before)


def test_output_that_is_a_shard_of_the_source_is_refused(tiny_gguf, tmp_path):
    for s in tiny_gguf.parent.glob("t-*-of-*.gguf"):
        shutil.copy(s, tmp_path / s.name)
    shards = sorted(tmp_path.glob("t-*-of-*.gguf"))
    before = shards[-1].read_bytes()
    _assert_refused_unchanged(run("convert", shards[0], "-o", shards[-1], "--type", "Q8_0", "-q"), shards[-1], before)
    # a split output named like the source writes the source's shard names
    before = shards[0].read_bytes()
    _assert_refused_unchanged(run("convert", shards[0], "-o", tmp_path / "t.gguf", "--split-max-size", "200K", "-q"),
                              shards[0], before)


def test_output_that_is_the_stats_or_the_imatrix_is_refused(tmp_path):
    src = tmp_path / "m"
    tiny_models.build("qwen3moe", src)
    stats = tmp_path / "s.gguf"
    stats.write_bytes(b"stats")
    for args in (["--stats", stats], ["--imatrix", stats, "--type", "Q4_K"], ["--budget", "10M", "--stats", stats]):
        assert_one_line_error(run("convert", src, "-o", stats, *args, "-q"), "would overwrite the input")
        assert stats.read_bytes() == b"stats"
