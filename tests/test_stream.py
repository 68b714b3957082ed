"""Streamed calibration (ggufmoe.stats.stream and its pieces): one decoder layer at a time, experts one at a time.

Its statistics equal the whole-model path's (ggufmoe.stats.collect, transformers' from_pretrained)
for every family, FP8 checkpoints included; an interrupted run continues with --resume to the same
statistics; bad inputs end in one error line. Nothing here depends on timing: the interruption is
the test hook GGUFMOE_TEST_INTERRUPT_LAYER of tests/hooked_cli.py (a SIGINT the process sends itself in
the middle of a known layer)."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import tiny_models
from cli_run import assert_one_line_error, cli_command, run
from hooked_cli import INTERRUPT_LAYER
from ggufmoe.model.tensor import RowLoader, TensorSpec
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.prune.criteria import PruneRequest
from ggufmoe.quant.rules import TypeRules
from ggufmoe.source.hf import HFSource
from ggufmoe.stats import skeleton
from ggufmoe.stats.calib_state import HIDDEN
from ggufmoe.stats.collect import collect_stats
from ggufmoe.stats.file import Stats, load_stats, save_stats
from ggufmoe.stats.local_errors import KEY as LOCAL_KEY, LocalErrors
from ggufmoe.stats.skeleton import embedding_rows
from ggufmoe.stats.stream import stream_stats

CTX = 128
N_TOKENS = 5000  # 39 full chunks (two batches of 32 and 7) and a short one
REF_TOKENS = 2000  # the reference model is larger (and slow in the whole-model path)
FAMILIES = tiny_models.CALIBRATED
TOLERANCE = 1e-3


def calib_text() -> str:
    return (tiny_models.TEST_DATA / "calib.txt").read_text()[:80_000]


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Worst elementwise |a - b| / |b|, over the elements of b not negligible next to its largest."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    scale = np.abs(b).max() if b.size else 0.0
    if scale == 0:
        return float(np.abs(a).max()) if a.size else 0.0
    big = np.abs(b) > 1e-6 * scale
    return float((np.abs(a - b)[big] / np.abs(b)[big]).max())


def worst_difference(got: Stats, want: Stats) -> tuple[str, float]:
    """(what, worst relative difference) over imatrix rows and counts, routing counts, mass and REAP."""
    assert got.imatrix.entries.keys() == want.imatrix.entries.keys()
    assert got.layers.keys() == want.layers.keys()
    assert (got.imatrix.chunk_count, got.imatrix.chunk_size, got.imatrix.datasets) == \
        (want.imatrix.chunk_count, want.imatrix.chunk_size, want.imatrix.datasets)
    assert (got.source, got.has_routing) == (want.source, want.has_routing)
    diffs = {}
    for name, e in want.imatrix.entries.items():
        g = got.imatrix.entries[name]
        np.testing.assert_array_equal(g.counts, e.counts)  # routing slots are integers
        diffs[f"{name} in_sum2"] = relative_difference(g.in_sum2, e.in_sum2)
    for il, s in want.layers.items():
        g = got.layers[il]
        assert g.n_tokens == s.n_tokens
        for attr in ("counts", "weight_mass", "reap_sum"):
            diffs[f"layer {il} {attr}"] = relative_difference(getattr(g, attr), getattr(s, attr))
    worst = max(diffs, key=diffs.get)
    return worst, diffs[worst]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream_models")
    out = {"reference": tiny_models.REF_MODEL}
    for name in FAMILIES:
        tiny_models.build(name, root / name)
        out[name] = root / name
    return out


def both(model: Path, n_tokens: int = N_TOKENS, **kw) -> tuple[Stats, Stats]:
    args = {"ctx": CTX, "max_tokens": n_tokens, "progress": False, "dataset": "calib.txt"}
    return stream_stats(model, calib_text(), **args, **kw), collect_stats(model, calib_text(), **args)


# --- parity with the whole-model path -------------------------------------------------------------

@pytest.mark.parametrize("name", ["reference", *FAMILIES])
def test_streamed_equals_whole_model(models, name):
    streamed, whole = both(models[name], REF_TOKENS if name == "reference" else N_TOKENS)
    what, diff = worst_difference(streamed, whole)
    assert diff < TOLERANCE, f"{name}: {what} differs by {diff:.2e}"
    assert all(s.counts.sum() > 0 for s in streamed.layers.values())


def test_hidden_states_in_files(models):
    """The hidden states mapped from files (as beyond --max-memory) give the same statistics."""
    streamed, whole = both(models["deepseek3"], in_memory=False)
    assert worst_difference(streamed, whole)[1] < TOLERANCE


def test_fp8_checkpoint(tmp_path):
    """An FP8 (block-scaled) DeepSeek-V3 checkpoint streams through our reader, no accelerate; its statistics
    are the whole-model statistics of its dequantized weights."""
    deq, fp8 = tmp_path / "deq", tmp_path / "fp8"
    tiny_models.build("deepseek3", deq)
    tiny_models.save_fp8(deq, fp8)
    assert "F8_E4M3" in {HFSource(fp8)._entry(n).dtype for n in HFSource(fp8).tensor_names()}
    args = {"ctx": CTX, "max_tokens": 2000, "progress": False}
    streamed = stream_stats(fp8, calib_text(), **args)
    whole = collect_stats(deq, calib_text(), **args)
    whole.source = streamed.source
    assert worst_difference(streamed, whole)[1] < TOLERANCE


def test_one_layer_at_a_time(models, monkeypatch):
    """At most one decoder layer holds real weights at any time, and the fused routed experts never do."""
    seen = []
    real = skeleton.Skeleton.materialize

    def materialize(self, module, skip=()):
        real(self, module, skip)
        live = [i for i, layer in enumerate(self.layers) if any(not p.is_meta for p in layer.parameters())]
        fused = [n for n, p in self.model.named_parameters() if n in self.expert_keys and not p.is_meta]
        seen.append(live)
        assert len(live) <= 1 and not fused, (live, fused)

    monkeypatch.setattr(skeleton.Skeleton, "materialize", materialize)
    stream_stats(models["deepseek3"], calib_text(), ctx=CTX, max_tokens=600, progress=False)
    assert seen == [[0], [1], [2], []]  # three layers, then the final norm


def test_a_layer_that_transforms_its_routed_output_runs_again(models, monkeypatch):
    """Where a layer does not add its routed output as it is (here Mixtral's MoE block with a tanh after it, as
    Gemma 4 normalises it), phase 3 runs the layer again on its routed output: the statistics are still the whole
    model's."""
    from transformers.models.mixtral import modeling_mixtral

    block = modeling_mixtral.MixtralSparseMoeBlock
    forward = block.forward
    monkeypatch.setattr(block, "forward", lambda self, h: torch.tanh(forward(self, h)))
    streamed, whole = both(models["mixtral"], 600)
    assert worst_difference(streamed, whole)[1] < TOLERANCE


def test_embedding_rows_in_spans(models, monkeypatch):
    src = HFSource(models["qwen3moe"])
    name = "model.embed_tokens.weight"
    spec = TensorSpec("token_embd.weight", src.shape(name), RowLoader(src, name), hf_name=name)
    ids = torch.tensor([[5, 5, 6000, 70, 71, 3000], [0, 6143, 6143, 1, 200, 64]])
    monkeypatch.setattr(skeleton, "EMBED_SPAN_BYTES", 40 * 64 * 4)  # spans of at most 40 rows
    want = torch.from_numpy(src.get(name))[ids]
    reads = []
    rows = src.get_rows
    monkeypatch.setattr(src, "get_rows", lambda n, a, b: reads.append((a, b)) or rows(n, a, b))
    torch.testing.assert_close(embedding_rows(spec, ids), want, rtol=0, atol=0)
    assert all(b - a <= 40 for a, b in reads) and sum(b - a for a, b in reads) < 300


@pytest.mark.parametrize("criterion", ["reap", "routing"])
def test_pruned_and_quantized_files_agree(models, tmp_path, criterion):
    """Files converted with streamed and with whole-model statistics keep the same experts (the pruned routers
    are identical) and quantize alike: the same types, all but a few blocks byte for byte."""
    model = models["deepseek3"]
    files = {}
    for mode, stats in zip(("streamed", "whole"), both(model, 3000)):
        save_stats(stats, tmp_path / f"{mode}.stats.gguf")
        opts = ConvertOptions(out=tmp_path / f"{mode}.gguf", types=TypeRules.parse("Q4_K", ()), progress=False,
                              stats=tmp_path / f"{mode}.stats.gguf",
                              prune=PruneRequest(keep_ratio=0.75, criterion=criterion))
        files[mode] = {t.name: t for t in gguf.GGUFReader(convert(model, opts)[0]).tensors}
    streamed, whole = files["streamed"], files["whole"]
    assert streamed.keys() == whole.keys()
    quantized = 0
    for name, t in whole.items():
        u = streamed[name]
        assert (u.tensor_type, tuple(u.shape)) == (t.tensor_type, tuple(t.shape)), name
        a, b = np.asarray(u.data).view(np.uint8), np.asarray(t.data).view(np.uint8)
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            np.testing.assert_array_equal(a, b, err_msg=name)  # routers (pruned rows), norms, copies
        else:
            quantized += 1
            assert np.mean(a == b) > 0.99, name
    assert quantized > 10


# --- interrupted, then --resume -------------------------------------------------------------------

def without_warnings(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``proc`` with the `warning:` lines left out of its stderr: the calibrations here run on fewer tokens
    than :data:`ggufmoe.stats.text.MIN_ROUTED_PER_EXPERT` per expert, which is warned about."""
    proc.stderr = "".join(line for line in proc.stderr.splitlines(True) if not line.startswith("warning: "))
    return proc


def calibrate(model: Path, text: Path, out: Path, *args, env: dict | None = None,
              local: bool = False) -> subprocess.CompletedProcess:
    """``ggufmoe calibrate``; without the local errors unless ``local`` (they are tested in test_local.py, and their
    resumption in :func:`test_interrupt_in_a_layer_then_resume`)."""
    cmd = [*cli_command(env), "calibrate", model, "--text", text, "--chunk", CTX, "--max-tokens", 3000, "-o", out, "-q",
           *([] if local else ["--no-local-errors"]), *args]
    return without_warnings(subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=False,
                                           env={**os.environ, **(env or {})}))


def calibrate_here(model: Path, text: Path, out: Path, local: bool = False) -> None:
    """What :func:`calibrate` writes, in this process (no interpreter to start): the runs a resumed one is compared
    with."""
    from ggufmoe.pipeline.calibrate import calibrate as run_calibration

    run_calibration(model, text.read_text(), ctx=CTX, max_tokens=3000, out=out, progress=False, dataset=text.name,
                    measure_local=local)


def assert_same_stats(a: Path, b: Path) -> None:
    sa, sb = load_stats(a), load_stats(b)
    assert sa.imatrix.entries.keys() == sb.imatrix.entries.keys() and sa.layers.keys() == sb.layers.keys()
    for name, e in sa.imatrix.entries.items():
        np.testing.assert_allclose(e.in_sum2, sb.imatrix.entries[name].in_sum2, rtol=1e-6)
        np.testing.assert_array_equal(e.counts, sb.imatrix.entries[name].counts)
    for il, s in sa.layers.items():
        for attr in ("counts", "weight_mass", "reap_sum"):
            np.testing.assert_allclose(getattr(s, attr), getattr(sb.layers[il], attr), rtol=1e-6)


def test_interrupt_in_a_layer_then_resume(models, tmp_path):
    """SIGINT in the middle of a MoE layer keeps the layers before it; --resume gives the statistics (and the local
    errors) of an uninterrupted run, and the state directory goes away."""
    model = models["deepseek3"]  # layer 0 dense, 1 and 2 MoE
    layer = 2
    text = tmp_path / "calib.txt"
    text.write_text(calib_text())
    want = tmp_path / "want.gguf"
    calibrate_here(model, text, want, local=True)

    out = tmp_path / "stats.gguf"
    state = tmp_path / ".stats.gguf.partial"
    proc = calibrate(model, text, out, env={INTERRUPT_LAYER: str(layer)}, local=True)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == [(f"interrupted: {layer} of 3 layers are kept in {state}: "
                                                 f"run the same command with --resume to continue")]
    assert not out.exists() and state.is_dir()

    assert_one_line_error(calibrate(model, text, out, local=True), "interrupted calibration", "--resume", "delete")
    other = tmp_path / "other.txt"
    other.write_text(calib_text()[5000:])
    assert_one_line_error(calibrate(model, other, out, "--resume", local=True), "another source, text or context")
    assert state.is_dir()

    proc = calibrate(model, text, out, "--resume", local=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"wrote {out}"
    assert not state.exists()
    assert_same_stats(out, want)
    mine, theirs = (LocalErrors.from_json(load_stats(p).extras[LOCAL_KEY]) for p in (out, want))
    assert mine.quant.keys() == theirs.quant.keys() and mine.prune.keys() == theirs.prune.keys() and mine.quant
    for name, errors in theirs.quant.items():
        assert mine.quant[name] == pytest.approx(errors, rel=1e-4), name
    for il, by_criterion in theirs.prune.items():
        for criterion, by_keep in by_criterion.items():
            assert mine.prune[il][criterion] == pytest.approx(by_keep, rel=1e-4), (il, criterion)


@pytest.mark.parametrize("family, layer", [("glm-dsa", 3), ("gemma4", 5)])
def test_resume_where_a_layer_takes_what_the_one_before_handed_it(models, tmp_path, family, layer):
    """GLM-5's layer 3 reuses the top-k its full layer 2 selected (not layer 0's); Gemma 4's layer 5 the keys and
    values its layer 3 stored (and layer 2's ride along for layer 4): interrupted there and resumed, the kept
    hand-over of the layer before gives the statistics of an uninterrupted run."""
    model, text = models[family], tmp_path / "calib.txt"
    text.write_text(calib_text())
    want, out = tmp_path / "want.gguf", tmp_path / "stats.gguf"
    calibrate_here(model, text, want)
    proc = calibrate(model, text, out, env={INTERRUPT_LAYER: str(layer)})
    assert proc.returncode == 130, proc.stderr
    assert sorted(p.name for p in (tmp_path / ".stats.gguf.partial").glob("carry.*")) == [f"carry.{layer - 1}.npz"]
    proc = calibrate(model, text, out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert_same_stats(out, want)


def test_interrupt_in_the_first_layer_keeps_nothing(models, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(calib_text())
    out = tmp_path / "stats.gguf"
    proc = calibrate(models["qwen3moe"], text, out, env={INTERRUPT_LAYER: "0"})
    assert proc.returncode == 130 and proc.stderr.strip().splitlines() == ["interrupted"], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]
    # --resume without anything kept simply starts
    proc = calibrate(models["qwen3moe"], text, out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "stats.gguf"]


def test_kept_state_damaged(models, tmp_path):
    """Kept hidden states that do not match their record end in one line that says what to do."""
    model = models["qwen3moe"]
    text = tmp_path / "calib.txt"
    text.write_text(calib_text())
    out = tmp_path / "stats.gguf"
    state = tmp_path / ".stats.gguf.partial"
    assert calibrate(model, text, out, env={INTERRUPT_LAYER: "1"}).returncode == 130
    hidden = state / HIDDEN[1]
    hidden.write_bytes(hidden.read_bytes()[:1000])
    assert_one_line_error(calibrate(model, text, out, "--resume"), str(hidden), "delete")


# --- bad inputs -----------------------------------------------------------------------------------

def test_bad_options(models, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(calib_text())
    out = tmp_path / "stats.gguf"
    model = models["qwen3moe"]

    def calib(*args):
        return without_warnings(run("calibrate", model, "--text", text, "--max-tokens", 500, "-o", out, "-q", *args))

    assert_one_line_error(calib("--device", "toaster"), "--device toaster")
    if not torch.cuda.is_available():
        assert_one_line_error(calib("--device", "cuda"), "--device cuda", "no GPU")
    assert_one_line_error(calib("--max-memory", "lots"), "lots")
    assert_one_line_error(calib("--max-memory", "1M"), "--max-memory", "too small")
    assert_one_line_error(calib("--whole", "--resume"), "--whole", "--resume")
    assert_one_line_error(calib("--whole", "--device", "cpu"), "--whole", "--device")
    assert_one_line_error(calib("--no-local-errors", "--probes"), "--no-local-errors", "--probes")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]
    # a second calibration to the same output while one runs
    state = tmp_path / ".stats.gguf.partial"
    state.mkdir()
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_one_line_error(calib(), "another ggufmoe is calibrating")
    finally:
        os.close(fd)
    # --whole stays reachable and gives what streaming gives
    proc = calib("--whole")
    assert proc.returncode == 0, proc.stderr
    whole = load_stats(out)
    proc = calib("--no-local-errors")  # --whole measures none either
    assert proc.returncode == 0, proc.stderr
    assert worst_difference(load_stats(out), whole)[1] < TOLERANCE
    assert not state.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no GPU")
def test_cuda_equals_whole_model(models):
    streamed, whole = both(models["deepseek3"], device="cuda")
    assert worst_difference(streamed, whole)[1] < TOLERANCE


def test_resume_with_the_hidden_states_in_files(models, tmp_path):
    """Kept in memory-sized runs, continued under a --max-memory that maps the hidden states from files
    and runs fewer chunks per forward: the same statistics up to summation order."""
    model = models["deepseek3"]
    text = tmp_path / "calib.txt"
    text.write_text(calib_text())
    out = tmp_path / "stats.gguf"
    assert calibrate(model, text, out, env={INTERRUPT_LAYER: "1"}).returncode == 130
    proc = calibrate(model, text, out, "--resume", "--max-memory", "7M")
    assert proc.returncode == 0, proc.stderr
    whole = collect_stats(model, calib_text(), ctx=CTX, max_tokens=3000, progress=False, dataset="calib.txt")
    assert worst_difference(load_stats(out), whole)[1] < TOLERANCE
