"""A synthetic DeepSeek-V3 (or Qwen3.5-122B, DeepSeek-V4-Flash) checkpoint: the real per-layer shapes and layout,
few layers and experts.

    python tools/make_synthetic.py OUT_DIR [--family deepseek-v3|qwen3.5-122b|deepseek-v4-flash] [--layers 3]
                                   [--experts 32] [--seed 0] [--shard-size 2GB] [--tokenizer DIR_OR_VOCAB_GGUF]
                                   [--pow2-scales]

``--family deepseek-v4-flash``: DeepSeek-V4-Flash as DeepSeek ships it (its own tensor names, no ``model.`` prefix,
a legacy config.json with ``compress_ratios`` / ``num_hash_layers``): hidden 4096, 64 heads of 512 (one key-value
head, 64 rotated), q_lora 1024, grouped output (8 groups of rank 1024), four hyper-connection streams (F32 mixes),
attention sinks, a sliding window of 128 on every layer plus compressed caches by layer (ratio 4 with the
lightning indexer of 64 heads of 128, or 128), routed experts of FFN 2048 (top-6, sqrt-softplus with a selection
bias; the first layer routes by a token -> experts table) and one shared expert, vocabulary 129280. Matrices of the
attention and the shared expert are FP8 e4m3 with one UE8M0 ``.scale`` per 128x128 block, the routed experts FP4
(int8 codes two to a byte, one UE8M0 ``.scale`` per 32 values), the compressors, router, embedding and head BF16,
the mixes, sinks and position biases F32. ``--layers`` (at least 3) alternates ratio 128 and 4 from the first; the
routed experts are fewer.

``--family qwen3.5-122b``: Qwen3.5-122B-A10B's text model as Qwen ships it (``Qwen3_5MoeForConditionalGeneration``,
the text configuration under ``text_config``, tensors under ``model.language_model.``, all BF16): hidden 3072,
Gated DeltaNet layers (16 key heads and 64 value heads of 128, conv kernel 4) with a full gated-attention layer
every 4th (32 heads, 2 KV heads of 256, partial rope 0.25), experts of FFN 1024 stored fused (``gate_up_proj``,
``down_proj``) plus a shared expert of 1024 and its gate, top-8 softmax routing, vocabulary 248320; the layers
and routed experts are fewer (``--layers`` a multiple of 4 keeps the real pattern). The rest of this text is the
DeepSeek-V3 layout.

Every layer has DeepSeek-V3's own shapes (hidden 7168, MLA q_lora 1536 / kv_lora 512, qk_nope 128,
qk_rope 64, v_head 128, 128 heads, dense FFN 18432, expert FFN 2048, one shared expert, vocabulary
129280, top-8 sigmoid routing with ``e_score_correction_bias``, groups of experts); only the number
of layers (the first dense, ``first_k_dense_replace=1``) and of routed experts per layer are
smaller. Tensor names, dtypes and the ``quantization_config`` are those of the official release:
every linear weight of a layer is FP8 e4m3 with one float32 ``weight_scale_inv`` per 128x128 block
(``scale = amax / 448``); embeddings, ``lm_head``, norms and routers are BF16, the routing bias F32.

Weights are seeded random normals (std 0.02; norms around 1), each tensor from its own generator
(``[seed, tensor index]``), so any tensor can be regenerated alone. The safetensors shards are
written by hand, tensor by tensor (the header first, then each tensor's bytes), and each tensor in
row chunks (1024 rows of an FP8 weight, 2048 of a BF16 matrix), so generating needs a few hundred
MB however large the model. Shards follow ``--shard-size`` with
``model.safetensors.index.json``.

``--pow2-scales`` rounds every block scale to a power of two: the dequantized weights are then
exact in BF16, so a pipeline that goes through a BF16 file loses nothing (used to check that two
converters produce the same bytes).

Tokenizer (``--tokenizer``): a directory with ``tokenizer.json`` (and ``tokenizer_config.json``)
is copied; a llama.cpp vocabulary GGUF (``ggml-vocab-*.gguf`` from llama.cpp's ``models/``, BPE
``gpt2`` model with a pre-tokenizer ggufmoe knows) is turned into an equivalent ``tokenizer.json``.
Default: the reference model's tokenizer (6144 tokens), as the tiny test models use. Both
converters pad a tokenizer smaller than ``vocab_size`` with ``[PADi]`` tokens. llama.cpp's
``convert_hf_to_gguf.py`` recognises a tokenizer only by the hash of its output on a fixed text,
so for it pass llama.cpp's ``models/ggml-vocab-llama-bpe.gguf`` (Llama-3's 128256 tokens, which
fit in 129280): the rebuilt tokenizer hashes like Meta-Llama-3's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REF_TOKENIZER = ROOT / "models" / "refmoe-qwen3"

# DeepSeek-V3's configuration (deepseek-ai/DeepSeek-V3 config.json); layers/experts/groups are set per run.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

BLOCK = 128  # FP8 block size (weight_block_size)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
STD = 0.02
EMBED_ROWS_PER_CHUNK = 2048
FP8_ROWS = 8 * BLOCK  # rows generated at a time (a multiple of the block)

# safetensors dtype names
ST_DTYPE = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float32: "F32",
            torch.float8_e8m0fnu: "F8_E8M0", torch.int8: "I8", torch.int64: "I64"}
ITEMSIZE = {torch.float8_e4m3fn: 1, torch.bfloat16: 2, torch.float32: 4, torch.float8_e8m0fnu: 1, torch.int8: 1,
            torch.int64: 8}


@dataclass
class Tensor:
    """One checkpoint tensor: how to make it. ``kind``: fp8 (weight), scale (its weight_scale_inv), fp8e8 (weight with
    UE8M0 block scales), fp4 (FP4 codes, two a byte), scale8 (the UE8M0 ``.scale`` of either), bf16 (normal random),
    f32 (normal random), norm (BF16 around 1), bias (F32 routing bias), ids (a token -> experts table)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    index: int = 0  # generator stream
    weight: "Tensor | None" = None  # for a scale: its weight

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


def make_config(layers: int, experts: int, n_group: int, topk_group: int, bos: int, eos: int) -> dict:
    cfg = dict(DEEPSEEK_V3)
    cfg.update(num_hidden_layers=layers, first_k_dense_replace=1, n_routed_experts=experts, n_group=n_group,
               topk_group=topk_group, num_nextn_predict_layers=0, bos_token_id=bos, eos_token_id=eos)
    return cfg


def tensor_list(cfg: dict) -> list[Tensor]:
    """Every tensor of the checkpoint in file order, names as in the official release."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    heads, nope, rope, vh = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                             cfg["v_head_dim"])
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    out: list[Tensor] = []

    def weight(name: str, rows: int, cols: int) -> None:
        w = Tensor(name, (rows, cols), torch.float8_e4m3fn, "fp8")
        out.append(w)
        out.append(Tensor(name + "_scale_inv", (-(-rows // BLOCK), -(-cols // BLOCK)), torch.float32, "scale",
                          weight=w))

    def mlp(prefix: str, inter: int) -> None:
        weight(f"{prefix}.gate_proj.weight", inter, h)
        weight(f"{prefix}.up_proj.weight", inter, h)
        weight(f"{prefix}.down_proj.weight", h, inter)

    out.append(Tensor("model.embed_tokens.weight", (v, h), torch.bfloat16, "bf16"))
    for il in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{il}"
        a = f"{p}.self_attn"
        out.append(Tensor(f"{p}.input_layernorm.weight", (h,), torch.bfloat16, "norm"))
        weight(f"{a}.q_a_proj.weight", qr, h)
        out.append(Tensor(f"{a}.q_a_layernorm.weight", (qr,), torch.bfloat16, "norm"))
        weight(f"{a}.q_b_proj.weight", heads * (nope + rope), qr)
        weight(f"{a}.kv_a_proj_with_mqa.weight", kvr + rope, h)
        out.append(Tensor(f"{a}.kv_a_layernorm.weight", (kvr,), torch.bfloat16, "norm"))
        weight(f"{a}.kv_b_proj.weight", heads * (nope + vh), kvr)
        weight(f"{a}.o_proj.weight", h, heads * vh)
        out.append(Tensor(f"{p}.post_attention_layernorm.weight", (h,), torch.bfloat16, "norm"))
        if il < cfg["first_k_dense_replace"]:
            mlp(f"{p}.mlp", cfg["intermediate_size"])
            continue
        out.append(Tensor(f"{p}.mlp.gate.weight", (cfg["n_routed_experts"], h), torch.bfloat16, "bf16"))
        out.append(Tensor(f"{p}.mlp.gate.e_score_correction_bias", (cfg["n_routed_experts"],), torch.float32, "bias"))
        for e in range(cfg["n_routed_experts"]):
            mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
        mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
    out.append(Tensor("model.norm.weight", (h,), torch.bfloat16, "norm"))
    out.append(Tensor("lm_head.weight", (v, h), torch.bfloat16, "bf16"))
    for i, t in enumerate(out):
        t.index = i
    return out


# Qwen3.5-122B-A10B's text model (Qwen/Qwen3.5-122B-A10B config.json); layers/experts are set per run.
QWEN35_122B = {
    "hidden_size": 3072, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 256,
    "linear_num_key_heads": 16, "linear_num_value_heads": 64, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "moe_intermediate_size": 1024,
    "shared_expert_intermediate_size": 1024, "num_experts": 256, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "full_attention_interval": 4, "vocab_size": 248320, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
}
QWEN35_PREFIX = "model.language_model."


def qwen35_config(layers: int, experts: int, bos: int, eos: int) -> dict:
    """The checkpoint's config.json: the vision-language wrapper with the text model nested, as shipped."""
    import transformers as T

    text = dict(QWEN35_122B, num_hidden_layers=layers, num_experts=experts, bos_token_id=bos, eos_token_id=eos,
                layer_types=["full_attention" if (il + 1) % QWEN35_122B["full_attention_interval"] == 0
                             else "linear_attention" for il in range(layers)])
    cfg = T.Qwen3_5MoeConfig(text_config=text, tie_word_embeddings=False,
                             architectures=["Qwen3_5MoeForConditionalGeneration"]).to_dict()
    cfg["torch_dtype"] = "bfloat16"
    return cfg


def qwen35_tensor_list(cfg: dict) -> list[Tensor]:
    """Every tensor of the text model in file order, names as in the official release (experts fused)."""
    c = cfg["text_config"]
    h, v, e, ff = c["hidden_size"], c["vocab_size"], c["num_experts"], c["moe_intermediate_size"]
    nk, nv, dk, dv = (c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"],
                      c["linear_value_head_dim"])
    heads, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    bf16 = torch.bfloat16
    out: list[Tensor] = [Tensor(f"{QWEN35_PREFIX}embed_tokens.weight", (v, h), bf16, "bf16")]
    for il, kind in enumerate(c["layer_types"]):
        p = f"{QWEN35_PREFIX}layers.{il}"
        out.append(Tensor(f"{p}.input_layernorm.weight", (h,), bf16, "norm"))
        if kind == "linear_attention":
            a, conv = f"{p}.linear_attn", 2 * nk * dk + nv * dv
            out += [Tensor(f"{a}.in_proj_qkv.weight", (conv, h), bf16, "bf16"),
                    Tensor(f"{a}.in_proj_z.weight", (nv * dv, h), bf16, "bf16"),
                    Tensor(f"{a}.in_proj_b.weight", (nv, h), bf16, "bf16"),
                    Tensor(f"{a}.in_proj_a.weight", (nv, h), bf16, "bf16"),
                    Tensor(f"{a}.conv1d.weight", (conv, 1, c["linear_conv_kernel_dim"]), bf16, "bf16"),
                    Tensor(f"{a}.dt_bias", (nv,), bf16, "norm"),
                    Tensor(f"{a}.A_log", (nv,), bf16, "norm"),
                    Tensor(f"{a}.norm.weight", (dv,), bf16, "norm"),
                    Tensor(f"{a}.out_proj.weight", (h, nv * dv), bf16, "bf16")]
        else:
            a = f"{p}.self_attn"
            out += [Tensor(f"{a}.q_proj.weight", (2 * heads * hd, h), bf16, "bf16"),  # per head [query, gate]
                    Tensor(f"{a}.k_proj.weight", (kv * hd, h), bf16, "bf16"),
                    Tensor(f"{a}.v_proj.weight", (kv * hd, h), bf16, "bf16"),
                    Tensor(f"{a}.o_proj.weight", (h, heads * hd), bf16, "bf16"),
                    Tensor(f"{a}.q_norm.weight", (hd,), bf16, "norm"),
                    Tensor(f"{a}.k_norm.weight", (hd,), bf16, "norm")]
        out.append(Tensor(f"{p}.post_attention_layernorm.weight", (h,), bf16, "norm"))
        m, sh = f"{p}.mlp", c["shared_expert_intermediate_size"]
        out += [Tensor(f"{m}.gate.weight", (e, h), bf16, "bf16"),
                Tensor(f"{m}.experts.gate_up_proj", (e, 2 * ff, h), bf16, "bf16"),
                Tensor(f"{m}.experts.down_proj", (e, h, ff), bf16, "bf16"),
                Tensor(f"{m}.shared_expert.gate_proj.weight", (sh, h), bf16, "bf16"),
                Tensor(f"{m}.shared_expert.up_proj.weight", (sh, h), bf16, "bf16"),
                Tensor(f"{m}.shared_expert.down_proj.weight", (h, sh), bf16, "bf16"),
                Tensor(f"{m}.shared_expert_gate.weight", (1, h), bf16, "bf16")]
    out.append(Tensor(f"{QWEN35_PREFIX}norm.weight", (h,), bf16, "norm"))
    out.append(Tensor("lm_head.weight", (v, h), bf16, "bf16"))
    for i, t in enumerate(out):
        t.index = i
    return out

# DeepSeek-V4-Flash's configuration as DeepSeek ships it (legacy keys transformers folds in); layers/experts per run.
DEEPSEEK_V4_FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "hidden_size": 4096,
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024,
    "o_groups": 8, "o_lora_rank": 1024, "moe_intermediate_size": 2048, "num_experts_per_tok": 6,
    "n_routed_experts": 256, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "sliding_window": 128, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "num_nextn_predict_layers": 0,
    "vocab_size": 129280, "max_position_embeddings": 1048576, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "expert_dtype": "fp4"},
}
V4_RATIOS = (128, 4)  # --layers alternate from the first: heavily compressed, then compressed with the indexer
FP4_BLOCK = 32


def v4_config(layers: int, experts: int, bos: int, eos: int) -> dict:
    cfg = dict(DEEPSEEK_V4_FLASH)
    cfg.update(num_hidden_layers=layers, n_routed_experts=experts, bos_token_id=bos, eos_token_id=eos,
               compress_ratios=[V4_RATIOS[il % 2] for il in range(layers)], num_hash_layers=1)
    return cfg


def v4_tensor_list(cfg: dict) -> list[Tensor]:
    """Every tensor in file order, names and dtypes as DeepSeek ships them."""
    h, v, heads, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"], cfg["head_dim"]
    qr, og, olr, ff = cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"], cfg["moe_intermediate_size"]
    ih, idim, hc = cfg["index_n_heads"], cfg["index_head_dim"], cfg["hc_mult"]
    bf16, f32 = torch.bfloat16, torch.float32
    out: list[Tensor] = [Tensor("embed.weight", (v, h), bf16, "bf16")]

    def scaled(name: str, rows: int, cols: int, kind: str) -> None:
        w = Tensor(name, (rows, cols // 2) if kind == "fp4" else (rows, cols),
                   torch.int8 if kind == "fp4" else torch.float8_e4m3fn, kind)
        block = (1, FP4_BLOCK) if kind == "fp4" else (BLOCK, BLOCK)
        out.extend([w, Tensor(name.removesuffix(".weight") + ".scale", (-(-rows // block[0]), -(-cols // block[1])),
                              torch.float8_e8m0fnu, "scale8", weight=w)])

    def compressor(p: str, width: int, head: int, ratio: int) -> None:
        out.extend([Tensor(f"{p}.wkv.weight", (width, h), bf16, "bf16"), Tensor(f"{p}.wgate.weight", (width, h), bf16, "bf16"),
                    Tensor(f"{p}.ape", (ratio, width), f32, "f32"), Tensor(f"{p}.norm.weight", (head,), bf16, "norm")])

    for il, ratio in enumerate(cfg["compress_ratios"]):
        p = f"layers.{il}"
        out.append(Tensor(f"{p}.attn_norm.weight", (h,), bf16, "norm"))
        for at in ("attn", "ffn"):
            mix = (2 + hc) * hc
            out.extend([Tensor(f"{p}.hc_{at}_fn", (mix, hc * h), f32, "f32"), Tensor(f"{p}.hc_{at}_base", (mix,), f32, "f32"),
                        Tensor(f"{p}.hc_{at}_scale", (3,), f32, "f32")])
        out.append(Tensor(f"{p}.attn.attn_sink", (heads,), f32, "f32"))
        scaled(f"{p}.attn.wq_a.weight", qr, h, "fp8e8")
        out.append(Tensor(f"{p}.attn.q_norm.weight", (qr,), bf16, "norm"))
        scaled(f"{p}.attn.wq_b.weight", heads * hd, qr, "fp8e8")
        scaled(f"{p}.attn.wkv.weight", hd, h, "fp8e8")
        out.append(Tensor(f"{p}.attn.kv_norm.weight", (hd,), bf16, "norm"))
        scaled(f"{p}.attn.wo_a.weight", og * olr, heads * hd // og, "fp8e8")
        scaled(f"{p}.attn.wo_b.weight", h, og * olr, "fp8e8")
        if ratio:
            coff = 2 if ratio == 4 else 1
            compressor(f"{p}.attn.compressor", coff * hd, hd, ratio)
        if ratio == 4:
            scaled(f"{p}.attn.indexer.wq_b.weight", ih * idim, qr, "fp8e8")
            out.append(Tensor(f"{p}.attn.indexer.weights_proj.weight", (ih, h), bf16, "bf16"))
            compressor(f"{p}.attn.indexer.compressor", 2 * idim, idim, ratio)
        out.append(Tensor(f"{p}.ffn_norm.weight", (h,), bf16, "norm"))
        out.append(Tensor(f"{p}.ffn.gate.weight", (cfg["n_routed_experts"], h), bf16, "bf16"))
        out.append(Tensor(f"{p}.ffn.gate.bias", (cfg["n_routed_experts"],), f32, "bias"))
        if il < cfg["num_hash_layers"]:
            out.append(Tensor(f"{p}.ffn.gate.tid2eid", (v, cfg["num_experts_per_tok"]), torch.int64, "ids"))
        for e in range(cfg["n_routed_experts"]):
            scaled(f"{p}.ffn.experts.{e}.w1.weight", ff, h, "fp4")
            scaled(f"{p}.ffn.experts.{e}.w2.weight", h, ff, "fp4")
            scaled(f"{p}.ffn.experts.{e}.w3.weight", ff, h, "fp4")
        scaled(f"{p}.ffn.shared_experts.w1.weight", ff, h, "fp8e8")
        scaled(f"{p}.ffn.shared_experts.w2.weight", h, ff, "fp8e8")
        scaled(f"{p}.ffn.shared_experts.w3.weight", ff, h, "fp8e8")
    out.extend([Tensor("norm.weight", (h,), bf16, "norm"), Tensor("head.weight", (v, h), bf16, "bf16"),
                Tensor("hc_head_fn", (hc, hc * h), f32, "f32"), Tensor("hc_head_base", (hc,), f32, "f32"),
                Tensor("hc_head_scale", (1,), f32, "f32")])
    for i, t in enumerate(out):
        t.index = i
    return out


E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)


def to_fp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 matrix -> (FP4 codes two a byte, value 2i in the low nibble of byte i, int8; UE8M0 exponent per 32
    values, uint8), the nearest E2M1 value of each after dividing by ``2^(floor(log2 amax) - 2)``."""
    x = w.reshape(w.shape[0], -1, FP4_BLOCK)
    exp = np.floor(np.log2(np.maximum(np.abs(x).max(axis=-1), 2.0 ** -100))) - 2
    scaled_ = x / np.exp2(exp)[..., None]
    mag = np.abs(np.abs(scaled_)[..., None] - E2M1).argmin(axis=-1)
    codes = (mag | ((scaled_ < 0) & (mag > 0)) << 3).astype(np.uint8).reshape(w.shape[0], -1)
    return (codes[:, 0::2] | codes[:, 1::2] << 4).view(np.int8), (exp + 127).astype(np.uint8)


def to_fp8_blocks(w: np.ndarray, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 matrix -> (float8_e4m3fn matrix, float32 inverse scale per 128x128 block), as DeepSeek
    quantizes: ``scale = amax(block) / 448``, ``q = w / scale`` (rows/cols padded for the amax only)."""
    rows, cols = w.shape
    sr, sc = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = w
    if rows % BLOCK or cols % BLOCK:
        padded = np.zeros((sr * BLOCK, sc * BLOCK), np.float32)
        padded[:rows, :cols] = w
    amax = np.abs(padded.reshape(sr, BLOCK, sc, BLOCK)).max(axis=(1, 3))
    scale = np.maximum(amax, 1e-12) / FP8_MAX
    if pow2:  # the next power of two up, so w / scale stays within the FP8 range
        scale = np.exp2(np.ceil(np.log2(scale)))
    scale = scale.astype(np.float32)
    full = np.repeat(np.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[:rows, :cols]
    q = torch.from_numpy(w / full).to(torch.float8_e4m3fn)
    return q, torch.from_numpy(scale)


class Maker:
    """Generates tensors on demand; an FP8 weight's scale is made with it and handed out next."""

    def __init__(self, seed: int, pow2: bool, experts: int = 0):
        self.seed, self.pow2, self.experts = seed, pow2, experts
        self._scale: tuple[str, torch.Tensor] | None = None

    def rng(self, t: Tensor) -> np.random.Generator:
        return np.random.default_rng([self.seed, t.index])

    def chunks(self, t: Tensor):
        """The tensor's bytes, in one or more pieces (row chunks for the big BF16 matrices)."""
        if t.kind == "fp8":  # row blocks of FP8_ROWS: the scales of each block row are known per chunk
            rng, scales = self.rng(t), []
            for r0 in range(0, t.shape[0], FP8_ROWS):
                w = rng.standard_normal((min(FP8_ROWS, t.shape[0] - r0), t.shape[1]), dtype=np.float32)
                w *= STD
                q, s = to_fp8_blocks(w, self.pow2)
                scales.append(s)
                yield q.view(torch.uint8).numpy()
            self._scale = (t.name + "_scale_inv", torch.cat(scales))
        elif t.kind in ("fp8e8", "fp4"):  # UE8M0 scales: powers of two, their exponents stored
            rng, scales = self.rng(t), []
            rows = FP8_ROWS if t.kind == "fp8e8" else t.shape[0]
            cols = t.shape[1] * (2 if t.kind == "fp4" else 1)
            for r0 in range(0, t.shape[0], rows):
                w = rng.standard_normal((min(rows, t.shape[0] - r0), cols), dtype=np.float32)
                w *= STD
                if t.kind == "fp4":
                    q, e = to_fp4(w)
                    scales.append(e)
                    yield q
                else:
                    q, s = to_fp8_blocks(w, pow2=True)
                    scales.append((np.log2(s.numpy()) + 127).astype(np.uint8))
                    yield q.view(torch.uint8).numpy()
            self._scale = (t.name.removesuffix(".weight") + ".scale", torch.from_numpy(np.concatenate(scales)))
        elif t.kind in ("scale", "scale8"):
            name, s = self._scale or (None, None)
            if name != t.name:
                raise RuntimeError(f"{t.name} must follow its weight")
            self._scale = None
            yield s.numpy()
        elif t.kind == "f32":
            yield (STD * self.rng(t).standard_normal(t.shape, dtype=np.float32)).astype(np.float32)
        elif t.kind == "ids":  # distinct experts per token, as a trained table has them
            rng, n_expert = self.rng(t), self.experts
            for r0 in range(0, t.shape[0], EMBED_ROWS_PER_CHUNK):
                n = min(EMBED_ROWS_PER_CHUNK, t.shape[0] - r0)
                yield np.argsort(rng.random((n, n_expert)), axis=1)[:, :t.shape[1]].astype(np.int64)
        elif t.kind == "bf16":
            rng = self.rng(t)
            row = int(np.prod(t.shape[1:]))
            step = max(1, min(EMBED_ROWS_PER_CHUNK, EMBED_ROWS_PER_CHUNK * 8192 // max(row, 1)))
            for r0 in range(0, t.shape[0], step):
                n = min(step, t.shape[0] - r0)
                x = rng.standard_normal((n, *t.shape[1:]), dtype=np.float32)
                x *= STD
                yield torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
        elif t.kind == "norm":
            x = 1.0 + 0.1 * self.rng(t).standard_normal(t.shape, dtype=np.float32)
            yield torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
        elif t.kind == "bias":
            yield (0.3 * self.rng(t).standard_normal(t.shape, dtype=np.float32)).astype(np.float32)
        else:
            raise ValueError(t.kind)


def shard_groups(tensors: list[Tensor], shard_size: int) -> list[list[Tensor]]:
    """Consecutive tensors per shard, each shard at most ``shard_size`` bytes unless one tensor is larger;
    an FP8 weight stays in the shard of its scale."""
    groups: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size and t.kind not in ("scale", "scale8"):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def write_shard(path: Path, tensors: list[Tensor], maker: Maker) -> int:
    """A safetensors file written tensor by tensor; returns its size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            n = 0
            for piece in maker.chunks(t):
                piece.tofile(f)
                n += piece.nbytes
            if n != t.nbytes:
                raise RuntimeError(f"{t.name}: wrote {n} bytes, expected {t.nbytes}")
    tmp.replace(path)
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------------
# tokenizer

def tokenizer_from_vocab_gguf(vocab: Path, out: Path) -> tuple[int, int]:
    """Write tokenizer.json / tokenizer_config.json equivalent to a llama.cpp vocabulary GGUF
    (byte-level BPE); returns (bos id, eos id)."""
    import gguf

    sys.path.insert(0, str(ROOT))
    from ggufmoe.source.tokenizer import PRE_TOKENIZERS

    r = gguf.GGUFReader(vocab)

    def field(key: str):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    if field("tokenizer.ggml.model") != "gpt2":
        raise SystemExit(f"{vocab}: not a byte-level BPE vocabulary (model {field('tokenizer.ggml.model')!r})")
    pre_name = field("tokenizer.ggml.pre")
    pre = next((p for p in PRE_TOKENIZERS if p.name == pre_name), None)
    if pre is None:
        raise SystemExit(f"{vocab}: pre-tokenizer {pre_name!r} is not one ggufmoe knows")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = field("tokenizer.ggml.merges")
    bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    control = int(gguf.TokenType.CONTROL)
    vocab_map = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != control}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, (t, k) in enumerate(zip(tokens, types)) if k == control]
    splits = [{"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}
              for rx in pre.regexes]
    pre_tok = {"type": "Sequence", "pretokenizers": splits + [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    post: dict = byte_level
    if bos is not None and field("tokenizer.ggml.add_bos_token") is not False:
        bos_text = tokens[bos]
        post = {"type": "Sequence", "processors": [byte_level, {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos_text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos_text: {"id": bos_text, "ids": [bos], "tokens": [bos_text]}}}]}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": pre_tok, "post_processor": post,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                     "ignore_merges": pre.ignore_merges, "vocab": vocab_map, "merges": list(merges)}}
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072, "clean_up_tokenization_spaces": False}
    if bos is not None:
        cfg["bos_token"] = tokens[bos]
    if eos is not None:
        cfg["eos_token"] = tokens[eos]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return (bos if bos is not None else 0), (eos if eos is not None else 1)


def copy_tokenizer(src: Path, out: Path) -> tuple[int, int]:
    """Copy tokenizer.json (+ tokenizer_config.json); returns (bos id, eos id) as far as they are known."""
    if not (src / "tokenizer.json").is_file():
        raise SystemExit(f"{src}: no tokenizer.json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).is_file():
            shutil.copy(src / f, out / f)
    ids = {}
    tok = json.loads((src / "tokenizer.json").read_text())
    by_text = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    by_text.update(tok["model"].get("vocab", {}))
    cfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
    for name, default in (("bos", 0), ("eos", 1)):
        text = cfg.get(f"{name}_token")
        text = text.get("content") if isinstance(text, dict) else text
        ids[name] = by_text.get(text, default) if text else default
    return ids["bos"], ids["eos"]


# ---------------------------------------------------------------------------------------------------

def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def make(out: Path, layers: int = 3, experts: int = 32, seed: int = 0, shard_size: int = 2 * 10**9,
         tokenizer: Path | None = None, n_group: int = 8, topk_group: int = 4, pow2: bool = False,
         quiet: bool = False, family: str = "deepseek-v3") -> dict:
    """Write the checkpoint into ``out`` (created; must be empty or absent). Returns a summary."""
    qwen, v4 = family == "qwen3.5-122b", family == "deepseek-v4-flash"
    if v4 and (layers < 3 or experts < DEEPSEEK_V4_FLASH["num_experts_per_tok"]):
        raise SystemExit(f"--layers must be at least 3 (both compressions and a hash layer) and --experts at least "
                         f"{DEEPSEEK_V4_FLASH['num_experts_per_tok']}")
    elif qwen and (layers < 1 or experts < QWEN35_122B["num_experts_per_tok"]):
        raise SystemExit(f"--layers must be at least 1 and --experts at least {QWEN35_122B['num_experts_per_tok']}")
    elif not qwen and not v4 and layers < 2:
        raise SystemExit("--layers must be at least 2 (the first layer is dense, the others MoE)")
    if not qwen and not v4 and (experts < 32 or experts % n_group):
        raise SystemExit(f"--experts must be at least 32 and divisible by n_group={n_group}")
    if not qwen and not v4 and (not 0 < topk_group < n_group or
                     experts // n_group * topk_group < DEEPSEEK_V3["num_experts_per_tok"]):
        raise SystemExit(f"topk_group={topk_group} of {n_group} groups cannot reach top-8")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"{out}: not empty")
    tokenizer = tokenizer or REF_TOKENIZER
    if tokenizer.suffix == ".gguf":
        bos, eos = tokenizer_from_vocab_gguf(tokenizer, out)
    else:
        bos, eos = copy_tokenizer(tokenizer, out)
    cfg = (qwen35_config(layers, experts, bos, eos) if qwen else v4_config(layers, experts, bos, eos) if v4
           else make_config(layers, experts, n_group, topk_group, bos, eos))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos, "do_sample": True,
         "temperature": 0.6, "top_p": 0.95}, indent=2))

    tensors = qwen35_tensor_list(cfg) if qwen else v4_tensor_list(cfg) if v4 else tensor_list(cfg)
    groups = shard_groups(tensors, shard_size)
    maker = Maker(seed, pow2, experts)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_shard(out / name, group, maker)
        weight_map.update({t.name: name for t in group})
        if not quiet:
            print(f"{name}: {len(group)} tensors, {total / 1e9:.2f} GB so far, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    params = sum(int(np.prod(t.shape)) * (2 if t.kind == "fp4" else 1) for t in tensors
                 if t.kind not in ("scale", "scale8", "ids"))
    return {"dir": str(out), "family": family, "layers": layers, "experts": experts, "seed": seed, "pow2_scales": pow2,
            "tensors": len(tensors), "shards": len(groups), "bytes": total, "params": params,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--family", choices=("deepseek-v3", "qwen3.5-122b", "deepseek-v4-flash"), default="deepseek-v3",
                    help="whose per-layer shapes (default deepseek-v3)")
    ap.add_argument("--layers", type=int, default=3,
                    help="layers (default 3): DeepSeek-V3 1 dense + the rest MoE; Qwen3.5 every 4th full attention")
    ap.add_argument("--experts", type=int, default=32, help="routed experts per MoE layer (DeepSeek-V3 >= 32; default 32)")
    ap.add_argument("--n-group", type=int, default=8, help="expert groups (default 8, as DeepSeek-V3)")
    ap.add_argument("--topk-group", type=int, default=4, help="groups used per token (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", default="2GB", help="bytes per safetensors shard (default 2GB)")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="directory with tokenizer.json, or a llama.cpp ggml-vocab-*.gguf (default: reference model's)")
    ap.add_argument("--pow2-scales", action="store_true", help="power-of-two block scales (weights exact in BF16)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    info = make(args.out, args.layers, args.experts, args.seed, parse_size(args.shard_size), args.tokenizer,
                args.n_group, args.topk_group, args.pow2_scales, args.quiet, args.family)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
