"""Issue 23: no command destroys kept work or an input, and every mistake is one line and exit code 1.

Each case runs the installed `ggufmoe` as a user would and checks the error line, the exit code, that the inputs
are byte-identical and that nothing is left at the output path. Interrupted runs are made with the test hooks of
tests/hooked_cli.py that the resume tests use (no timing)."""

import hashlib
import os
import shutil
import signal
from pathlib import Path

import pytest

import tiny_models
from cli_run import assert_one_line_error, run
from hooked_cli import INTERRUPT_LAYER
from test_resume import run_paused
from test_stream import assert_same_stats
from test_robustness import tmpfs

REF = tiny_models.REF_MODEL
CALIB = tiny_models.TEST_DATA / "calib.txt"


def digest(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under ``paths``."""
    out = {}
    for p in paths:
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A copy of the reference model (tests may point outputs into it)."""
    out = tmp_path_factory.mktemp("model") / "refmoe"
    shutil.copytree(REF, out)
    return out


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, model) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    assert run("convert", model, "-o", out, "--type", "Q4_K", "-q").returncode == 0
    return out


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text") / "calib.txt"
    out.write_text(CALIB.read_text()[:20_000])
    return out


def refused(tmp_path: Path, inputs: list[Path], args: list, *words: str) -> None:
    """``ggufmoe ARGS`` ends in one error line with ``words``, exit 1, inputs unchanged, nothing new in tmp_path."""
    before, listing = digest(*inputs), sorted(os.listdir(tmp_path))
    assert_one_line_error(run(*args), *words)
    assert digest(*inputs) == before
    assert sorted(os.listdir(tmp_path)) == listing


# --- outputs that are inputs, directories, unwritable ------------------------------------------------------------

def test_plan_over_the_models_config(model, tmp_path):
    refused(tmp_path, [model], ["plan", model, "--budget", "20M", "-o", model / "config.json", "-q"],
            "would overwrite the input", "config.json")


def test_plan_over_a_symlink_to_the_tokenizer(model, tmp_path):
    (tmp_path / "link.json").symlink_to(model / "tokenizer.json")
    refused(tmp_path, [model], ["plan", model, "--budget", "20M", "-o", tmp_path / "link.json", "-q"],
            "would overwrite the input")


def test_text_outputs_never_replace_a_gguf(model, small_gguf, tmp_path):
    other = tmp_path / "other.gguf"
    shutil.copy(small_gguf, other)
    refused(tmp_path, [model, other], ["plan", model, "--budget", "20M", "-o", other, "-q"], "is a GGUF file")
    refused(tmp_path, [small_gguf, other], ["modelfile", small_gguf, "-o", other], "is a GGUF file")


def test_card_and_modelfile_over_their_gguf(small_gguf, tmp_path):
    refused(tmp_path, [small_gguf], ["card", small_gguf, "-o", small_gguf], "would overwrite the input")
    refused(tmp_path, [small_gguf], ["modelfile", small_gguf, "-o", small_gguf], "would overwrite the input")


@pytest.mark.parametrize("command", ["convert", "calibrate", "plan", "card"])
def test_output_that_is_a_directory(command, model, small_gguf, calib_text, tmp_path):
    (tmp_path / "dir").mkdir()
    args = {"convert": ["convert", model, "--type", "Q8_0", "-q"], "calibrate": ["calibrate", model, "--text", calib_text],
            "plan": ["plan", model, "--budget", "20M", "-q"], "card": ["card", small_gguf]}[command]
    refused(tmp_path, [model, small_gguf], [*args, "-o", tmp_path / "dir"], "is a directory")


def test_output_in_a_missing_or_read_only_folder(model, tmp_path):
    refused(tmp_path, [model], ["plan", model, "--budget", "20M", "-o", tmp_path / "no" / "p.json", "-q"],
            "does not exist")
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        assert_one_line_error(run("plan", model, "--budget", "20M", "-o", ro / "p.json", "-q"), "cannot write in")
        assert_one_line_error(run("card", model / "config.json", "-o", ro / "README.md"), "cannot write in")


def test_sweep_into_the_model_folder_or_a_file(model, calib_text, tmp_path):
    base = ["sweep", model, "--budgets", "20M", "--calib", calib_text, "--text", calib_text, "--baselines", "", "-q"]
    refused(tmp_path, [model], [*base, "-o", model], "holds an input")
    (tmp_path / "f").write_text("x")
    refused(tmp_path, [model], [*base, "-o", tmp_path / "f"], "is a file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("mine")
    refused(tmp_path, [model, tmp_path / "notes"], [*base, "-o", tmp_path / "notes"], "not empty")


def test_sweep_with_an_impossible_budget_says_so_before_calibrating(model, calib_text, tmp_path):
    refused(tmp_path, [model], ["sweep", model, "--budgets", "1M,20M", "--calib", calib_text, "--text", calib_text,
                                "-o", tmp_path / "sweep", "-q"], "budget", "too small")


# --- bad inputs and options --------------------------------------------------------------------------------------

def test_broken_configurations(model, tmp_path):
    for text, words in [("null", ("not a model configuration",)), ('{"architectures": 3}', ("architectures",))]:
        bad = tmp_path / "bad"
        shutil.copytree(model, bad, dirs_exist_ok=True)
        (bad / "config.json").write_text(text)
        for command in (["inspect", bad], ["plan", bad, "--budget", "20M"], ["convert", bad, "-o", tmp_path / "o.gguf"]):
            assert_one_line_error(run(*command), *words)
        assert not (tmp_path / "o.gguf").exists()
    many = tmp_path / "many"
    shutil.copytree(model, many)
    (many / "config.json").write_text((model / "config.json").read_text().replace(
        '"num_experts_per_tok": 4', '"num_experts_per_tok": 30'))
    assert_one_line_error(run("plan", many, "--budget", "20M"), "30 experts used per token of 24")


def test_card_results_with_a_wrongly_typed_value(small_gguf, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(f'[{{"file": "{small_gguf.name}", "kld_mean": "abc"}}]')
    refused(tmp_path, [small_gguf, results], ["card", small_gguf, "--results", results, "-o", tmp_path / "c.md"],
            "kld_mean", "not a number")


@pytest.mark.parametrize("args, words", [
    (["convert", "MODEL"], ("Missing option", "--output")),
    (["convert", "MODEL", "-o", "OUT", "--bogus"], ("No such option", "--bogus")),
    (["convert", "MODEL", "-o", "OUT", "--type", "Q8_0", "--target", "abc"], ("--target", "abc")),
    (["plan", "MODEL", "--budget", "abc"], ("--budget", "cannot read size")),
    (["convert", "MODEL", "-o", "OUT", "--split-max-size", "0"], ("--split-max-size",)),
    (["convert", "MODEL", "-o", "OUT", "--merge"], ("--merge", "--keep")),
    (["convert", "MODEL", "-o", "OUT", "--keep-per-layer"], ("--keep-per-layer", "--keep")),
    (["convert", "MODEL", "-o", "OUT", "--weights-only"], ("--weights-only", "--budget")),
    (["convert", "MODEL", "-o", "OUT", "--calib", "MODEL/config.json"], ("--calib", "--budget")),
    (["convert", "MODEL", "-o", "OUT", "--alpha", "0.3"], ("--alpha", "--keep")),
    (["nosuch"], ("No such command",)),
])
def test_usage_errors_are_one_line(model, tmp_path, args, words):
    args = [str(a).replace("MODEL", str(model)).replace("OUT", str(tmp_path / "o.gguf")) for a in args]
    refused(tmp_path, [model], args, *words)


def test_text_of_nul_bytes(model, tmp_path):
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\0" * 4096)
    refused(tmp_path, [model], ["calibrate", model, "--text", nul, "-o", tmp_path / "s.gguf", "-q"], "not a text file")


# --- kept work survives every other command on the same output name ----------------------------------------------

def other_commands(out: Path, model: Path, small_gguf: Path, text: Path) -> list[list]:
    """Every command but the owner's that could write ``out``."""
    return [["convert", model, "-o", out, "--type", "Q8_0", "-q"],
            ["calibrate", model, "--text", text, "-o", out, "-q"],
            ["plan", model, "--budget", "20M", "-o", out, "-q"],
            ["card", small_gguf, "-o", out],
            ["modelfile", small_gguf, "-o", out]]


def test_interrupted_conversion_survives_the_other_commands(model, small_gguf, calib_text, tmp_path):
    full = tmp_path / "full.gguf"
    args = ["convert", model, "-o", None, "--type", "Q8_0", "--threads", "1", "-q"]
    assert run(*[full if a is None else a for a in args]).returncode == 0
    out = tmp_path / "o.gguf"
    proc = run_paused([out if a is None else a for a in args], lambda p: p.send_signal(signal.SIGINT))
    assert proc.returncode == 130, proc.stderr
    state = tmp_path / ".o.gguf.partial"
    kept = digest(state)
    for command in other_commands(out, model, small_gguf, calib_text)[1:]:
        assert_one_line_error(run(*command), str(state), "interrupted conversion", "--resume")
        assert digest(state) == kept and not out.exists()
    assert_one_line_error(run(*[out if a is None else a for a in args]), "interrupted conversion", "--resume")
    assert run(*[out if a is None else a for a in args], "--resume").returncode == 0
    assert out.read_bytes() == full.read_bytes() and not state.exists()


def test_interrupted_calibration_survives_the_other_commands(small_gguf, calib_text, tmp_path):
    """On a tiny seeded Qwen3-MoE: three calibrations of the reference model would cost a minute and a half."""
    model = tmp_path / "tiny"
    tiny_models.build("qwen3moe", model)
    full = tmp_path / "full.gguf"
    args = ["calibrate", model, "--text", calib_text, "--max-tokens", "200", "--no-local-errors", "-q", "-o"]
    proc = run(*args, full)
    assert proc.returncode == 0, proc.stderr
    assert "warning: statistics from only 200 tokens of text" in proc.stderr  # too little text is said
    out = tmp_path / "s.gguf"
    proc = run(*args, out, env={INTERRUPT_LAYER: "2"})
    assert proc.returncode == 130, proc.stderr
    state = tmp_path / ".s.gguf.partial"
    kept = digest(state)
    for command in [c for c in other_commands(out, model, small_gguf, calib_text) if c[0] != "calibrate"]:
        assert_one_line_error(run(*command), str(state), "interrupted calibration", "--resume")
        assert digest(state) == kept and not out.exists()
    assert run(*args, out, "--resume").returncode == 0
    assert not state.exists()
    assert_same_stats(out, full)
