"""A conversion reads, transforms and quantizes numpy arrays: it never imports torch, whose import alone
costs about what llama.cpp's whole quantization of the reference model does (eval/bench_startup.py)."""

import subprocess
import sys

import tiny_models
from ggufmoe.source.hf_config import config_view, tensor_shapes

CONVERT = """
import sys
from ggufmoe.cli import cli

for args in {runs!r}:
    cli.main(args, standalone_mode=False)
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
assert not heavy, heavy
"""


def test_convert_imports_no_torch(tmp_path):
    ref = str(tiny_models.REF_MODEL)
    config_view(tiny_models.REF_MODEL), tensor_shapes(tiny_models.REF_MODEL)  # cached, as after a first conversion
    hf, requant = str(tmp_path / "q2k.gguf"), str(tmp_path / "requant.gguf")
    runs = [["convert", ref, "-o", hf, "--type", "Q2_K", "-q"],  # a BF16 safetensors checkpoint
            ["convert", hf, "-o", requant, "--tensor-type", "token_embd=Q4_K", "-q"]]  # a GGUF, one tensor requantized
    proc = subprocess.run([sys.executable, "-c", CONVERT.format(runs=runs)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
