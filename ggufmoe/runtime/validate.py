"""Run a GGUF in llama.cpp under an enforced memory limit: does it load, fill a context and
generate, and how much memory and time does that take?

The limit is on the whole process, as a plan's memory is (:mod:`ggufmoe.plan.process`): "fits" means the
child's peak RSS (VmHWM) stayed within it. The model runs in a child process (``python -m
ggufmoe.runtime.validate_child``: the standard library and llama_cpp only, ``MALLOC_ARENA_MAX=1``) whose memory
the kernel limits as well, from the moment it has imported llama_cpp:

* cgroup v2, when the current unified cgroup lets us create a child with a ``memory.max``: the limit less
  what the interpreter then holds (its VmRSS; the child cgroup is removed afterwards);
* otherwise RLIMIT_AS, the address space: its VmSize then + the limit + the ranges the run reserves and never
  touches that grow with the model (:func:`address_reserve`: llama-cpp-python's n_batch x n_vocab scores array,
  0.5 GB at a 248k vocabulary; llama.cpp's scheduler for a graph budget beyond its default, 0.4 GB for the
  delta-rule hybrids). The address space exceeds resident memory (the memory-mapped model file counts in full as
  soon as it is mapped, and so do reserved but untouched ranges, 8 MiB of stack per llama.cpp thread among them),
  so it cannot hold the process to the limit exactly: it stops a runaway, and the peak RSS decides.

The run: load, evaluate a full context of ``ctx`` tokens (the prompt repeated) asking for
every token's logits (llama.cpp's worst case, which ``memory.runtime_memory`` plans by
default), then greedily generate ``n_predict`` tokens after the prompt in a cleared context.

It runs as its target (:mod:`ggufmoe.plan.target`) says: ``cpu`` with repacking off
(``use_extra_bufts=false``), ``host`` and ``cpu-repack`` with llama.cpp's defaults, ``cuda`` with every
layer offloaded and without mmap (the offloaded weights are read through staging buffers instead of
mapped pages, which with mmap pass through the process's RSS while loading). It warns, in one line,
when that is not the plan's target, or when this machine cannot be it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ggufmoe.arch.registry import gguf_shape
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.qtypes import FLOAT_TYPES
from ggufmoe.plan.budget import DEFAULT_CTX, Plan
from ggufmoe.plan.kv_types import DEFAULT_KV_TYPE, KV_TYPES, KvType
from ggufmoe.plan.process import interpreter_baseline
from ggufmoe.plan.target import HOST, Target, TargetPreset
from ggufmoe.source.gguf_file import gguf_files
from ggufmoe.units import format_size

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
_METHODS = {"cgroup": "cgroup v2 memory.max", "rlimit": "RLIMIT_AS"}
# Address space llama.cpp's scheduler reserves but does not touch per graph node it budgets beyond the default
# 1024 (ggml-backend.cpp, ggml_backend_sched_new): a context of 2 x 30 split-input tensors (336 B each) and four
# node-backend arrays of 61 int32 a node: 21,136 B; measured 21.1-21.2 KB (VmPeak less VmHWM, qwen35moe against
# qwen3moe at n_ubatch 512 and 128)
SCHED_RESERVE_PER_NODE, DEFAULT_GRAPH_NODES = 21_136, 1024
N_UBATCH = 512  # llama-cpp-python's n_batch and n_ubatch default, which the child runs with


def address_reserve(path: Path) -> int:
    """Address space the run reserves for ``path`` and never touches, beyond what every model's run reserves:
    llama-cpp-python's scores array (n_batch x n_vocab float32; the child decodes through the low-level API, which
    does not fill it) and llama.cpp's scheduler for a graph budget beyond its default. 0 for a file whose
    architecture ggufmoe does not read."""
    try:
        shape = gguf_shape(path)
    except (KeyError, ValueError, TypeError):  # not an MoE architecture we read
        return 0
    scores = 4 * N_UBATCH * shape.n_vocab
    return scores + SCHED_RESERVE_PER_NODE * max(0, shape.graph_max_nodes(N_UBATCH) - DEFAULT_GRAPH_NODES)


@dataclass
class ValidateResult:
    path: Path             # the file given to llama.cpp (the first shard of a split GGUF)
    files: list[Path]      # every shard
    file_bytes: int        # summed over the shards
    limit: int
    method: str            # "cgroup" or "rlimit"
    ctx: int
    kv_type: str
    baseline_vm: int       # the child's address space after importing llama_cpp, before loading
    baseline_rss: int      # its resident memory then
    peak_vm: int           # VmPeak
    peak_rss: int          # VmHWM
    load_s: float
    prompt_tokens: int
    prompt_s: float
    gen_tokens: int
    gen_s: float
    text: str

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def gen_tps(self) -> float:
        return self.gen_tokens / self.gen_s if self.gen_s else 0.0


class _Cgroup:
    """A child of the current cgroup v2 with ``memory.max``, or nothing when not possible."""

    def __init__(self, limit: int):
        self.path: Path | None = None
        root = Path("/sys/fs/cgroup")
        try:
            if not (root / "cgroup.controllers").exists():
                return  # no unified hierarchy mounted
            line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::"))
            path = root / line[3:].lstrip("/") / f"ggufmoe-validate-{os.getpid()}"
            path.mkdir()
        except (OSError, StopIteration):
            return
        try:
            (path / "memory.max").write_text(str(limit))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
            self.path = path
        except OSError:  # no memory controller here
            path.rmdir()

    def oom_killed(self) -> bool:
        try:
            events = (self.path / "memory.events").read_text() if self.path else ""
        except OSError:
            return False
        return any(line.split()[0] == "oom_kill" and line.split()[1] != "0" for line in events.splitlines())

    def remove(self) -> None:
        for _ in range(50):
            try:
                if self.path:
                    self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def target_mismatch(files: list[Path], target: Target, planned: Target | None = None) -> str | None:
    """Why a run here as ``target`` does not measure what a plan for ``planned`` predicts, or None: another
    target than the plan's; a cpu-repack run whose file this host's llama.cpp repacks otherwise; a cuda run
    without a GPU llama.cpp can offload to."""
    from ggufmoe.plan.memory import weight_memory

    if planned is not None and str(planned) != str(target):
        return f"the plan is for target {planned}, this run is {target}: the measured memory is not the plan's"
    if target.preset == TargetPreset.CPU_REPACK and weight_memory(files, target) != weight_memory(files, HOST):
        return ("target cpu-repack, but this host's llama.cpp repacks other tensors of this file (its CPU lacks "
                "AVX2/AVX512 or its build repacks otherwise): the measured memory is not the plan's")
    if target.offload:
        import llama_cpp

        if not llama_cpp.llama_supports_gpu_offload():
            return f"target {target}, but this llama.cpp cannot offload to a GPU: it runs on the CPU"
    return None


@dataclass(frozen=True)
class RunSettings:
    """What a validation runs as: the memory limit on the whole process, the context, KV type and target."""

    limit: int
    ctx: int = DEFAULT_CTX
    kv_type: KvType = DEFAULT_KV_TYPE
    target: Target = HOST


def run_settings(plan: Plan | None, limit: int | None = None, ctx: int | None = None, kv_type: KvType | None = None,
                 target: Target | None = None) -> tuple[RunSettings, list[str]]:
    """The settings given, the rest from ``plan`` (its memory budget, or its predicted memory when it budgeted
    the file alone; its context, KV type and target), else the defaults; and the lines to say: what comes from
    the plan, and a warning for a context or KV type given that is not the plan's (the target's is
    :func:`target_mismatch`)."""
    if plan is None:
        if limit is None:
            raise GgufmoeError("give --memory-limit, or --plan to take the plan's")
        return RunSettings(limit, ctx or DEFAULT_CTX, kv_type or DEFAULT_KV_TYPE, target or HOST), []
    planned = {"memory limit": (plan.memory["total"] if plan.weights_only else plan.budget, limit, format_size),
               "context": (plan.ctx, ctx, str), "KV type": (KvType(plan.kv_type), kv_type, str),
               "target": (plan.machine(), target, str)}
    taken = [f"{k} {show(mine)}" for k, (mine, given, show) in planned.items() if given is None]
    notes = [f"from the plan: {', '.join(taken)}"] if taken else []
    notes += [f"warning: the plan's {k} is {show(mine)}, this run's {show(given)}: the measured memory is not the "
              f"plan's" for k, (mine, given, show) in planned.items()
              if k in ("context", "KV type") and given is not None and given != mine]
    chosen = {k: mine if given is None else given for k, (mine, given, _) in planned.items()}
    return RunSettings(chosen["memory limit"], chosen["context"], chosen["KV type"], chosen["target"]), notes


def validate(path: str | Path, limit: int, ctx: int = DEFAULT_CTX, prompt: str = DEFAULT_PROMPT, n_predict: int = 16,
             threads: int | None = None, timeout: float | None = None, target: Target = HOST,
             planned: Target | None = None, kv_type: KvType = DEFAULT_KV_TYPE) -> ValidateResult:
    """Load and run ``path`` in llama.cpp as ``target`` with a ``kv_type`` KV cache under a memory limit of
    ``limit`` bytes on the whole process (see the module docstring); raise :class:`GgufmoeError` with a
    one-line reason when it does not fit or does not run. A run that does not measure what a plan for
    ``planned`` (or for ``target``) predicts is said on stderr (:func:`target_mismatch`)."""
    if limit <= 0:
        raise GgufmoeError("the memory limit must be positive")
    if limit <= (base := interpreter_baseline()):
        raise GgufmoeError(f"a memory limit of {format_size(limit)} is not even what Python with llama_cpp holds before "
                           f"it loads a model ({format_size(base)}): the limit is on the whole process")
    if n_predict >= ctx:
        raise GgufmoeError(f"--n-predict ({n_predict}) must be smaller than --ctx ({ctx})")
    files = gguf_files(path)
    name, size = files[0].name, sum(f.stat().st_size for f in files)
    warning = target_mismatch(files, target, planned)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    cgroup = _Cgroup(limit)
    req = dict(path=str(files[0]), limit=limit, address_reserve=address_reserve(files[0]), ctx=ctx, prompt=prompt,
               n_predict=n_predict, threads=threads,
               cgroup=str(cgroup.path) if cgroup.path else None, repack=target.preset != TargetPreset.CPU,
               offload=target.offload, kv_type=int(KV_TYPES[kv_type]),
               flash_attn=KV_TYPES[kv_type] not in FLOAT_TYPES)  # a quantized V cache needs it, as planned
    env = dict(os.environ, MALLOC_ARENA_MAX="1", GGML_NO_BACKTRACE="1")  # no gdb on a GGML_ASSERT
    with tempfile.TemporaryDirectory(prefix="ggufmoe-validate-") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        try:
            with open(log, "wb") as err:
                proc = subprocess.Popen([sys.executable, "-m", "ggufmoe.runtime.validate_child", json.dumps(req), str(result)],
                                        stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env)
                try:
                    rc = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    raise GgufmoeError(f"{name} did not finish within {timeout:g} s under a memory limit of "
                                       f"{format_size(limit)}") from None
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            oom = cgroup.oom_killed()
        finally:
            cgroup.remove()
        try:
            out = json.loads(result.read_text())
        except (OSError, ValueError):  # never started, or killed while writing
            out = {}
        last = next((x.strip() for x in reversed(log.read_text(errors="replace").splitlines()) if x.strip()), "")
        last = re.sub(r"^/\S*/(\S+:\d+: )", r"\1", last)[:200]  # ggml.c:1644: GGML_ASSERT(...) failed
    method = out.get("method") or ("cgroup" if cgroup.path else "rlimit")
    where = f"under a memory limit of {format_size(limit)} ({_METHODS[method]})"
    if not out.get("ok"):
        raise GgufmoeError(f"{name} does not fit or does not run {where}: {_reason(rc, out, oom, last, ctx)}")
    r = ValidateResult(path=files[0], files=files, file_bytes=size, limit=limit, method=method, ctx=ctx, kv_type=kv_type,
                       **{k: out[k] for k in ("baseline_vm", "baseline_rss", "peak_vm", "peak_rss", "load_s",
                                              "prompt_tokens", "prompt_s", "gen_tokens", "gen_s", "text")})
    if r.peak_rss > limit:
        raise GgufmoeError(f"{name} ran {where} but does not fit: the process's peak RSS, {format_size(r.peak_rss)}, "
                           f"exceeds it")
    return r


def _reason(rc: int, out: dict, oom: bool, last: str, ctx: int) -> str:
    """Why the child failed, in a few words."""
    stage = {"load": "loading the model", "context": f"evaluating a context of {ctx} tokens",
             "generate": "generating"}.get(out.get("stage", ""), "starting")
    error = out.get("error", "")
    if oom:
        return f"killed by the out-of-memory killer while {stage}"
    if rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        what = "aborted (SIGABRT)" if sig == "SIGABRT" else f"was killed by {sig}"
        return f"llama.cpp {what} while {stage}" + (f" ({last})" if last else "")
    if error == "MemoryError":
        return f"out of memory (MemoryError) while {stage}"
    if error.startswith("ValueError: Failed to load model"):
        return "llama.cpp could not load the model (an allocation failed, or the file is not loadable)"
    if error.startswith("ValueError: Failed to create llama_context"):
        return "llama.cpp could not allocate its context (KV cache, compute buffers)"
    if error.startswith("RuntimeError: llama_decode returned"):
        return f"llama.cpp could not allocate memory while {stage} ({error[14:]})"
    if error:
        return f"{error[:200]} while {stage}"
    if "Thread creation failed" in last:
        return (f"llama.cpp could not start its threads while {stage}: their stacks do not fit in the address space "
                f"the limit leaves ({last})")
    return f"llama.cpp exited with code {rc} while {stage}" + (f" ({last})" if last else "")


def format_result(r: ValidateResult) -> str:
    """A readable report of a successful run."""
    shards = f", {len(r.files)} shards" if len(r.files) > 1 else ""
    how = {"rlimit": f"peak RSS, with RLIMIT_AS as a backstop (address space: {format_size(r.baseline_vm)} before "
                     f"loading + the limit + the model's untouched reserve)",
           "cgroup": "cgroup v2 memory.max (the limit less what the process held before loading) and peak RSS"}
    return "\n".join([
        f"{r.path.name}: fits and runs in {format_size(r.limit)}: the whole process peaked at {format_size(r.peak_rss)} "
        f"(ctx {r.ctx}, KV {r.kv_type})",
        f"  file:          {format_size(r.file_bytes)}{shards}",
        f"  limit method:  {how[r.method]}",
        f"  load:          {r.load_s:.2f} s",
        f"  peak RSS:      {format_size(r.peak_rss)}: Python with llama_cpp {format_size(r.baseline_rss)} before loading, "
        f"the model and llama.cpp {format_size(r.peak_rss - r.baseline_rss)}",
        f"  peak address:  {format_size(r.peak_vm)} ({format_size(r.peak_vm - r.baseline_vm)} added by the model and llama.cpp)",
        f"  prompt:        {r.prompt_tokens} tokens (full context) at {r.prompt_tps:.1f} tokens/s",
        f"  generation:    {r.gen_tokens} tokens at {r.gen_tps:.1f} tokens/s",
        f"  sample:        {r.text!r}",
    ])
