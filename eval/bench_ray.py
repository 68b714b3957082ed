"""`--ray` against one process, same work, same bytes; and what a cluster buys a 671B sweep (a projection).

    python eval/bench_ray.py [--synthetic DIR] [--skip-synthetic]

On this machine: a local Ray cluster of 2 worker nodes of 1 CPU each (``ray.cluster_utils.Cluster``, the head
holding no CPU) against one process with 2 threads: the same two cores, so the ratio is Ray's overhead here, not a
speed-up. Measured, each a fresh ``ggufmoe`` child process (wall time; the children's CPU time is the driver's):

- ``calibrate`` of the reference model (4096 tokens in 16 chunks: 2 shares), statistics compared;
- ``convert --type IQ2_XXS --keep 16`` of the reference model with those statistics, bytes compared;
- ``convert`` of a DeepSeek-V3-width synthetic checkpoint (``tools/make_synthetic.py --layers 2 --experts 32``,
  FP8 with block scales; experts IQ2_XXS with an importance matrix of ones, the rest Q4_K), bytes compared;
- Ray's own costs: an empty task's round trip, and the driver's write rate (64 MiB parts, fsync per tensor, as the
  writer does).

The projection for a 10-variant sweep of DeepSeek-V3 671B on 1, 4 and 16 nodes of 64 cores takes the CPU-seconds
measured here (conversion), in ``eval/results/rehearse_ds3.md`` (calibration) and stated assumptions (disks, network,
shared filesystem, llama.cpp's evaluation speed), and says which part stops scaling where. Writes
eval/results/bench_ray.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REF = ROOT / "models" / "refmoe-qwen3"
CALIB = ROOT / "tests" / "data" / "calib.txt"
GGUFMOE = str(Path(sys.executable).with_name("ggufmoe"))
OUT = ROOT / "eval" / "results" / "bench_ray"

# Assumptions of the projection (not measured here), each used where named.
NODE_CORES = 64
DISK_GBS = 3.0  # one NVMe drive per node, GB/s, read or write
NET_GBS = 3.1  # 25 Gb/s between nodes, GB/s
SHARED_FS_GBS = 10.0  # the shared filesystem's aggregate read rate, GB/s (a parallel filesystem; NFS: ~1)
EVAL_MIN = 10.0  # llama.cpp validate + eval of one 671B variant on one 64-core node, minutes (see the notes)
CALIB_CPU_H = 25.6  # CPU-hours of a 100k-token calibration of the 671B model (eval/results/rehearse_ds3.md)
WEIGHTS_TB = 0.673  # the 671B checkpoint (FP8 + BF16 embeddings), read once per calibration share or conversion
VARIANT_GB = 128.0  # each variant's file, written by the driver
PARAMS_671B = 671e9


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the child and its own children) of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def worst_relative(a: Path, b: Path) -> float:
    from ggufmoe.stats.file import load_stats

    one, two = load_stats(a), load_stats(b)
    worst = 0.0
    pairs = [(e.in_sum2, two.imatrix.entries[n].in_sum2) for n, e in one.imatrix.entries.items()]
    pairs += [(e.counts, two.imatrix.entries[n].counts) for n, e in one.imatrix.entries.items()]
    pairs += [(getattr(s, k), getattr(two.layers[il], k)) for il, s in one.layers.items()
              for k in ("counts", "weight_mass", "reap_sum")]
    for x, y in pairs:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float((np.abs(x - y) / np.maximum(np.abs(x), 1e-30)).max()))
    return worst


def ray_overheads(address: str) -> dict:
    """An empty task's round trip (mean over 200, 2 in flight at most) and 64 MiB objects through the object store."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        noop = ray.remote(num_cpus=1)(lambda: None)
        ray.get(noop.remote())
        t0 = time.perf_counter()
        for _ in range(100):
            ray.get([noop.remote(), noop.remote()])
        task = (time.perf_counter() - t0) / 200
        blob = ray.remote(num_cpus=1)(lambda: np.ones(64 << 20, np.uint8))
        ray.get(blob.remote())
        t0 = time.perf_counter()
        got = sum(ray.get(blob.remote()).nbytes for _ in range(8))
        transfer = got / (time.perf_counter() - t0)
    finally:
        ray.shutdown()
    return dict(task_round_trip_s=task, object_gbs=transfer / 1e9)


def write_rate(where: Path) -> float:
    """GB/s of the driver's writing: 16 tensors of 4 x 64 MiB parts, each tensor flushed and fsynced."""
    part = np.ones(64 << 20, np.uint8)
    path = where / "write-rate.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(16):
            for _ in range(4):
                f.write(part.data)
            f.flush()
            os.fsync(f.fileno())
    rate = 16 * 4 * part.nbytes / (time.perf_counter() - t0)
    path.unlink()
    return rate / 1e9


def start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, object_store_memory=200 << 20,
                                                                include_dashboard=False))
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=200 << 20)
    cluster.wait_for_nodes()
    return cluster


def synthetic(where: Path) -> tuple[Path, Path]:
    """The DeepSeek-V3-width checkpoint and an importance matrix of ones for it."""
    model = where / "ds3"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), str(model), "--layers", "2",
                        "--experts", "32", "-q"], check=True)
    ones = where / "ones.gguf"
    if not ones.is_file():
        from ggufmoe.arch import architecture_for
        from ggufmoe.source import open_source
        from ggufmoe.stats.imatrix import Imatrix, ImatrixEntry, save_imatrix

        arch = architecture_for(open_source(model))
        entries = {}
        for s in arch.tensors():
            if s.is_expert and len(s.shape) == 3:
                entries[s.name] = ImatrixEntry(np.ones((s.shape[0], s.shape[-1]), np.float32),
                                               np.ones(s.shape[0], np.float32))
        save_imatrix(Imatrix(entries, ["ones"], 1, 512), ones)
    return model, ones


def run_pairs(address: str, work: Path, ds3: tuple[Path, Path] | None) -> list[dict]:
    ray = [f"--ray={address}"]
    rows = []
    s1, s2 = work / "stats-1.gguf", work / "stats-ray.gguf"
    calib = ["calibrate", str(REF), "--text", str(CALIB), "--max-tokens", "4096", "--chunk", "256", "-q"]
    one = timed([GGUFMOE, *calib, "-o", str(s1)])
    two = timed([GGUFMOE, *calib, "-o", str(s2), *ray])
    rows.append(dict(work="calibrate reference model, 4096 tokens", one=one, ray=two,
                     same=f"worst relative difference {worst_relative(s1, s2):.1e}"))
    conv = ["convert", str(REF), "--type", "IQ2_XXS", "--keep", "16", "--stats", str(s1), "-q"]
    one = timed([GGUFMOE, *conv, "-o", str(work / "ref-1.gguf"), "--threads", "2"])
    two = timed([GGUFMOE, *conv, "-o", str(work / "ref-ray.gguf"), *ray])
    same = (work / "ref-1.gguf").read_bytes() == (work / "ref-ray.gguf").read_bytes()
    rows.append(dict(work="convert reference model IQ2_XXS, 16 of 24 experts", one=one, ray=two,
                     same="byte-identical" if same else "DIFFERENT", bytes=(work / "ref-1.gguf").stat().st_size))
    if ds3 is not None:
        model, ones = ds3
        conv = ["convert", str(model), "--type", "Q4_K", "--tensor-type", r"_exps\.=IQ2_XXS", "--imatrix", str(ones),
                "-q"]
        one = timed([GGUFMOE, *conv, "-o", str(work / "ds3-1.gguf"), "--threads", "2"])
        two = timed([GGUFMOE, *conv, "-o", str(work / "ds3-ray.gguf"), *ray])
        a, b = work / "ds3-1.gguf", work / "ds3-ray.gguf"
        same = a.stat().st_size == b.stat().st_size and _same_file(a, b)
        params = sum(int(np.prod(s.shape)) for s in _specs(model))
        rows.append(dict(work="convert DeepSeek-V3 width, 2 layers x 32 experts (FP8), experts IQ2_XXS, rest Q4_K",
                         one=one, ray=two, same="byte-identical" if same else "DIFFERENT", bytes=a.stat().st_size,
                         params=params))
        for f in (a, b):
            f.unlink()
    return rows


def _same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(64 << 20), fb.read(64 << 20)
            if x != y:
                return False
            if not x:
                return True


def _specs(model: Path):
    from ggufmoe.arch import architecture_for
    from ggufmoe.source import open_source

    return list(architecture_for(open_source(model)).tensors())


def projection(rows: list[dict]) -> dict:
    """A 10-variant sweep of DeepSeek-V3 671B (100k calibration tokens) on 1, 4 and 16 nodes of 64 cores, as `sweep
    --ray` runs it (the calibration in shares, then each point on a node of its own), and one variant by `convert --ray`
    over all the nodes."""
    ds3 = next((r for r in rows if "params" in r), None)
    out = dict(assumptions=dict(node_cores=NODE_CORES, disk_gbs=DISK_GBS, net_gbs=NET_GBS,
                                shared_fs_gbs=SHARED_FS_GBS, eval_min=EVAL_MIN, calib_cpu_h=CALIB_CPU_H,
                                weights_tb=WEIGHTS_TB, variant_gb=VARIANT_GB, variants=10), nodes={})
    if ds3 is None:
        return out
    out["conv_cpu_s_per_bparam"] = ds3["one"][1] / ds3["params"] * 1e9
    conv_cpu_h = out["conv_cpu_s_per_bparam"] * PARAMS_671B / 1e9 / 3600
    out["conv_cpu_h"] = conv_cpu_h
    read_min = WEIGHTS_TB * 1e3 / 60  # GB of the checkpoint, in GB-minutes: divide by a rate in GB/s

    def fs(k: int) -> float:
        """GB/s each of ``k`` nodes gets reading or writing the shared filesystem at once."""
        return min(SHARED_FS_GBS / k, NET_GBS)

    for n in (1, 4, 16):
        # calibration: one share a node, each reading every weight once
        calib_cpu = CALIB_CPU_H * 60 / (n * NODE_CORES)
        calib_read = read_min / fs(n)
        calib = max(calib_cpu, calib_read)
        # points: each on a node of its own, k at once, in rounds; a point converts with its node's cores (reading the
        # checkpoint, writing its file on the shared filesystem), then validates and evaluates there
        k, rounds = min(n, 10), -(-10 // n)
        point_cpu = conv_cpu_h * 60 / NODE_CORES
        point_read = read_min / fs(k)
        point_write = VARIANT_GB / fs(k) / 60
        point = max(point_cpu, point_read) + point_write + EVAL_MIN
        # one variant by convert --ray over all the nodes: the driver writes it
        one_cpu = conv_cpu_h * 60 / (n * NODE_CORES)
        one_read = read_min / SHARED_FS_GBS
        one_write = VARIANT_GB / (min(DISK_GBS, NET_GBS) if n > 1 else DISK_GBS) / 60
        out["nodes"][n] = dict(
            calibration_min=calib, calib_limit="CPU" if calib_cpu >= calib_read else "shared filesystem reads",
            rounds=rounds, at_once=k, point_min=point, point_cpu_min=point_cpu, point_read_min=point_read,
            point_write_min=point_write, point_limit="CPU" if point_cpu >= point_read else "shared filesystem reads",
            points_min=rounds * point, total_h=(calib + rounds * point) / 60,
            one_variant_min=max(one_cpu, one_read, one_write),
            one_limit=max((("CPU", one_cpu), ("shared filesystem reads", one_read), ("the driver's writes", one_write)),
                          key=lambda kv: kv[1])[0])
    return out


def report(rows: list[dict], overheads: dict, write_gbs: float, proj: dict) -> str:
    lines = ["# `--ray` on a 2-node local cluster against one process, and a 671B sweep on 1-16 nodes", "",
             "Measured by `eval/bench_ray.py` on this machine "
             f"({os.cpu_count()} cores, a shared virtual machine: walls vary with its neighbours). One process with 2 "
             "threads against a local Ray cluster of 2 worker nodes of 1 CPU each (the head node holds no CPU): the "
             "same two cores, so the ratio is what Ray costs here, not a speed-up. Wall and CPU seconds of each "
             "`ggufmoe` child process (with `--ray` the CPU is the driver's only; the workers' is not counted).", "",
             "| work | one process wall | --ray wall | ratio | driver CPU one / --ray | output |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['work']} | {r['one'][0]:.1f} s | {r['ray'][0]:.1f} s | {r['ray'][0] / r['one'][0]:.2f}x "
                     f"| {r['one'][1]:.1f} s / {r['ray'][1]:.1f} s | {r['same']} |")
    lines += ["", f"Ray's own costs here: an empty task's round trip {1e3 * overheads['task_round_trip_s']:.1f} ms; "
              f"64 MiB results through the object store at {overheads['object_gbs']:.2f} GB/s; the driver writes "
              f"at {write_gbs:.2f} GB/s on this machine's virtual disk (64 MiB parts, fsync per tensor; the projection "
              "below assumes a node's NVMe instead). A conversion's task reads at least 16 MiB of float32 (small "
              "tensors batched), so the round trip is under 1% of a task at these rates.", ""]
    if not proj.get("nodes"):
        return "\n".join(lines)
    a = proj["assumptions"]
    lines += ["## Projection: a 10-variant sweep of DeepSeek-V3 671B on nodes of 64 cores", "",
              f"Conversion CPU: {proj['conv_cpu_s_per_bparam']:.0f} CPU-s per billion parameters, measured above (the "
              f"DeepSeek-V3-width conversion, one process) -> {proj['conv_cpu_h']:.1f} CPU-hours per 671B variant. "
              f"Calibration: {a['calib_cpu_h']} CPU-hours for 100k tokens (`eval/results/rehearse_ds3.md`), one share "
              f"per node, each reading the {a['weights_tb']} TB checkpoint once. Assumed, not measured: "
              f"{a['node_cores']} cores a node, {a['disk_gbs']} GB/s local disk, {a['net_gbs']} GB/s a node's network "
              f"(25 Gb/s), a shared filesystem serving {a['shared_fs_gbs']} GB/s in all, {a['variant_gb']:.0f} GB per "
              f"variant, and {a['eval_min']:.0f} min of llama.cpp validate + eval per variant on its node (37B active "
              "parameters x 8192 tokens = 0.6 PFLOP at ~1-2 TFLOP/s of quantized CPU matmuls, plus loading the file). "
              "The base the variants are scored against is not counted: an F16 671B (1.34 TB) does not fit one such "
              "node, so a sweep of it scores against a Q8_0 base (713 GB) on a node with the memory, or by perplexity.",
              "",
              "`sweep --ray` as it runs: the calibration in one share a node, then each point (plan, convert with its "
              "node's cores, validate, evaluate) on a node of its own, as many at once as there are nodes; the last "
              "column is one variant by `convert --ray` over all the nodes, written by the driver.", "",
              "| nodes | calibration | limit | points at once x rounds | one point: convert CPU / reads / write + eval "
              "| 10 points | sweep total | one variant by convert --ray | limit |",
              "|---:|---:|---|---:|---|---:|---:|---:|---|"]
    for n, p in proj["nodes"].items():
        lines.append(f"| {n} | {p['calibration_min']:.0f} min | {p['calib_limit']} | {p['at_once']} x {p['rounds']} | "
                     f"{p['point_cpu_min']:.0f} / {p['point_read_min']:.0f} / {p['point_write_min']:.1f} + "
                     f"{a['eval_min']:.0f} min | {p['points_min']:.0f} min | **{p['total_h']:.1f} h** | "
                     f"{p['one_variant_min']:.0f} min | {p['one_limit']} |")
    lines += ["", "How: calibration = max(CPU-hours / (64 n), the checkpoint read by every node at once through the "
              "shared filesystem); a point = max(its conversion's CPU-hours / 64, its read of the checkpoint at its "
              "share of the filesystem) + writing its file + its evaluation; rounds of as many points as nodes; "
              "one variant by `convert --ray` = max(CPU-hours / (64 n), one read of the checkpoint, 128 GB through the "
              "driver's disk or network). What scales: the quantization and the evaluations, point by point, up to "
              "ten nodes for ten variants (a point runs on one node: more nodes only help the calibration and a "
              "single `convert --ray`). What does not: every calibration share and every point reads the whole "
              "checkpoint, so the shared filesystem's aggregate rate becomes the limit as nodes are added, and the "
              "calibration gets slower from some node count on (each share re-reads every weight: token-parallel, "
              "not layer-parallel); a single `convert --ray` stops at the driver writing the file in order (128 GB at "
              f"{min(a['disk_gbs'], a['net_gbs']):.1f} GB/s is {a['variant_gb'] / min(a['disk_gbs'], a['net_gbs']) / 60:.1f} min) and "
              "at the one read of the checkpoint.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", type=Path, help="where the DeepSeek-V3-width checkpoint is (made if missing)")
    ap.add_argument("--skip-synthetic", action="store_true", help="only the reference model")
    ap.add_argument("--from-json", action="store_true", help="no measuring: the report again from the JSON kept")
    args = ap.parse_args()
    if args.from_json:
        kept = json.loads(OUT.with_suffix(".json").read_text())
        rows, overheads, write_gbs = kept["rows"], kept["overheads"], kept["write_gbs"]
    else:
        rows, overheads, write_gbs = measure(args)
    proj = projection(rows)
    OUT.with_suffix(".json").write_text(json.dumps(dict(rows=rows, overheads=overheads, write_gbs=write_gbs,
                                                        projection=proj), indent=1))
    OUT.with_suffix(".md").write_text(report(rows, overheads, write_gbs, proj))
    print(OUT.with_suffix(".md").read_text())


def measure(args) -> tuple[list[dict], dict, float]:
    """The pairs, Ray's own costs and the driver's write rate, measured here."""
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        ds3 = None if args.skip_synthetic else synthetic(args.synthetic or work)
        cluster = start_cluster()
        try:
            rows = run_pairs(cluster.address, work, ds3)
            overheads = ray_overheads(cluster.address)
        finally:
            cluster.shutdown()
        write_gbs = write_rate(work)
    return rows, overheads, write_gbs


if __name__ == "__main__":
    main()
