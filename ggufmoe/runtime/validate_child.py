"""The child process of `ggufmoe validate`: limits its own memory, loads a GGUF with
llama-cpp-python, fills a context, generates, and writes what it measured as JSON.

    python -m ggufmoe.runtime.validate_child REQUEST_JSON RESULT_PATH

Imports the standard library and llama_cpp only (no torch; :mod:`ggufmoe.plan.process` is standard library
only), so its baseline is that of a bare interpreter with llama.cpp loaded, as plans measure it.
See :func:`ggufmoe.runtime.validate.validate`.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time

from ggufmoe.plan.process import status


def limit_memory(limit: int, cgroup: str | None, address_reserve: int = 0) -> str:
    """Limit this process's memory from now on; the method used.

    cgroup v2: move into ``cgroup`` and set its memory.max to ``limit`` less the VmRSS the process already holds
    (that memory stays charged to the old cgroup), so that the whole process stays within ``limit``. Else
    RLIMIT_AS at the current address space (VmSize) + ``limit`` + ``address_reserve`` (address space llama.cpp
    reserves and never touches): a backstop only, since the address space of a mapped file and of reserved stacks
    exceeds what is resident; the parent judges the peak RSS."""
    if cgroup:
        try:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            with open(os.path.join(cgroup, "memory.max"), "w") as f:
                f.write(str(max(limit - status("VmRSS"), 0)))
            return "cgroup"
        except OSError:
            pass
    vm = status("VmSize") + limit + address_reserve
    resource.setrlimit(resource.RLIMIT_AS, (vm, vm))
    return "rlimit"


@contextlib.contextmanager
def repacking(on: bool):
    """Models loaded within have llama.cpp's CPU repacking on (its default) or off: ``use_extra_bufts`` of
    the model parameters, which ``llama_cpp.Llama`` takes from ``llama_model_default_params`` without
    exposing it."""
    from llama_cpp import llama_cpp as lib

    defaults = lib.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = on
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = defaults


def run(req: dict, out: dict, stage) -> None:
    """Fill ``out`` with the measurements; ``stage(name)`` records progress for the parent."""
    import llama_cpp

    out["baseline_vm"], out["baseline_rss"] = status("VmSize"), status("VmRSS")
    out["method"] = limit_memory(req["limit"], req.get("cgroup"), req.get("address_reserve", 0))
    stage("load")
    t = time.perf_counter()
    with repacking(req["repack"]):
        llm = llama_cpp.Llama(model_path=req["path"], n_ctx=req["ctx"], n_threads=req["threads"],
                              n_threads_batch=req["threads"], verbose=False, n_gpu_layers=-1 if req["offload"] else 0,
                              use_mmap=not req["offload"], type_k=req["kv_type"], type_v=req["kv_type"],
                              flash_attn=req["flash_attn"])
    out["load_s"] = time.perf_counter() - t

    # a full context, every token's logits requested (llama.cpp's worst case, what the memory
    # model plans by default); decoded as Llama.eval does, without keeping logits in Python
    stage("context")
    prompt = llm.tokenize(req["prompt"].encode(), add_bos=True)
    body = llm.tokenize(req["prompt"].encode(), add_bos=False) or prompt
    ctx = llm.n_ctx()
    tokens = (prompt + body * (ctx // len(body) + 1))[:ctx]
    t = time.perf_counter()
    for i in range(0, ctx, llm.n_batch):
        llm._batch.set_batch(tokens[i:i + llm.n_batch], n_past=i, logits_all=True)
        llm._ctx.decode(llm._batch)
    out["prompt_tokens"], out["prompt_s"] = ctx, time.perf_counter() - t

    stage("generate")
    llm.reset()
    llm.eval(prompt[:ctx - req["n_predict"]])
    generated = []
    t = time.perf_counter()
    while len(generated) < req["n_predict"] and llm.n_tokens < ctx:
        tok = llm.sample(temp=0.0)
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
            break
        generated.append(tok)
        llm.eval([tok])
    out["gen_tokens"], out["gen_s"] = len(generated), time.perf_counter() - t
    out["text"] = llm.detokenize(generated).decode("utf-8", errors="replace")
    out["peak_vm"], out["peak_rss"] = status("VmPeak"), status("VmHWM")
    out["ok"] = True
    llm.close()


def main(argv: list[str]) -> None:
    req = json.loads(argv[0])
    result = open(argv[1], "w")  # opened before the limit, so that a failure can still be reported
    out: dict = {"ok": False}

    def save() -> None:  # rewritten at each stage: a child killed or aborted leaves where it was
        result.seek(0)
        result.truncate()
        json.dump(out, result)
        result.flush()

    def stage(name: str) -> None:
        out["stage"] = name
        save()

    try:
        run(req, out, stage)
    except MemoryError:
        out["error"] = "MemoryError"
    except Exception as e:  # reported to the parent, which explains it in one line
        out["error"] = f"{type(e).__name__}: {e}"
    if not out["ok"]:
        out["peak_vm"], out["peak_rss"] = status("VmPeak"), status("VmHWM")
    save()
    result.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if out["ok"] else 3)  # no interpreter teardown under the limit


if __name__ == "__main__":
    main(sys.argv[1:])
