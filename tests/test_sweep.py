"""`ggufmoe sweep`: one command plans, converts, validates and evaluates several budgets plus a
llama.cpp baseline, writes the three result files, and a second run redoes nothing."""

import json
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import tiny_models
from cli_run import GGUFMOE
from ggufmoe.pipeline.sweep import Point, SweepOptions, format_table, load_results, pareto_front


TIMINGS = ("peak_rss", "prompt_tps", "gen_tps")  # what a point measures of the machine, not of the file


def sweep_command(out, *extra, calib=None, budgets="10M,14M") -> list[str]:
    calib = calib or out.parent / "calib.txt"
    if not calib.exists():
        calib.write_text((tiny_models.TEST_DATA / "calib.txt").read_text()[:60_000])
    return list(map(str, [GGUFMOE, "sweep", tiny_models.REF_MODEL, "--budgets", budgets, "--baselines", "Q2_K",
                          "--calib", calib, "--text", tiny_models.TEST_DATA / "eval_doc.txt", "--ctx", "1024",
                          "--max-tokens", "1024", "--threads", "2", "--target", "cpu", "--sensitivity", "local",
                          "-o", out, "-q", *extra]))  # local: no probe conversions (tests/test_sensitivity.py has them)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A sweep of the reference model in one process: its folder and the process."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    proc = subprocess.run(sweep_command(out), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_sweep_end_to_end_and_resume(swept):
    out, proc = swept
    cmd = sweep_command(out)
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["plan-10M", "llama.cpp-Q2_K", "plan-14M"]  # by size
    for r in rows:
        assert r["fits"] and r["peak_rss"] > 0 and r["gen_tps"] > 0, r
        assert 0 < r["kld_mean"] < r["kld_p99"] <= r["kld_p999"] and 0 < r["top1"] < 1 and r["ppl"] > r["ppl_base"] > 1
        assert 0 < r["same_top_p"] < 1 and r["commands"]
        assert (out / r["file"]).stat().st_size == r["file_bytes"]
        if r["kind"] == "ggufmoe":
            assert r["file_bytes"] <= r["budget"]
    assert rows[0]["kld_mean"] > rows[2]["kld_mean"]  # more bytes, less loss
    md = (out / "results.md").read_text()
    assert all(r["name"] in md for r in rows) and "KLD p99.9" in md and "same top-p" in md and "★" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in proc.stdout
    assert json.loads((out / "plan-10M.plan.json").read_text())["target"] == "cpu" and "target `cpu`" in md

    card = ModelCard.load(out / "README.md")  # the model card, read back offline from its path
    assert card.data.base_model == "refmoe-qwen3" and card.data.base_model_relation == "quantized"
    pruned = any(not r["experts"].startswith("24/") for r in rows)
    assert pruned and card.data.tags == ["gguf", "moe", "pruned"]
    table = [line for line in card.text.splitlines() if ".gguf |" in line]
    for r in rows:  # every file named, with its bits per weight and measured quality
        line = next(line for line in table if line.startswith(f"| {r['file']} |"))
        assert f"| {r['bpw']:.2f} |" in line and f"| {r['kld_p999']:.3f} |" in line and f"| {r['experts']} |" in line
    assert "memory at ctx 1024" in card.text and "![file size against KL divergence](pareto.png)" in card.text
    assert "`calib.txt` (60,000 bytes" in card.text
    for command in ("ggufmoe calibrate refmoe-qwen3 --text calib.txt -o stats.gguf",
                    "ggufmoe plan refmoe-qwen3 --budget 10M", "ggufmoe convert refmoe-qwen3 --plan plan-10M.plan.json",
                    "llama-quantize --imatrix stats.gguf base-F16.gguf llama.cpp-Q2_K.gguf Q2_K"):
        assert command in card.text, command

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}
    again = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == rows
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")} == stamps  # nothing redone


def test_sweep_on_ray_makes_the_same_files(ray_cluster, swept, tmp_path):
    """Two of the points (one per node) as tasks on a two-node cluster (the calibration and base conversion taken
    from the folder, as a resumed sweep takes them): the same files, byte for byte, and the same rows but for the
    machine's timings."""
    here, _ = swept
    out = tmp_path / "sweep"
    out.mkdir()
    for name in ("stats.gguf", "base-F16.gguf", "sweep.json"):
        shutil.copy(here / name, out / name)
    proc = subprocess.run(sweep_command(out, f"--ray={ray_cluster}", calib=here.parent / "calib.txt", budgets="10M"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, ours = (json.loads((d / "results.json").read_text()) for d in (here, out))
    rows = [r for r in rows if r["name"] in ("plan-10M", "llama.cpp-Q2_K")]
    assert [{k: v for k, v in r.items() if k not in TIMINGS} for r in ours] == \
        [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]
    for r in rows:
        assert (out / r["file"]).read_bytes() == (here / r["file"]).read_bytes(), r["file"]


def test_bad_budget_is_one_line(tmp_path):
    proc = subprocess.run([GGUFMOE, "sweep", str(tiny_models.REF_MODEL), "--budgets", "10M,lots", "--calib",
                           str(tiny_models.TEST_DATA / "calib.txt"), "--text",
                           str(tiny_models.TEST_DATA / "eval_doc.txt"), "-o", str(tmp_path / "s")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: Invalid value for '--budgets': cannot read size 'lots' (examples: 2G, 500M, 128GiB, 1000000) "
        "(see `ggufmoe sweep --help`)"]
    assert not (tmp_path / "s").exists()


def test_rows_from_before_the_new_metrics_still_load(tmp_path):
    old = asdict(Point("plan-10M", "ggufmoe", "plan-10M.gguf", 10, "20/24", 4, 20, kld_mean=0.1, kld_p99=0.5))
    for key in ("kld_p999", "same_top_p", "commands"):
        del old[key]
    (tmp_path / "results.json").write_text(json.dumps([old]))
    points = load_results(tmp_path / "results.json")
    assert points["plan-10M"].kld_p999 is None and points["plan-10M"].commands == []
    opts = SweepOptions([], Path("calib.txt"), Path("eval.txt"), tmp_path)
    row = next(line for line in format_table(list(points.values()), "m", opts).splitlines() if "plan-10M" in line)
    assert "| 0.500 | – |" in row  # p99, then no p99.9


def test_pareto_front():
    def p(name, size, kld):
        return Point(name, "ggufmoe", name, size, "24/24", 4, 0, kld_mean=kld)

    pts = [p("a", 1, 0.5), p("b", 2, 0.6), p("c", 3, 0.2), p("d", 3, 0.3), p("e", 4, 0.2)]
    assert [x.name for x in pareto_front(pts)] == ["a", "c"]
