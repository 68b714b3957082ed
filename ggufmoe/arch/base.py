"""What every architecture module provides, and the pieces they share.

An architecture turns a Hugging Face checkpoint into GGUF metadata and a list of
:class:`TensorSpec` — GGUF tensors that load lazily, one part (expert slice) at a time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, ClassVar, Iterator

import gguf
import numpy as np
from gguf.constants import MODEL_TENSOR

from ggufmoe.arch.shape import ModelShape
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.names import EXPERT_TENSORS, SCALE, TensorName
from ggufmoe.model.tensor import RowLoader, TensorSpec
from ggufmoe.source.hf import HFSource
from ggufmoe.source.tokenizer import SPM, TokenizerKeys, tokenizer_keys


@dataclass
class Architecture:
    """Base for the per-architecture modules; subclasses set the class attributes."""

    src: HFSource
    cfg: object  # the configuration as transformers computes it (the truth): source.hf_config.config_view
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[str] = ""
    experts_key: ClassVar[str] = "num_experts"  # config attribute holding the routed expert count
    source_file_type: ClassVar[int | None] = None  # general.file_type of a source that has one (a GGUF)
    # Tensors besides the 3-D expert tensors whose rows are experts (pruning gathers their rows).
    per_expert_rows: ClassVar[frozenset[MODEL_TENSOR]] = frozenset({MODEL_TENSOR.FFN_GATE_INP})
    # The per-expert tensors of the family's transformers router module (rows gathered when it is pruned).
    router_tensors: ClassVar[tuple[str, ...]] = ("weight", "bias")
    # token -> experts tables (DeepSeek-V4's hash layers): the transformers router's buffer, and the GGUF tensor classes
    router_table: ClassVar[str | None] = None
    expert_id_tables: ClassVar[frozenset[str]] = frozenset()
    # whether patches/per-layer-expert-count.patch makes llama.cpp's graph for the family load per-layer counts
    per_layer_expert_counts: ClassVar[bool] = False
    # whether the module writes key/value length (the config's head_dim; else llama.cpp takes n_embd / n_head)
    writes_head_dim: ClassVar[bool] = False
    # llama.cpp's default sliding-window period for the family (every n-th layer full; 0: no sliding window),
    # for GGUF files that have a window but no per-layer pattern
    swa_pattern: ClassVar[int] = 0
    # llama.cpp's compute-graph nodes per ubatch token for families whose graph grows with the batch (0: its
    # default budget, from the tensor count alone: ModelShape.graph_max_nodes)
    graph_nodes_per_token: ClassVar[int] = 0
    # Why the family's transformers model cannot be calibrated (None: it can)
    calibration_refused: ClassVar[str | None] = None
    # the path, in the transformers decoder layer, of a router that reads the layer's residual rather than its experts'
    # input (Gemma 4); the pruning probe routes that input (route_residual) and measures at the layer's output
    # (routed_tail). None: the module holding the experts routes their input
    residual_router: ClassVar[str | None] = None
    layers_read_tokens: ClassVar[bool] = False  # decoder layers take the token ids (``input_ids``: hash routing)
    # Rope scalings the family's llama.cpp graph runs as transformers does (checked by parity tests).
    rope_kinds: ClassVar[tuple[str, ...]] = ("default",)
    # llama.cpp's tokenizer model for a SentencePiece-style BPE tokenizer (source.tokenizer: SPM or GEMMA4)
    spm_tokenizer: ClassVar[str] = SPM
    # Tensor classes without default sensitivities of their own -> the reference class they take.
    sensitivity_aliases: ClassVar[dict[str, str]] = {}
    # set when pruning: experts kept per layer and experts used per token
    n_expert_kept: int | None = field(default=None, init=False)
    n_expert_used: int | None = field(default=None, init=False)
    # per-layer kept counts (block -> experts) as an ``expert_count`` array (:attr:`per_layer_expert_counts` only)
    n_expert_per_layer: dict[int, int] | None = field(default=None, init=False)
    # the tokenizer read once (vocabulary size -> keys), shared by the copies pruning makes
    tokenizers: dict[int, TokenizerKeys] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_expert(self) -> int:
        """Routed experts per MoE layer in the source."""
        return int(getattr(self.cfg, self.experts_key))

    @property
    def n_vocab(self) -> int:
        return int(self.cfg.vocab_size)

    @property
    def top_k(self) -> int:
        """Experts used per token in the source."""
        return int(self.cfg.num_experts_per_tok)

    def rows_are_experts(self, name: TensorName) -> bool:
        """Whether the rows of tensor ``name`` (not a 3-D expert tensor) are experts, gathered when pruning: the
        roles of :attr:`per_expert_rows`, but for a ``.scale`` only those of the expert tensors (llama.cpp's
        per-expert output scales, n_expert long); a router's ``.scale`` (Gemma 4's, n_embd long) is per input."""
        if name.suffix == SCALE:
            return name.tensor in EXPERT_TENSORS and name.tensor in self.per_expert_rows
        return name.tensor in self.per_expert_rows

    @property
    def expert_groups(self) -> tuple[int, int] | None:
        """(groups, groups used per token) when routing picks groups first, else None."""
        return None

    # --- memory model (what llama.cpp allocates per token of context) ----------------------
    @property
    def n_layer(self) -> int:
        """Blocks written to GGUF (``block_count``): the layers llama.cpp keeps a KV cache for."""
        return int(self.cfg.num_hidden_layers)

    @property
    def head_dim(self) -> int:
        """Per-head size: the config's ``head_dim``, else ``n_embd / n_head``."""
        c = self.cfg
        return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    @property
    def rope_dims(self) -> int:
        """Rotated dimensions per head (transformers: ``int(head_dim * partial_rotary_factor)``)."""
        factor = rope_params(self.cfg).get("partial_rotary_factor", getattr(self.cfg, "partial_rotary_factor", None))
        return int(self.head_dim * float(factor if factor is not None else 1.0))

    def kv_head_dims(self) -> tuple[int, int]:
        """(K, V) head size as llama.cpp reads it: ``key_length``/``value_length`` when the module
        writes them (:attr:`writes_head_dim`), else ``n_embd / n_head`` (llama.cpp's default)."""
        c = self.cfg
        hd = self.head_dim if self.writes_head_dim else int(c.hidden_size) // int(c.num_attention_heads)
        return int(hd), int(hd)

    def kv_elements_per_token(self) -> int:
        """KV-cache elements per token of context, all layers with a cache: n_layer x n_kv_heads x (head_k + head_v)
        (:attr:`ModelShape.kv_elements_per_token`)."""
        return self.model_shape().kv_elements_per_token

    def model_shape(self) -> ModelShape:
        """The hyper-parameters llama.cpp's memory depends on, as this module writes them."""
        c = self.cfg
        hk, hv = self.kv_head_dims()
        return ModelShape(n_vocab=int(c.vocab_size), n_embd=int(c.hidden_size), n_layer=self.n_layer,
                          n_head=int(c.num_attention_heads), n_head_kv=int(c.num_key_value_heads), head_k=hk, head_v=hv,
                          n_expert=int(self.n_expert_kept or self.n_expert),
                          n_expert_used=int(self.n_expert_used or self.top_k), n_ff_exp=self.n_ff_exp,
                          n_ff_shexp=int(getattr(c, "shared_expert_intermediate_size", 0) or 0),
                          n_tensors=self.n_tensors, graph_nodes_per_token=self.graph_nodes_per_token)

    @cached_property
    def n_tensors(self) -> int:
        """Tensors the module writes (pruning keeps the count)."""
        return sum(1 for _ in self.tensors())

    @property
    def n_ff_exp(self) -> int:
        """FFN width of one routed expert."""
        c = self.cfg
        return int(getattr(c, "moe_intermediate_size", None) or c.intermediate_size)

    # --- tokenizer -------------------------------------------------------------------
    @property
    def writes_tokenizer(self) -> bool:
        """Whether the output gets the real tokenizer (a configuration alone may lack tokenizer.json)."""
        return (self.src.path / "tokenizer.json").is_file() or self.src.has_weights

    def write_tokenizer(self, w: gguf.GGUFWriter) -> None:
        """The ``tokenizer.*`` keys, from the checkpoint's tokenizer.json."""
        if self.writes_tokenizer:
            vocab = int(self.cfg.vocab_size)
            if vocab not in self.tokenizers:
                self.tokenizers[vocab] = tokenizer_keys(self.src.path, vocab, self.spm_tokenizer)
            self.tokenizers[vocab].write(w)

    @property
    def top_k_fixed(self) -> str | None:
        """Why the experts used per token cannot change (None: they can)."""
        return None

    def with_expert_counts(self, n_expert: int, top_k: int, per_layer: dict[int, int] | None = None) -> "Architecture":
        """A copy that writes ``n_expert`` experts per layer (``per_layer``: each MoE layer its own, ``n_expert``
        their largest) and ``top_k`` used per token (a pruned model)."""
        if per_layer and not self.per_layer_expert_counts:
            raise GgufmoeError(f"per-layer expert counts: llama.cpp's {self.gguf_arch} graph takes one count for all "
                               "layers (patches/per-layer-expert-count.patch covers qwen3moe and deepseek2)")
        out = copy.copy(self)
        out.n_expert_kept, out.n_expert_used = n_expert, top_k
        out.n_expert_per_layer = dict(per_layer) if per_layer else None
        return out

    def write_expert_counts(self, w: gguf.GGUFWriter) -> None:
        if self.n_expert_per_layer:  # an INT32 array: only the patched llama.cpp reads it, stock refuses the file
            n = self.n_expert_kept or self.n_expert
            w.add_array(gguf.Keys.LLM.EXPERT_COUNT.format(arch=self.gguf_arch),
                        [self.n_expert_per_layer.get(il, n) for il in range(self.n_layer)])
        else:
            w.add_expert_count(self.n_expert_kept or self.n_expert)
        w.add_expert_used_count(self.n_expert_used or self.top_k)

    # --- calibration: what a decoder layer hands the next besides its hidden states ----------
    @property
    def embedding_scale(self) -> float | None:
        """The factor transformers' input-embedding module multiplies the table's rows by; None: a plain
        ``nn.Embedding`` (the streamed calibration reads the rows itself and refuses any other module)."""
        return None

    @property
    def hidden_streams(self) -> int:
        """Streams of ``hidden_size`` the hidden state has between decoder layers (hyper-connections; else 1)."""
        return 1

    @property
    def logit_softcap(self) -> float | None:
        """The cap of the final logits' ``cap * tanh(logits / cap)`` (None: none), as llama.cpp and transformers
        apply it."""
        return None

    def layer_input(self, carry: dict) -> dict:
        """The keyword arguments a decoder layer gets from what the layers before it handed on (``carry``, the
        tensors :meth:`layer_output` returned, batch first)."""
        return carry

    def layer_output(self, out, handed: dict) -> tuple[object, dict]:
        """A transformers decoder layer's return value ``out`` and the keyword arguments it got from the layers
        before it (``handed``, from :meth:`layer_input`): (its hidden states, the tensors handed on to the next,
        the batch as their first axis). Most families hand nothing."""
        return (out[0] if isinstance(out, tuple) else out), {}

    def layer_output_bytes(self, ctx: int) -> int:
        """Bytes a token's share of :meth:`layer_output`'s hand-over takes, calibrating in chunks of ``ctx`` tokens."""
        return 0

    def route_residual(self, router, x, top_k: int) -> tuple:
        """(expert ids, weights) the :attr:`residual_router` module ``router`` gives the rows ``x`` of its input,
        choosing ``top_k`` experts per token."""
        raise NotImplementedError

    def routed_tail(self, layer, residual, routed):
        """The output of a decoder layer with a :attr:`residual_router`, per token, from the residual its router
        reads and its routed experts' summed output (what the layer computes after its experts)."""
        raise NotImplementedError

    def stand_in_output(self, hidden):
        """What a stand-in for a decoder layer returns to the model's forward (the form of a layer's return value)."""
        return hidden

    def caveats(self) -> list[str]:
        """Where llama.cpp will run the converted model slightly differently from transformers (a note
        for the user; what it cannot run at all is refused by :meth:`require`)."""
        return []

    # --- to implement --------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def tensors(self) -> Iterator[TensorSpec]:
        raise NotImplementedError

    # --- shared pieces ---------------------------------------------------------------
    def require(self, ok: bool, what: str) -> None:
        if not ok:
            raise GgufmoeError(f"{self.src.path}: unsupported {self.src.architecture} checkpoint: {what}")

    def plain(self, gguf_name: str, hf_name: str, transform: Callable[[np.ndarray], np.ndarray] | None = None,
              shape: tuple[int, ...] | None = None) -> TensorSpec:
        """A tensor read straight from one HF tensor (optionally transformed)."""
        src = self.src

        def load(_: int) -> np.ndarray:
            return transform(src.get(hf_name))

        return TensorSpec(gguf_name, shape or src.shape(hf_name), load if transform else RowLoader(src, hf_name),
                          hf_name=hf_name)

    def stacked_experts(self, gguf_name: str, hf_template: str, n_expert: int) -> TensorSpec:
        """A 3-D expert tensor from per-expert HF tensors; ``hf_template`` has ``{e}``."""
        src = self.src
        first = src.shape(hf_template.format(e=0))
        for e in range(n_expert):
            name = hf_template.format(e=e)
            if name not in src:
                raise GgufmoeError(f"{src.path}: expert tensor {name} missing from the checkpoint")
        return TensorSpec(gguf_name, (n_expert, *first), lambda e: src.get(hf_template.format(e=e)), n_expert,
                          hf_name=hf_template)

    def fused_experts(self, gguf_name: str, hf_name: str, outputs: slice) -> TensorSpec:
        """One of gate / up / down from a fused (experts, inputs, outputs) checkpoint tensor (gpt-oss,
        Llama-4), expert by expert: the ``outputs`` columns of each expert, as GGUF rows."""
        src = self.src
        n_expert, n_in, n_out = src.shape(hf_name)

        def load(e: int) -> np.ndarray:
            return np.ascontiguousarray(src.get_rows(hf_name, e, e + 1)[0][:, outputs].T)

        return TensorSpec(gguf_name, (n_expert, len(range(n_out)[outputs]), n_in), load, n_expert, hf_name=hf_name)

    def fused_expert_rows(self, gguf_name: str, hf_name: str, rows: slice) -> TensorSpec:
        """One of gate / up / down from a fused (experts, outputs, inputs) checkpoint tensor (Qwen3.5), expert by
        expert: the ``rows`` of each expert, already GGUF rows."""
        src = self.src
        n_expert, n_out, n_in = src.shape(hf_name)

        def load(e: int) -> np.ndarray:
            return np.ascontiguousarray(src.get_rows(hf_name, e, e + 1)[0][rows])

        return TensorSpec(gguf_name, (n_expert, len(range(n_out)[rows]), n_in), load, n_expert, hf_name=hf_name)

    def embeddings_and_output(self) -> Iterator[TensorSpec]:
        yield self.plain("token_embd.weight", "model.embed_tokens.weight")
        yield self.plain("output_norm.weight", "model.norm.weight")
        if "lm_head.weight" in self.src:
            yield self.plain("output.weight", "lm_head.weight")

    def gqa_attention(self, il: int, qk_norm: bool = False, bias: bool = False, permute_qk: bool = False,
                      post_norm: str = "ffn_norm") -> Iterator[TensorSpec]:
        """Standard q/k/v/o projections of layer ``il``, optional q/k norms and biases, and the norm
        after attention (``post_norm``: the GGUF name the family's graph reads it by)."""
        p = f"model.layers.{il}.self_attn"
        b = f"blk.{il}"
        n_head, n_kv = self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        perm_q = (lambda t: rope_permute(t, n_head)) if permute_qk else None
        perm_k = (lambda t: rope_permute(t, n_kv)) if permute_qk else None
        yield self.plain(f"{b}.attn_norm.weight", f"model.layers.{il}.input_layernorm.weight")
        yield self.plain(f"{b}.attn_q.weight", f"{p}.q_proj.weight", perm_q)
        yield self.plain(f"{b}.attn_k.weight", f"{p}.k_proj.weight", perm_k)
        yield self.plain(f"{b}.attn_v.weight", f"{p}.v_proj.weight")
        if bias:
            yield self.plain(f"{b}.attn_q.bias", f"{p}.q_proj.bias", perm_q)
            yield self.plain(f"{b}.attn_k.bias", f"{p}.k_proj.bias", perm_k)
            yield self.plain(f"{b}.attn_v.bias", f"{p}.v_proj.bias")
        yield self.plain(f"{b}.attn_output.weight", f"{p}.o_proj.weight")
        if qk_norm:
            yield self.plain(f"{b}.attn_q_norm.weight", f"{p}.q_norm.weight")
            yield self.plain(f"{b}.attn_k_norm.weight", f"{p}.k_norm.weight")
        yield self.plain(f"{b}.{post_norm}.weight", f"model.layers.{il}.post_attention_layernorm.weight")

    def routed_experts(self, il: int, moe_prefix: str,
                       names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> Iterator[TensorSpec]:
        """Router plus the three stacked expert tensors of layer ``il``."""
        b = f"blk.{il}"
        gate, up, down = names
        yield self.plain(f"{b}.ffn_gate_inp.weight", f"{moe_prefix}.gate.weight")
        yield self.stacked_experts(f"{b}.ffn_gate_exps.weight", f"{moe_prefix}.experts.{{e}}.{gate}.weight", self.n_expert)
        yield self.stacked_experts(f"{b}.ffn_up_exps.weight", f"{moe_prefix}.experts.{{e}}.{up}.weight", self.n_expert)
        yield self.stacked_experts(f"{b}.ffn_down_exps.weight", f"{moe_prefix}.experts.{{e}}.{down}.weight", self.n_expert)

    def dense_ffn(self, il: int, prefix: str, suffix: str = "") -> Iterator[TensorSpec]:
        """A SwiGLU MLP (``suffix`` ``_shexp`` for a shared expert)."""
        b = f"blk.{il}"
        yield self.plain(f"{b}.ffn_gate{suffix}.weight", f"{prefix}.gate_proj.weight")
        yield self.plain(f"{b}.ffn_up{suffix}.weight", f"{prefix}.up_proj.weight")
        yield self.plain(f"{b}.ffn_down{suffix}.weight", f"{prefix}.down_proj.weight")

    def write_common_metadata(self, w: gguf.GGUFWriter, n_ff: int | list[int] | None = None,
                              n_head_kv: int | list[int] | None = None) -> None:
        """Keys shared by the llama-like architectures (context, sizes, heads, rope, norm eps); ``n_ff``: the
        dense feed-forward width where it is not ``intermediate_size``, ``n_head_kv``: the key/value heads where
        they are not ``num_key_value_heads`` (either one per layer where layers differ)."""
        c = self.cfg
        w.add_context_length(int(c.max_position_embeddings))
        w.add_embedding_length(int(c.hidden_size))
        w.add_block_count(int(c.num_hidden_layers))
        w.add_feed_forward_length(n_ff if n_ff is not None else int(getattr(c, "intermediate_size", 0) or 0))
        w.add_head_count(int(c.num_attention_heads))
        w.add_head_count_kv(n_head_kv if n_head_kv is not None else int(c.num_key_value_heads))
        if self.writes_head_dim:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        w.add_vocab_size(int(c.vocab_size))
        self.write_rope(w)

    @property
    def rope_kind(self) -> str:
        rope = rope_params(self.cfg)
        return rope.get("rope_type", rope.get("type", "default"))

    def write_rope(self, w: gguf.GGUFWriter) -> None:
        """Rope base and scaling; only the scalings in :attr:`rope_kinds` (tested against transformers)."""
        rope = rope_params(self.cfg)
        w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        kind = self.rope_kind
        self.require(kind in self.rope_kinds, f"rope scaling {kind!r}")
        if kind != "yarn":
            return
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        # llama.cpp's converter writes them; newer llama.cpp reads them (this one keeps its 32/1 defaults)
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))


def rope_params(cfg) -> dict:
    """Rope parameters as transformers 5 computes them (``rope_parameters``), older keys as fallback."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    params = dict(params)
    if "rope_theta" not in params and getattr(cfg, "rope_theta", None) is not None:
        params["rope_theta"] = cfg.rope_theta
    return params


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half layout to llama.cpp's interleaved (NORM) rope."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
