"""Issue 23: a seeded fuzz of the command line on the reference model. Random commands with random options and
paths (inputs, fresh outputs, directories, missing folders, an input given as the output, the same file twice):
no traceback, exit code 0 or 1 (1 with exactly one `error:` line), no input changed, and after a failed run
nothing at its output path and no state folder or temporary file beside it.

The commands run in this process (``ggufmoe.cli.main``) so that a few hundred fit in a minute or two; a case that
would run for long (a calibration of the whole text, probes through llama.cpp) is not drawn."""

import hashlib
import random
import shutil
import sys
from pathlib import Path

import pytest

import tiny_models
from cli_run import run
from ggufmoe import cli

CASES = 200
SEED = 23


def snapshot(paths: list[Path], content: bool) -> dict[str, object]:
    out = {}
    for p in paths:
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                st = f.stat()
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if content else (st.st_size, st.st_mtime_ns,
                                                                                           st.st_ino)
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    ws = tmp_path_factory.mktemp("fuzz")
    model = ws / "model"
    shutil.copytree(tiny_models.REF_MODEL, model)
    text = ws / "text.txt"
    text.write_text((tiny_models.TEST_DATA / "calib.txt").read_text()[:6000])
    gguf, stats = ws / "m.gguf", ws / "s.gguf"
    assert run("convert", model, "-o", gguf, "--type", "Q4_K", "-q").returncode == 0
    assert run("calibrate", model, "--text", text, "--max-tokens", "256", "-o", stats, "-q").returncode == 0
    (ws / "dir").mkdir()
    (ws / "out").mkdir()
    return dict(ws=ws, model=model, config=model / "config.json", tokenizer=model / "tokenizer.json", gguf=gguf,
                stats=stats, text=text, dir=ws / "dir", missing=ws / "missing" / "x", out=ws / "out")


def draw(rng: random.Random, p: dict[str, Path], i: int) -> tuple[list[str], Path | None]:
    """One command line and the output path it names (None when it writes none)."""
    pick = rng.choice
    out = OUT
    src = pick([p["model"]] * 4 + [p["config"], p["gguf"], p["text"], p["dir"], p["missing"]])
    maybe = lambda chance, *args: list(args) if rng.random() < chance else []  # noqa: E731
    command = pick(["inspect", "convert", "convert", "convert", "plan", "plan", "calibrate", "card", "modelfile",
                    "eval", "sweep"])
    if command == "inspect":
        args = [src]
    elif command == "convert":
        budget = maybe(0.3, "--budget", pick(["20M", "1M", "abc", "0"]))
        args = [src, "-o", out, "-q", *maybe(0.5, "--type", pick(["Q8_0", "Q4_K", "IQ2_XXS", "F16", "Q4_K_X", "IQ4_XS"])),
                *maybe(0.3, "--keep", pick(["12", "0", "30", "x"])), *maybe(0.1, "--merge"),
                *maybe(0.1, "--keep-per-layer"), *maybe(0.1, "--criterion", pick(["reap", "frequency", "nope"])),
                *maybe(0.3, "--stats", pick([p["stats"], p["stats"], p["text"], p["gguf"], p["missing"]])),
                *maybe(0.1, "--imatrix", pick([p["stats"], p["text"], p["gguf"]])),
                *maybe(0.15, "--split-max-size", pick(["0", "5M", "abc", "1"])), *maybe(0.1, "--ctx", "512"),
                *maybe(0.15, "--top-k", pick(["0", "2", "auto", "30"])), *budget,
                *(["--sensitivity", "local"] if budget and rng.random() < 0.9 else []),
                *maybe(0.1, "--calib", pick([p["text"], p["missing"]])), *maybe(0.1, "--weights-only"),
                *maybe(0.1, "--target", pick(["host", "cpu", "cuda:abc", "gpu"])),
                *maybe(0.1, "--plan", pick([p["text"], p["config"], p["missing"]])), *maybe(0.05, "--ollama")]
        if "--budget" in args and "--calib" in args and "--stats" not in args:
            args += ["--budget", "1M"]  # never a whole calibration: the sizes alone refuse this budget
    elif command == "plan":
        args = [src, "--budget", pick(["20M", "1M", "abc", "64GiB"]), "-q", "--sensitivity", "local",
                *maybe(0.5, "--stats", pick([p["stats"], p["text"], p["missing"]])), *maybe(0.5, "-o", out),
                *maybe(0.2, "--ctx", pick(["512", "0"])), *maybe(0.2, "--kv-type", pick(["q8_0", "f64"])),
                *maybe(0.1, "--top-k", pick(["auto", "3"])), *maybe(0.1, "--target", pick(["cpu", "cuda:8G", "x"]))]
    elif command == "calibrate":
        args = [src, "--text", pick([p["text"]] * 3 + [p["gguf"], p["dir"], p["missing"], p["text"]]), "-o", out, "-q",
                "--max-tokens", pick(["64", "0"]), *maybe(0.1, "--whole"), *maybe(0.1, "--resume"),
                *maybe(0.1, "--max-memory", pick(["1K", "abc"]))]
    elif command == "card":
        args = [pick([p["gguf"], p["text"], p["missing"]]), *maybe(0.3, p["gguf"]), "-o", out,
                *maybe(0.2, "--results", pick([p["text"], p["stats"], p["config"]])),
                *maybe(0.2, "--eval-json", pick([p["text"], p["config"]]))]
    elif command == "modelfile":
        args = [pick([p["gguf"], p["gguf"], p["text"], p["missing"]]), *maybe(0.7, "-o", out),
                *maybe(0.2, "--ctx", pick(["0", "512"]))]
    elif command == "eval":
        args = [pick([p["gguf"], p["text"], p["missing"]]), "--base", pick([p["gguf"], p["model"], p["dir"]]),
                "--text", pick([p["text"], p["text"], p["gguf"]]), "--max-tokens", pick(["64", "1"]), "-q",
                "--chunk", "64", "--cache-dir", p["ws"] / "cache"]
    else:
        args = [src, "--budgets", pick(["1M", "abc", ""]), "--calib", p["text"], "--text", p["text"], "-o",
                pick([p["out"] / f"sweep{i}", p["dir"], p["model"], p["gguf"]]), "-q", "--baselines", ""]
    if not any(a is OUT for a in args):
        return [command, *map(str, args)], None
    # the output: a fresh name, a directory, a missing folder, or one of this command's own inputs
    named = [a for a in args if isinstance(a, Path) and a.exists()]
    named += [p["config"], p["tokenizer"]] if p["model"] in named else []
    out = pick([p["out"] / f"o{i}{pick(['.gguf', '.json', '.md', ''])}"] * 6 + [p["dir"], p["missing"], *named])
    return [command, *(str(out) if a is OUT else str(a) for a in args)], out


OUT = object()  # where a drawn command line names its output


def test_fuzzed_command_lines(pool, capsys, monkeypatch):
    rng = random.Random(SEED)
    inputs = [pool[k] for k in ("model", "gguf", "stats", "text")]  # (modelfile -o DIR writes into DIR)
    before = snapshot(inputs, content=True)
    quick = snapshot(inputs, content=False)
    outcomes = {0: 0, 1: 0}
    for i in range(CASES):
        argv, out = draw(rng, pool, i)
        existed = out is not None and out.exists()
        monkeypatch.setattr(sys, "argv", ["ggufmoe", *argv])
        with pytest.raises(SystemExit) as ended:
            cli.main()
            sys.exit(0)
        err = capsys.readouterr().err
        code = ended.value.code or 0
        case = f"case {i}: ggufmoe {' '.join(argv)} -> {code}\n{err}"
        assert code in (0, 1) and "Traceback" not in err, case
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == (code == 1), case
        assert snapshot(inputs, content=False) == quick, case
        if code == 1 and out is not None:
            assert existed or not out.exists(), case
            assert not list(out.parent.glob(f".{out.name}*")), case
        outcomes[code] += 1
    assert snapshot(inputs, content=True) == before
    assert outcomes[0] >= CASES // 10 and outcomes[1] >= CASES // 2, outcomes  # both kinds of outcome are drawn
