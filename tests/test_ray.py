"""The commands on a real two-node Ray cluster (``--ray``): the same statistics and the same bytes as in one process,
a worker killed mid-conversion, and the one-line errors when Ray is missing or the cluster does not answer."""

import os
import signal
import subprocess
import threading
import time

from pathlib import Path

import numpy as np
import pytest

import tiny_models
from cli_run import GGUFMOE, assert_one_line_error, run
from test_resume import run_paused
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.prune.criteria import PruneRequest
from ggufmoe.quant.rules import TypeRules
from ggufmoe.stats.file import load_stats
from ggufmoe.stats.local_errors import KEY as LOCAL_KEY, LocalErrors

REF, CALIB = tiny_models.REF_MODEL, tiny_models.TEST_DATA / "calib.txt"
CALIBRATE = ("--text", CALIB, "--max-tokens", 2048, "--chunk", 256, "-q")  # 8 chunks: 4 a share
CONVERT = ("--type", "IQ2_XXS", "--keep", "16", "-q")  # slow enough to be caught mid-way


@pytest.fixture(scope="module")
def ray_installed() -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'ggufmoe[ray]')")


def calibrate_here(model: Path, out: Path) -> None:
    """``calibrate MODEL CALIBRATE -o OUT`` in this process."""
    from ggufmoe.pipeline.calibrate import calibrate

    calibrate(model, CALIB.read_text(), ctx=256, max_tokens=2048, out=out, progress=False, dataset=CALIB.name)


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    """The reference model calibrated in one process."""
    out = tmp_path_factory.mktemp("stats") / "stats.gguf"
    calibrate_here(REF, out)
    return out


@pytest.fixture(scope="module")
def here(stats, tmp_path_factory):
    """The reference model converted in one process (``CONVERT`` with ``stats``)."""
    out = tmp_path_factory.mktemp("here") / "here.gguf"
    return convert(REF, ConvertOptions(out=out, types=TypeRules.parse("IQ2_XXS"), stats=stats,
                                       prune=PruneRequest(keep=16), progress=False))[0]


def worst_relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.abs(a - b) / np.maximum(np.abs(a), 1e-30)).max())


def test_calibrate_on_ray_gives_the_same_statistics(ray_cluster, tmp_path):
    """A tiny seeded Qwen3-MoE (the reference model's calibration costs the conversion tests' fixture already)."""
    model = tmp_path / "tiny"
    tiny_models.build("qwen3moe", model)
    outs = tmp_path / "one.gguf", tmp_path / "ray.gguf"
    calibrate_here(model, outs[0])
    proc = run("calibrate", model, *CALIBRATE, "-o", outs[1], f"--ray={ray_cluster}")
    assert proc.returncode == 0, proc.stderr
    one, two = (load_stats(out) for out in outs)
    assert two.imatrix.chunk_count == one.imatrix.chunk_count == 8
    assert one.imatrix.entries.keys() == two.imatrix.entries.keys() and one.layers.keys() == two.layers.keys()
    worst = 0.0
    for name, e in one.imatrix.entries.items():
        worst = max(worst, worst_relative(e.in_sum2, two.imatrix.entries[name].in_sum2),
                    worst_relative(e.counts, two.imatrix.entries[name].counts))
    for il, s in one.layers.items():
        t = two.layers[il]
        assert s.n_tokens == t.n_tokens
        worst = max(worst, *(worst_relative(getattr(s, a), getattr(t, a)) for a in ("counts", "weight_mass", "reap_sum")))
    assert worst < 1e-5
    assert two.extras.keys() == one.extras.keys() == {LOCAL_KEY}
    mine, theirs = (LocalErrors.from_json(x.extras[LOCAL_KEY]) for x in (one, two))  # each layer's by one share
    assert theirs.quant.keys() == mine.quant.keys() and theirs.prune.keys() == mine.prune.keys()
    assert all(theirs.quant[n].keys() == mine.quant[n].keys() for n in mine.quant)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.gguf", "ray.gguf", "tiny"]  # no share left


def encode_workers() -> list[int]:
    """The processes running a conversion's pieces now (Ray titles a worker by the task it runs)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::encode_pieces"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_convert_on_ray_same_bytes_with_a_worker_killed(ray_cluster, stats, here, tmp_path):
    killed = []

    def kill_first_worker() -> None:
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for pid in encode_workers():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    proc = subprocess.run([GGUFMOE, "convert", str(REF), "-o", str(tmp_path / "ray.gguf"), *map(str, CONVERT),
                           "--stats", str(stats), f"--ray={ray_cluster}"], capture_output=True, text=True)
    killer.join()
    assert proc.returncode == 0, proc.stderr
    assert killed, "no encoding worker was seen running"
    assert (tmp_path / "ray.gguf").read_bytes() == here.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray.gguf"]


def test_convert_on_ray_within_a_small_bound_and_resumed_after_sigterm(ray_cluster, stats, here, tmp_path):
    """In this process with a bound of one byte in flight (each batch asked for only once the one before is written),
    and through the command: SIGTERM keeps the complete tensors, --resume on the cluster completes the same bytes."""
    from ggufmoe.cluster.ray_cluster import RayCluster
    from ggufmoe.cluster.session import RaySession

    with RaySession(ray_cluster) as session:
        bounded = convert(REF, ConvertOptions(out=tmp_path / "bounded.gguf", types=TypeRules.parse("IQ2_XXS"),
                                              stats=stats, prune=PruneRequest(keep=16), progress=False,
                                              cluster=RayCluster(session, 1)))
    assert bounded[0].read_bytes() == here.read_bytes()

    out = tmp_path / "ray.gguf"
    args = ["convert", REF, "-o", out, *CONVERT, "--stats", stats, f"--ray={ray_cluster}"]
    proc = run_paused(args, lambda p: p.send_signal(signal.SIGTERM), after=1)
    progress = tmp_path / ".ray.gguf.partial" / "progress.json"
    assert proc.returncode == 130 and "--resume" in proc.stderr and progress.exists() and not out.exists(), proc.stderr
    again = run(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resuming:" in again.stderr and out.read_bytes() == here.read_bytes()


def test_without_ray_installed_the_option_is_one_line(tmp_path):
    hidden = tmp_path / "no-ray"
    (hidden / "ray").mkdir(parents=True)
    (hidden / "ray" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    out = tmp_path / "out"
    out.mkdir()
    proc = run("convert", REF, "-o", out / "x.gguf", "--ray", env={"PYTHONPATH": str(hidden)})
    assert_one_line_error(proc, "--ray needs Ray", "pip install 'ggufmoe[ray]'")
    assert not list(out.iterdir())


def test_a_cluster_that_does_not_answer_is_one_line(ray_installed, tmp_path):
    proc = run("convert", REF, "-o", tmp_path / "x.gguf", "--ray=127.0.0.1:9")
    assert_one_line_error(proc, "--ray 127.0.0.1:9", "no Ray cluster answers there")
    assert not list(tmp_path.iterdir())


def test_a_cluster_gone_mid_conversion_is_one_line_and_resumes(ray_installed, stats, here, tmp_path):
    """Ray ends a driver whose cluster goes away; the command says so in one line and keeps the complete tensors,
    which --resume (here without a cluster) completes to the same bytes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=100 << 20,
                                                                include_dashboard=False))
    out = tmp_path / "ray.gguf"
    args = ["convert", REF, "-o", out, *CONVERT, "--stats", stats]
    try:
        cluster.wait_for_nodes()
        proc = run_paused([*args, f"--ray={cluster.address}"], lambda p: cluster.shutdown(), after=1)
    finally:
        cluster.shutdown()
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(lines) == 1 and "ended without finishing" in lines[0], proc.stderr
    assert "--resume" in lines[0] and not out.exists() and (tmp_path / ".ray.gguf.partial").exists()
    again = run(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resuming:" in again.stderr and out.read_bytes() == here.read_bytes()


def test_kept_shares_are_refused_without_resume_and_without_ray(ray_installed, tmp_path):
    """The shares a `--ray` calibration keeps are its own: a new run without --resume, or a run without --ray, says so
    in one line and leaves them."""
    kept = tmp_path / ".stats.gguf.share-1-of-2.gguf"
    kept.write_bytes(b"kept")
    args = ["calibrate", REF, *CALIBRATE, "-o", tmp_path / "stats.gguf"]
    assert_one_line_error(run(*args), "interrupted `--ray` calibration", "--ray --resume")
    assert_one_line_error(run(*args, "--ray"), "holds shares of an interrupted calibration", "--resume")
    assert kept.read_bytes() == b"kept" and sorted(p.name for p in tmp_path.iterdir()) == [kept.name]
