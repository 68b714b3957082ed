"""The command line: real subprocesses, one-line errors, no partial output, split files."""

import json
import shutil

import numpy as np
import pytest

import tiny_models
from cli_run import assert_one_line_error, run
from ggufmoe.runtime.logprobs import llama_logprobs


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0 and "convert" in proc.stdout and "inspect" in proc.stdout


def test_inspect_reference_model():
    proc = run("inspect", tiny_models.REF_MODEL)
    assert proc.returncode == 0, proc.stderr
    assert "qwen3moe" in proc.stdout and "24 routed, 4 used" in proc.stdout and "IQ2_XXS" in proc.stdout


def test_missing_source(tmp_path):
    assert_one_line_error(run("convert", tmp_path / "nope", "-o", tmp_path / "o.gguf"), "not a directory")
    assert not (tmp_path / "o.gguf").exists()


def test_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    shutil.copy(tiny_models.REF_MODEL / "model-00001-of-00005.safetensors", tmp_path / "m" / "model.safetensors")
    assert_one_line_error(run("convert", tmp_path / "m", "-o", tmp_path / "o.gguf"), "unsupported architecture")


@pytest.mark.parametrize("change, words", [
    (dict(norm_topk_prob=False), "norm_topk_prob=false"),
    (dict(mlp_only_layers=[1]), "dense layers between MoE layers"),
    (dict(decoder_sparse_step=2), "dense layers between MoE layers"),
    (dict(linear_value_head_dim=32), "linear_key_head_dim 16 != linear_value_head_dim 32"),
])
def test_qwen3next_settings_llama_cpp_hard_codes_are_refused(tmp_path, change, words):
    """Qwen3-Next settings llama.cpp's qwen3next graph cannot run: one clear error, no output."""
    config = tiny_models.configs()["qwen3next"]
    if "linear_value_head_dim" in change:  # it shapes the weights: a checkpoint built with it
        config.linear_value_head_dim = change["linear_value_head_dim"]
    tiny_models.build("qwen3next", tmp_path / "m", config=config)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **change}))
    assert_one_line_error(run("convert", tmp_path / "m", "-o", tmp_path / "o.gguf", "--type", "F16", "-q"),
                          "unsupported Qwen3NextForCausalLM checkpoint", words)
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("change, words", [
    (dict(hidden_act="gelu"), "activation 'gelu'"),
    (dict(linear_value_head_dim=32), "linear_key_head_dim 16 != linear_value_head_dim 32"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0, partial_rotary_factor=0.25,
                               original_max_position_embeddings=512)), "rope scaling 'yarn'"),
])
def test_qwen35moe_settings_llama_cpp_hard_codes_are_refused(tmp_path, change, words):
    """Qwen3.5-MoE settings (under text_config) llama.cpp's qwen35moe graph cannot run: one clear error, no output."""
    shaping = {k: v for k, v in change.items() if k == "linear_value_head_dim"}  # shapes the weights: built with it
    assert_nested_setting_refused(tmp_path, "qwen35moe", tiny_models.qwen35moe_config(**shaping), change, words)


def assert_nested_setting_refused(tmp_path, family: str, config, change: dict, words: str) -> None:
    """``family`` built from ``config``, then ``change`` written into its ``text_config``: convert refuses it in one
    line naming ``words``, and writes nothing."""
    tiny_models.build(family, tmp_path / "m", config=config)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["text_config"].update(change)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("convert", tmp_path / "m", "-o", tmp_path / "o.gguf", "--type", "F16", "-q"),
                          f"unsupported {config.architectures[0]} checkpoint", words)
    assert not (tmp_path / "o.gguf").exists()


SLIDING, FULL = "sliding_attention", "full_attention"


@pytest.mark.parametrize("change, words", [
    (dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=tiny_models.VOCAB),
     "per-layer embeddings (hidden_size_per_layer_input=8)"),
    (dict(layer_types=[SLIDING, FULL, FULL, SLIDING, SLIDING, FULL]),
     "shared-KV layer 4 reuses layer 3 (llama.cpp: layer 2)"),
    (dict(hidden_activation="gelu"), "activation 'gelu'"),
    (dict(use_bidirectional_attention="all"), "bidirectional attention ('all'"),
])
def test_gemma4_settings_llama_cpp_cannot_run_are_refused(tmp_path, change, words):
    """Gemma 4 settings (under text_config) llama.cpp's gemma4 graph cannot run as transformers does: one clear
    error, no output."""
    shaping = {k: v for k, v in change.items() if k != "hidden_activation" and k != "use_bidirectional_attention"}
    assert_nested_setting_refused(tmp_path, "gemma4", tiny_models.gemma4_config(**shaping), change, words)


def test_missing_shard(tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_models.REF_MODEL, src)
    (src / "model-00003-of-00005.safetensors").unlink()
    assert_one_line_error(run("convert", src, "-o", tmp_path / "o.gguf"), "model-00003-of-00005.safetensors")


def test_corrupt_safetensors_leaves_no_output(tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_models.REF_MODEL, src)
    shard = src / "model-00005-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    assert_one_line_error(run("convert", src, "-o", tmp_path / "o.gguf", "--type", "Q8_0"), "safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_bad_type_and_rule(tmp_path):
    assert_one_line_error(run("convert", tiny_models.REF_MODEL, "-o", tmp_path / "o.gguf", "--type", "Q9_X"),
                          "unknown quant type")
    assert_one_line_error(run("convert", tiny_models.REF_MODEL, "-o", tmp_path / "o.gguf", "--tensor-type", "attn"),
                          "REGEX=TYPE")


def test_unwritable_output(tmp_path):
    assert_one_line_error(run("convert", tiny_models.REF_MODEL, "-o", tmp_path / "no" / "o.gguf"),
                          "does not exist")


@pytest.mark.parametrize("arch", ["qwen3moe"])
def test_split_output_loads_and_matches(arch, tmp_path, eval_tokens):
    one = tmp_path / "one.gguf"
    assert run("convert", tiny_models.REF_MODEL, "-o", one, "--type", "Q8_0", "-q").returncode == 0
    proc = run("convert", tiny_models.REF_MODEL, "-o", tmp_path / "split.gguf", "--type", "Q8_0", "-q",
               "--split-max-size", "12M")
    assert proc.returncode == 0, proc.stderr
    shards = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(shards) >= 3 and shards[0].name == f"split-00001-of-{len(shards):05d}.gguf"
    assert all(s.stat().st_size <= 12_000_000 + 2_000_000 for s in shards)
    tokens = eval_tokens[:128]
    assert np.array_equal(llama_logprobs(shards[0], tokens), llama_logprobs(one, tokens))
