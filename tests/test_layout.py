"""The package's shape: stages in packages whose imports point one way, no import cycle, architecture
knowledge only in ``arch/``. Read from the source with ``ast`` (function-local imports included)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ggufmoe"
# Stages by rank: a module imports only from lower ranks or from its own package.
RANKS = {"errors": 0, "units": 0.5, "files": 0.4, "state_dir": 0.5, "model": 1, "source": 2, "outputs": 2.5, "arch": 3, "gguf": 4, "quant": 4,
         "stats": 4.5, "prune": 5, "sensitivity": 6, "plan": 7, "runtime": 8, "pipeline": 9, "cluster": 9.5, "cli": 10, "__init__": 0}
MAX_TOP_MODULES = 8
MAX_LOCAL_IMPORTS = 5  # function-local imports of package modules outside cli.py


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, name: str) -> list[tuple[str, bool]]:
    """(imported ggufmoe module, whether inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - child.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "ggufmoe":
                    known = modules()
                    for a in child.names:
                        sub = f"{base}.{a.name}"
                        out.append((sub if sub in known else base, inner))
            elif isinstance(child, ast.Import):
                out.extend((a.name, inner) for a in child.names if a.name.split(".")[0] == "ggufmoe")
            visit(child, inner)

    visit(tree, False)
    return out


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imports(path, name) if m != name} for name, path in modules().items()}


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def dfs(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
            if m in g and not state.get(m):
                dfs(m)
        path.pop()
        state[n] = 2

    for n in sorted(g):
        if not state.get(n):
            dfs(n)


def test_imports_point_one_way():
    bad = []
    for name, deps in graph().items():
        mine = stage(name)
        for m in deps:
            theirs = stage(m)
            if theirs != mine and RANKS[theirs] >= RANKS[mine] and theirs != "__init__":
                bad.append(f"{name} imports {m}")
    assert not bad, bad


def test_few_function_local_imports():
    local = [f"{name}: {m}" for name, path in modules().items() if name != "ggufmoe.cli"
             for m, inner in imports(path, name) if inner]
    assert len(local) <= MAX_LOCAL_IMPORTS, local


def test_few_modules_at_the_top():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_MODULES, top
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} <= set(RANKS)


# Family names and family-specific tensor names (beyond gguf-py's generic MoE names) live in arch/: the
# names of every registered architecture (llama.cpp's and Hugging Face's, so a new family is covered when it
# registers), the stems of the early families, and config keys and tensors that only some families have.
FAMILY_SPECIFIC = ["deepseek", "qwen", "mixtral", "olmoe", "exp_probs_b", "e_score_correction", "kv_b", "attn_k_b",
                   "attn_v_b", "ffn_gate_inp_shexp", "q_lora", "kv_lora", "n_routed_experts", "num_local_experts"]


def family_words() -> re.Pattern:
    from ggufmoe.arch import registry

    names = {n for cls in registry.ARCHITECTURES.values() for n in (cls.gguf_arch, *cls.hf_architectures)}
    names.discard("llama")  # Mixtral's llama.cpp architecture bears the runtime's own name
    return re.compile("|".join(map(re.escape, sorted(names | set(FAMILY_SPECIFIC), key=len, reverse=True))), re.I)
# Modules that name llama.cpp's pre-tokenizer kinds and Ollama's chat-template families: those are
# tokenizer and template formats shared by many model families, not architectures.
FORMAT_TABLES = {"ggufmoe.source.tokenizer", "ggufmoe.gguf.modelfile"}


def code_without_docs(path: Path) -> str:
    """The file's code: comments and docstrings removed (they may name families as examples)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            body[0].value.value = ""
    return ast.unparse(tree)


def test_architecture_knowledge_stays_in_arch():
    bad, words = {}, family_words()
    for name, path in modules().items():
        if stage(name) == "arch" or name in FORMAT_TABLES:
            continue
        found = sorted({m.group(0) for m in words.finditer(code_without_docs(path))})
        if found:
            bad[name] = found
    assert not bad, bad


MAX_MODULE_LINES = 400  # a module bigger than this has more than one job (cli.py only parses and calls)


def test_small_modules():
    big = {name: n for name, path in modules().items()
           if name != "ggufmoe.cli" and (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
