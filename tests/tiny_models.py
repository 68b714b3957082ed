"""Seeded tiny random models of every supported architecture, saved with transformers.

They share the reference model's tokenizer (vocab 6144) so llama.cpp can load them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REF_MODEL = REPO / "models" / "refmoe-qwen3"  # the reference model embedded in the repo
TEST_DATA = Path(__file__).resolve().parent / "data"  # calib.txt, eval_doc.txt
VOCAB = 6144
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
              initializer_range=0.08)  # large enough that experts matter


FAMILIES = ("qwen3moe", "qwen2moe", "mixtral", "olmoe", "deepseek3", "glm4moe")  # the keys of configs()


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
    }


def deepseek3_config(**overrides):
    import transformers as T

    kw = dict(COMMON, intermediate_size=128, moe_intermediate_size=32, first_k_dense_replace=1,
              num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
              q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    kw.update(overrides)
    return T.DeepseekV3Config(**kw)


def build(name: str, out: Path, seed: int = 0, config=None):
    """Build, randomise (routing bias included) and save a tiny model; returns the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config or configs()[name], dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "e_score_correction_bias" in n:
                p.copy_(0.3 * torch.randn_like(p))
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.copy_(0.3 * torch.randn_like(b))
    model.eval()
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REF_MODEL / f, out / f)
    return model


def to_fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a matrix to FP8 e4m3 with one inverse scale per block x block tile (DeepSeek-V3 layout)."""
    rows, cols = w.shape
    sr, sc = -(-rows // block), -(-cols // block)
    scale = torch.empty(sr, sc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def save_fp8(model_dir: Path, fp8_dir: Path) -> None:
    """Write an FP8 (block-scaled) copy of ``model_dir`` to ``fp8_dir`` and replace the weights in
    ``model_dir`` by their dequantized values, so ``model_dir`` is the exact reference for it."""
    import json

    from safetensors.torch import load_file, save_file

    from ggufmoe.source.hf import dequant_fp8_blocks

    shutil.copytree(model_dir, fp8_dir)
    for f in sorted(model_dir.glob("*.safetensors")):
        sd = load_file(f)
        fp8, deq = {}, {}
        for name, t in sd.items():
            if t.ndim == 2 and name.endswith("proj.weight"):
                q, s = to_fp8_blocks(t)
                fp8[name], fp8[name + "_scale_inv"] = q, s
                deq[name] = dequant_fp8_blocks(q, s, (128, 128))
            else:
                fp8[name] = deq[name] = t
        save_file(fp8, fp8_dir / f.name, metadata={"format": "pt"})
        save_file(deq, f, metadata={"format": "pt"})
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(cfg, indent=2))
