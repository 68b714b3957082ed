"""Seeded tiny random models of every supported architecture, saved with transformers.

They share the reference model's tokenizer (vocab 6144) so llama.cpp can load them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
REF_MODEL = REPO / "models" / "refmoe-qwen3"  # the reference model embedded in the repo
TEST_DATA = Path(__file__).resolve().parent / "data"  # calib.txt, eval_doc.txt
VOCAB = 6144
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
              initializer_range=0.08)  # large enough that experts matter


# gpt-oss's own YaRN, but with the correction range rounded as llama.cpp always does (it ships truncate=false)
GPT_OSS_YARN = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=True,
                    original_max_position_embeddings=4096)
# families whose transformers model ggufmoe cannot calibrate (Architecture.calibration_refused)
UNCALIBRATED = ("llama4",)
FAMILIES = ("qwen3moe", "qwen2moe", "mixtral", "olmoe", "deepseek3", "glm4moe", "gpt-oss", "minimax-m2",
            "ernie4_5-moe", "llama4", "dots1", "qwen3next", "qwen35moe", "gemma4",
            "glm-dsa", "deepseek4")  # the keys of configs()
CALIBRATED = tuple(f for f in FAMILIES if f not in UNCALIBRATED)
QWEN_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
               "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}")  # Qwen's ChatML chat template


def configs() -> dict:
    import transformers as T

    return {
        "qwen3moe": T.Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=2,
                                     head_dim=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
        "qwen2moe": T.Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=2,
                                     shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2),
        "mixtral": T.MixtralConfig(**COMMON, intermediate_size=32, num_key_value_heads=2, num_local_experts=8,
                                   num_experts_per_tok=2),
        "olmoe": T.OlmoeConfig(**COMMON, intermediate_size=32, num_key_value_heads=4, num_experts=8,
                               num_experts_per_tok=2),
        "deepseek3": deepseek3_config(),
        "glm4moe": T.Glm4MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=2,
                                   head_dim=32, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                                   first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
                                   use_qk_norm=True, attention_bias=True),
        "gpt-oss": T.GptOssConfig(**{**COMMON, "max_position_embeddings": 131072, "num_hidden_layers": 4},
                                  intermediate_size=32,  # 4 layers: sliding, full, sliding, full as gpt-oss ends
                                  num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                                  sliding_window=64, rope_parameters=GPT_OSS_YARN),
        "minimax-m2": T.MiniMaxM2Config(**COMMON, intermediate_size=32, num_key_value_heads=2, head_dim=32,
                                        num_local_experts=8, num_experts_per_tok=2, rotary_dim=16,
                                        bos_token_id=None, eos_token_id=None),
        "ernie4_5-moe": T.Ernie4_5_MoeConfig(**{**COMMON, "tie_word_embeddings": True}, intermediate_size=128,
                                             moe_intermediate_size=32, num_key_value_heads=2, num_experts=8,
                                             num_experts_per_tok=2, moe_num_shared_experts=1, moe_layer_start_index=1),
        "dots1": T.Dots1Config(**COMMON, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4,
                               n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                               first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
                               norm_topk_prob=True, sliding_window=None),
        "llama4": T.Llama4TextConfig(**{**COMMON, "num_hidden_layers": 4}, intermediate_size=32, intermediate_size_mlp=128,
                                     num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=1,
                                     interleave_moe_layer_step=2, architectures=["Llama4ForCausalLM"]),
        # linear attention in layers 0 and 2, full attention in layer 1; 4 value heads over 2 key heads
        "qwen3next": T.Qwen3NextConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48, num_key_value_heads=2, head_dim=32,
                                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                       linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                       linear_num_key_heads=2, linear_num_value_heads=4,
                                       layer_types=["linear_attention", "full_attention", "linear_attention"]),
        "qwen35moe": qwen35moe_config(),
        "gemma4": gemma4_config(),
        "glm-dsa": glm_dsa_config(),
        "deepseek4": deepseek4_config(),
    }


def gemma4_config(**text):
    """Gemma 4 MoE as Google ships it (the text model under ``text_config`` of a vision-language config with a tiny
    vision tower): sliding layers (window 64, head 16, 4 KV heads) and full layers (head 32, 1 KV head, keys as
    values, proportional rope over a quarter of the head), a dense MLP beside the experts, final logit softcapping,
    and the last two layers reusing the keys and values of layers 2 (sliding) and 3 (full)."""
    import transformers as T

    common = {k: v for k, v in COMMON.items() if k not in ("tie_word_embeddings", "num_hidden_layers")}
    sliding, full = "sliding_attention", "full_attention"
    kw = dict(common, num_hidden_layers=6, layer_types=[sliding, full] * 3, sliding_window=64, num_key_value_heads=4,
              head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
              num_kv_shared_layers=2, enable_moe_block=True, num_experts=8, top_k_experts=2, intermediate_size=48,
              moe_intermediate_size=32, hidden_size_per_layer_input=0, final_logit_softcapping=30.0,
              bos_token_id=None, eos_token_id=None)
    kw.update(text)
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    return T.Gemma4Config(text_config=kw, vision_config=vision, tie_word_embeddings=False,
                          architectures=["Gemma4ForConditionalGeneration"])


def glm_dsa_config(**overrides):
    """GLM-5 with DeepSeek-V3's latent attention and routing (groups, bias, a leading dense block, a shared expert)
    and the sparse attention: the indexer selects 64 of up to 1024 earlier tokens (of 128 in a calibration chunk) on
    the full layers 0 and 2, layers 1 and 3 reuse that selection; index_head_dim 64 (llama.cpp's smallest Hadamard rotation). GLM-5's 32
    indexer heads: with few, many tokens score exactly 0 (every head's ReLU zero), and torch.topk and llama.cpp's
    partial sort break such ties differently."""
    import transformers as T

    kw = dict(COMMON, num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=32, first_k_dense_replace=1,
              num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
              q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, index_topk=64, index_head_dim=64,
              index_n_heads=32, indexer_types=["full", "shared", "full", "shared"])
    kw.update(overrides)
    return T.GlmMoeDsaConfig(**kw)


def deepseek4_config(**overrides):
    """DeepSeek-V4: four hyper-connection streams; layer 0 routes by the token table (a hash layer) over a sliding
    window only, layer 1 adds the ratio-4 compressed cache with its indexer, layer 2 the ratio-128 one, layer 3
    both again; one key-value head of 64 (16 rotated), grouped low-rank output, sqrt-softplus routing with a
    bias, one shared expert, gate/up clamped. A window of 32 and an indexer keeping 16 of the compressed
    entries, so that both limits bite within a 128-token chunk. 32 indexer heads: with 4, many entries score
    exactly 0 (every head's ReLU zero) and torch.topk and llama.cpp break such ties differently."""
    import transformers as T

    kw = dict(COMMON, num_hidden_layers=4, moe_intermediate_size=32, num_key_value_heads=1, head_dim=64,
              q_lora_rank=32, partial_rotary_factor=0.25, n_routed_experts=16, num_experts_per_tok=3,
              n_shared_experts=1, routed_scaling_factor=1.5, norm_topk_prob=True, sliding_window=32, o_groups=2,
              o_lora_rank=16, index_n_heads=32, index_head_dim=64, index_topk=16, swiglu_limit=10.0,
              layer_types=[SLIDING_V4, CSA_V4, HCA_V4, CSA_V4], mlp_layer_types=["hash_moe", "moe", "moe", "moe"])
    kw.update(overrides)
    return T.DeepseekV4Config(**kw)


SLIDING_V4, CSA_V4, HCA_V4 = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def qwen35moe_config(**text):
    """Qwen3.5-MoE as Qwen ships it: a vision-language config (a tiny vision tower) with the text model under
    ``text_config``; linear attention in layers 0 and 2, 4 value heads over 2 key heads (llama.cpp's V-head order
    differs from transformers'); an expert width (96) unlike the hidden size, so the fused gate_up and down
    layouts cannot be taken for each other."""
    import transformers as T

    common = {k: v for k, v in COMMON.items() if k != "tie_word_embeddings"}
    kw = dict(common, moe_intermediate_size=96, shared_expert_intermediate_size=48, num_key_value_heads=2,
              head_dim=32, num_experts=8, num_experts_per_tok=2, linear_conv_kernel_dim=4, linear_key_head_dim=16,
              linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, eos_token_id=None,
              layer_types=["linear_attention", "full_attention", "linear_attention"])
    kw.update(text)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)
    return T.Qwen3_5MoeConfig(text_config=kw, vision_config=vision, tie_word_embeddings=False,
                              architectures=["Qwen3_5MoeForConditionalGeneration"])


def deepseek3_config(**overrides):
    import transformers as T

    kw = dict(COMMON, intermediate_size=128, moe_intermediate_size=32, first_k_dense_replace=1,
              num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
              q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    kw.update(overrides)
    return T.DeepseekV3Config(**kw)


# Scales that start at one (Gemma 4's router input and per-expert output scales, its layer scalar): randomised
SCALES = ("router.scale", "router.per_expert_scale", "layer_scalar")
# Spread of the random routing biases: large enough to move routes, small enough that every expert
# is still routed to (MiniMax-M2 and ERNIE route on their scores alone, with no groups to spread the choice)
ROUTING_BIAS_STD = {"minimax-m2": 0.03, "ernie4_5-moe": 0.03}


def build(name: str, out: Path, seed: int = 0, config=None):
    """Build, randomise (routing bias included) and save a tiny model; returns the model."""
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = config or configs()[name]
    nested = config.get_text_config() is not config  # a vision-language checkpoint (Qwen3.5), built whole
    if nested:
        model = getattr(transformers, config.architectures[0])._from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n or n.endswith(SCALES):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith("norm.bias"):  # LayerNorm (GLM-5's indexer keys)
                p.copy_(0.1 * torch.randn_like(p))
            elif "e_score_correction_bias" in n:
                p.copy_(ROUTING_BIAS_STD.get(name, 0.3) * torch.randn_like(p))
        for n, b in model.named_buffers():
            if n.endswith(SCALES):
                b.copy_(1.0 + 0.1 * torch.randn_like(b))
            elif "e_score_correction_bias" in n:
                b.copy_(ROUTING_BIAS_STD.get(name, 0.3) * torch.randn_like(b))
            elif n.endswith("tid2eid"):  # DeepSeek-V4's token -> experts table: distinct experts per token
                n_expert = config.get_text_config().n_routed_experts
                b.copy_(torch.argsort(torch.rand(b.shape[0], n_expert), dim=-1)[:, :b.shape[1]])
    model.eval()
    if nested:
        save_as_shipped(model, out)
    else:
        model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REF_MODEL / f, out / f)
    return model


class GgmlGelu(torch.nn.Module):
    """tanh GELU as llama.cpp's CPU backend computes it (GGML_GELU_FP16): zero below -10, the input above 10, else
    the input rounded to f16 and the output read from an f16 table."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def with_ggml_gelu(model):
    """``model`` with its tanh GELUs computed as llama.cpp's CPU backend does (:class:`GgmlGelu`), in place: the
    reference where the table's rounding flips near-tied routes (Gemma 4's pruned experts), which says nothing of
    the conversion. A model without GELU is unchanged."""
    from transformers.activations import GELUTanh

    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, GELUTanh):
                setattr(module, name, GgmlGelu())
    return model


def save_as_shipped(model, out: Path) -> None:
    """Save a vision-language model's weights with the names and layout its in-memory modules have, as Qwen ships
    Qwen3.5 (``model.language_model.`` prefix, experts fused, ``model.visual.*``), plus a multi-token-prediction
    block (``mtp.*``) that transformers does not load; transformers 5's save_pretrained would write the experts
    one by one."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    hidden = model.config.get_text_config().hidden_size
    tensors["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden)
    tensors["mtp.norm.weight"] = torch.ones(hidden)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)


def to_fp8_blocks(w: torch.Tensor, block: int = 128, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a matrix to FP8 e4m3 with one inverse scale per block x block tile (DeepSeek-V3 layout); ``pow2``: each
    scale the power of two at or above ``amax / 448`` (DeepSeek-V4's UE8M0 scales)."""
    rows, cols = w.shape
    sr, sc = -(-rows // block), -(-cols // block)
    scale = torch.empty(sr, sc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = torch.exp2(torch.ceil(torch.log2(s))) if pow2 else s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def from_fp8_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The float32 values of an FP8 matrix with one inverse scale per block x block tile, as torch computes
    them (the reference for ggufmoe's reader)."""
    rows, cols = q.shape
    return q.float() * scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]


def save_fp8(model_dir: Path, fp8_dir: Path) -> None:
    """Write an FP8 (block-scaled) copy of ``model_dir`` to ``fp8_dir`` and replace the weights in
    ``model_dir`` by their dequantized values, so ``model_dir`` is the exact reference for it."""
    import json

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, fp8_dir)
    for f in sorted(model_dir.glob("*.safetensors")):
        sd = load_file(f)
        fp8, deq = {}, {}
        for name, t in sd.items():
            if t.ndim == 2 and name.endswith("proj.weight"):
                q, s = to_fp8_blocks(t)
                fp8[name], fp8[name + "_scale_inv"] = q, s
                deq[name] = from_fp8_blocks(q, s)
            else:
                fp8[name] = deq[name] = t
        save_file(fp8, fp8_dir / f.name, metadata={"format": "pt"})
        save_file(deq, f, metadata={"format": "pt"})
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(cfg, indent=2))


E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 as gpt-oss checkpoints store it: ``w`` (..., cols) -> blocks (..., cols/32, 16) uint8 (value
    2i in the low nibble of byte i) and E8M0 scales (..., cols/32), the nearest E2M1 code per value."""
    x = w.reshape(*w.shape[:-1], -1, 32)
    amax = x.abs().amax(-1, keepdim=True).clamp(min=2.0 ** -100)
    exp = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)  # 6 = 1.5 * 2^2 is the largest code
    scaled = x / torch.exp2(exp)
    mag = (scaled.abs().unsqueeze(-1) - E2M1_GRID).abs().argmin(-1)
    codes = (mag | ((scaled < 0) & (mag > 0)).to(torch.int64) << 3).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp.squeeze(-1) + 127).to(torch.uint8)


def save_mxfp4(model_dir: Path, mxfp4_dir: Path) -> None:
    """Write an MXFP4 copy of gpt-oss ``model_dir`` (its experts as blocks and scales, as OpenAI ships them) to
    ``mxfp4_dir`` and replace the experts in ``model_dir`` by transformers' own dequantization of them."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    shutil.copytree(model_dir, mxfp4_dir)
    for f in sorted(model_dir.glob("*.safetensors")):
        sd = load_file(f)
        packed, deq = {}, {}
        for name, t in sd.items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = to_mxfp4(t.transpose(1, 2))  # stored with the outputs as rows
                packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
                deq[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            else:
                packed[name] = deq[name] = t
        save_file(packed, mxfp4_dir / f.name, metadata={"format": "pt"})
        save_file(deq, f, metadata={"format": "pt"})
    cfg = json.loads((mxfp4_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (mxfp4_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def to_ue8m0_fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 with one UE8M0 scale (a power of two) per 128x128 tile, as DeepSeek-V4 ships its matrices."""
    q, scale = to_fp8_blocks(w, pow2=True)
    return q, (torch.log2(scale) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def to_v4_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4's FP4 experts: int8 codes two to a byte (value 2i in the low nibble of byte i), (rows, cols/2),
    and one UE8M0 scale per 32 values, (rows, cols/32)."""
    blocks, scales = to_mxfp4(w)
    return blocks.reshape(w.shape[0], -1).view(torch.int8), scales.view(torch.float8_e8m0fnu)


def from_v4_fp4(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 values of DeepSeek-V4 FP4 codes and scales, by torch (the reference for ggufmoe's reader)."""
    b = codes.view(torch.uint8)
    nibbles = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(b.shape[0], -1).long()
    grid = torch.cat([E2M1_GRID, -E2M1_GRID])
    return (grid[nibbles].reshape(b.shape[0], -1, 32) * scale.float()[..., None]).reshape(b.shape[0], -1)


V4_QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
                   "weight_block_size": [128, 128], "expert_dtype": "fp4"}


def save_v4_quantized(model_dir: Path, out_dir: Path) -> None:
    """Write ``model_dir`` (a DeepSeek-V4 saved by transformers) to ``out_dir`` in DeepSeek's own layout and formats:
    its names without ``model.`` (``embed.weight``, ``hc_head_fn``, ``layers.N.attn.kv_norm.weight``), the
    attention and shared-expert matrices FP8 with UE8M0 ``.scale`` blocks, the routed experts FP4; the weights in
    ``model_dir`` become the values those define, so ``model_dir`` is the exact reference."""
    import json

    from safetensors.torch import load_file, save_file

    renames = {"model.embed_tokens.weight": "embed.weight", "model.hc_head.hc_fn": "hc_head_fn",
               "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}
    shutil.copytree(model_dir, out_dir)
    for f in sorted(model_dir.glob("*.safetensors")):
        (out_dir / f.name).unlink()
        sd = load_file(f)
        packed, deq = {}, {}
        for name, t in sd.items():
            short = renames.get(name, name.removeprefix("model.")).replace(".attn.norm.weight", ".attn.kv_norm.weight")
            base = short.removesuffix(".weight")
            if ".experts." in short and short.endswith(".weight"):
                codes, scale = to_v4_fp4(t)
                packed[short], packed[base + ".scale"] = codes, scale
                deq[name] = from_v4_fp4(codes, scale)
            elif t.ndim == 2 and short.endswith(".weight") and (".attn.w" in short or ".shared_experts." in short):
                q, scale = to_ue8m0_fp8_blocks(t)
                packed[short], packed[base + ".scale"] = q, scale
                deq[name] = from_fp8_blocks(q, scale.float())
            else:
                packed[short] = deq[name] = t
        save_file(packed, out_dir / "model.safetensors", metadata={"format": "pt"})
        save_file(deq, f, metadata={"format": "pt"})
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["quantization_config"] = V4_QUANTIZATION
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def repack_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """ggml's block_mxfp4 bytes (exponent, then byte j = value j | value j+16 << 4) from a checkpoint's blocks
    (value 2i in the low nibble of byte i) and E8M0 scales: the codes moved, none changed."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([scales[..., None], qs], axis=-1).astype(np.uint8).reshape(-1)
