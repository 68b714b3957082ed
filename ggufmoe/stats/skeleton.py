"""The model of a streamed calibration, built on the meta device, one part made real at a time.

transformers stays the reference implementation: the model is built from its configuration
(``from_config``) on the meta device, which costs no memory and gives every module class, path
and parameter name; the part about to run (one decoder layer, or the final norm and output
matmul) is then made real, float32 on the run's device, from the checkpoint through our own
reader, under the checkpoint names transformers' loading renames map the model's names from.
The fused routed-expert tensors and the embeddings never are: the experts are computed expert by
expert from the checkpoint (:mod:`ggufmoe.stats.expert_loader`), and the tokens' embedding rows
are read from the table in row spans (:func:`embedding_rows`).

What the model hands its decoder layers (the rotary ``position_embeddings``, the mask, the
position ids) is captured by running its own forward with stand-ins for the layers
(:meth:`Skeleton.capture`); it depends on the batch's shape only and is kept per shape.
"""

from __future__ import annotations

import torch
from torch import nn

from ggufmoe.arch.base import Architecture
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.finite import checked_finite
from ggufmoe.model.tensor import RowLoader, TensorSpec
from ggufmoe.source.hf import HFSource
from ggufmoe.source.hf_config import transformers_config
from ggufmoe.stats.collect import model_keys

EMBED_SPAN_BYTES = 64 * 1024**2  # embedding rows read at once at most
EMBED_GAP = 64  # rows between two wanted ones read through rather than read apart


def unsupported(arch: Architecture, what: str) -> GgufmoeError:
    """The error for a model the streamed path cannot run as it is."""
    return GgufmoeError(f"streamed calibration of {arch.src.architecture}: {what}; calibrate with --whole")


def supports_sdpa(cfg) -> bool:
    """Whether transformers' causal-LM class for ``cfg`` runs torch's fused attention (gpt-oss's sinks do not)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(cfg), None)
    return bool(getattr(cls, "_supports_sdpa", True))


class _Stop(Exception):
    """Ends a capture pass after its last decoder layer."""


class _Capture(nn.Module):
    """Stands in for decoder layer ``index`` in a capture pass: hands what it gets to ``sink``, returns its input
    in the form a layer returns (``output``: :meth:`Architecture.stand_in_output`)."""

    def __init__(self, index: int, sink, last: bool, like: nn.Module, output):
        super().__init__()
        self.index, self.sink, self.last, self.output = index, sink, last, output
        if hasattr(like, "attention_type"):  # models that pick a mask per layer type read it
            self.attention_type = like.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.sink(self.index, hidden_states, args, kwargs)
        if self.last:
            raise _Stop
        return self.output(hidden_states)


class _Inject(nn.Module):
    """Stands in for the decoder layers in an output pass: returns ``hidden`` (the last layer's output) whatever it
    gets, in the form a layer returns (``output``)."""

    def __init__(self, hidden: torch.Tensor, output):
        super().__init__()
        self.hidden, self.output = hidden, output

    def forward(self, *args, **kwargs):
        return self.output(self.hidden)


def on_device(obj, device: torch.device):
    """``obj`` with every tensor in it (tuples, lists, dicts) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(on_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: on_device(v, device) for k, v in obj.items()}
    return obj


class Skeleton:
    """The model built on the meta device; parts made real from the checkpoint when they run."""

    def __init__(self, src: HFSource, arch: Architecture, specs: list[TensorSpec], device: torch.device):
        from transformers import AutoModelForCausalLM

        self.src, self.arch, self.device = src, arch, device
        cfg = transformers_config(src.path)  # arch.cfg is a cached view of it, not a transformers config
        cfg._attn_implementation = "sdpa" if supports_sdpa(cfg) else "eager"  # outside from_pretrained: eager
        self.cfg = cfg
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        except Exception as e:  # transformers raises many types for configurations it cannot build
            raise GgufmoeError(f"{src.path}: transformers cannot build the model ({e})") from None
        self.model = model.eval()
        self.base = model.base_model
        layers = getattr(self.base, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) != int(cfg.num_hidden_layers):
            raise unsupported(arch, "no list of num_hidden_layers decoder layers in the model")
        self.layers = layers
        embed = model.get_input_embeddings()
        # a subclass may scale or otherwise change the lookup: only the scale its architecture states is taken
        self.embedding_scale = arch.embedding_scale
        if type(embed) is not nn.Embedding and (self.embedding_scale is None or not isinstance(embed, nn.Embedding)):
            raise unsupported(arch, f"input embedding {type(embed).__name__}")
        self.embeddings = {id(embed), id(model.get_output_embeddings())}  # never materialized
        rotary = getattr(self.base, "rotary_emb", None)
        if rotary is not None:  # its inverse frequencies are computed, not loaded: build it (and its copies) for real
            for parent in list(model.modules()):
                for name, child in parent.named_children():
                    if type(child) is type(rotary):
                        setattr(parent, name, type(rotary)(config=cfg))
        self.paths = {id(m): path for path, m in model.named_modules()}
        # checkpoint names of the model's tensors (parameters and buffers), through transformers' renames
        experts = [s for s in specs if s.is_expert]
        instances = {s.hf_name.format(e=e) for s in experts for e in range(s.n_parts)}
        scales = {src.scale_of(n) for n in src.tensor_names()}  # FP8/FP4 scales: read with their tensors
        names = [n for n in src.tensor_names() if n not in scales and n not in instances]
        firsts = [s.hf_name.format(e=0) for s in experts]
        keys = model_keys(model, names + firsts)
        self.checkpoint: dict[str, str] = {}
        self.fused: set[str] = set()  # model tensors several checkpoint tensors are merged into
        for name in names:
            key = keys[name]
            if key in self.checkpoint:
                self.fused.add(key)
            self.checkpoint[key] = name
        self.model_key = {name: key for key, name in self.checkpoint.items()}  # checkpoint name -> model key
        # the fused routed-expert tensors, never materialized: computed expert by expert from the specs
        self.expert_keys = {keys[s.hf_name.format(e=0)] for s in experts}
        self.experts_path = {s.layer: keys[s.hf_name.format(e=0)].rpartition(".")[0] for s in experts}
        self._args: dict[tuple[int, ...], dict[int, tuple]] = {}

    # --- weights
    def release(self, module: nn.Module) -> None:
        """``module``'s tensors back on meta, but the buffers the model computes rather than loads (the rotary
        inverse frequencies of a layer's own rotary modules): :meth:`materialize` could not make those again."""
        for mod in module.modules():
            path = self.paths[id(mod)]
            for leaf, t in list(mod._parameters.items()):
                if t is not None:
                    mod._parameters[leaf] = nn.Parameter(t.to("meta"), requires_grad=False)
            for leaf, t in list(mod._buffers.items()):
                if t is not None and f"{path}.{leaf}" in self.checkpoint:
                    mod._buffers[leaf] = t.to("meta")

    def materialize(self, module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> None:
        """Every meta parameter and buffer of ``module`` read from the checkpoint, float32 on the device; the
        fused routed-expert tensors, the embeddings and the modules in ``skip`` (with theirs) stay on meta."""
        skipped = self.embeddings | {id(m) for m in skip}
        todo = [module]
        while todo:
            mod = todo.pop()
            if id(mod) in skipped:
                continue
            todo.extend(mod.children())
            path = self.paths[id(mod)]
            for kind in ("_parameters", "_buffers"):
                for leaf, t in list(getattr(mod, kind).items()):
                    full = f"{path}.{leaf}" if path else leaf
                    if t is None or not t.is_meta or full in self.expert_keys:
                        continue
                    name = self.checkpoint.get(full)
                    if name is None or full in self.fused:
                        why = "several checkpoint tensors are merged into it" if name else "no checkpoint tensor"
                        raise unsupported(self.arch, f"cannot load {full} ({why})")
                    value = torch.from_numpy(checked_finite(name, self.src.get(name)))
                    if not t.dtype.is_floating_point:  # a table of ids (DeepSeek-V4's token -> experts), exact in float32
                        value = value.to(t.dtype)
                    if tuple(value.shape) != tuple(t.shape):
                        raise unsupported(self.arch, f"checkpoint tensor {name} has shape {tuple(value.shape)}, "
                                                     f"the model's {full} {tuple(t.shape)}")
                    value = value.to(self.device)
                    if kind == "_parameters":
                        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
                    else:
                        mod._buffers[leaf] = value

    def experts_module(self, k: int) -> nn.Module | None:
        path = self.experts_path.get(k)
        try:
            return None if path is None else self.model.get_submodule(path)
        except AttributeError:
            return None

    # --- what the model hands its layers
    def input_embeddings(self, rows: torch.Tensor) -> torch.Tensor:
        """The input embeddings the model's embedding module makes of the table rows ``rows`` (float32)."""
        if self.embedding_scale is None:
            return rows
        return rows * torch.tensor(self.embedding_scale, dtype=rows.dtype)

    def capture(self, inputs_embeds: torch.Tensor) -> dict[int, tuple]:
        """Run the model's forward on ``inputs_embeds`` with capturing layers: layer -> (hidden, args, kwargs)."""
        records: dict[int, tuple] = {}

        def sink(i: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
            records[i] = (hidden, args, kwargs)

        n = len(self.layers)
        self.base.layers = nn.ModuleList([_Capture(i, sink, i == n - 1, layer, self.arch.stand_in_output)
                                          for i, layer in enumerate(self.layers)])
        try:
            with torch.no_grad():
                self.base(inputs_embeds=inputs_embeds, use_cache=False)
        except _Stop:
            pass
        finally:
            self.base.layers = self.layers
        if sorted(records) != list(range(n)):
            raise unsupported(self.arch, "its forward does not run every decoder layer once")
        return records

    def layer_args(self, shape: tuple[int, ...], k: int) -> tuple[tuple, dict]:
        """(args, kwargs) the model hands layer ``k`` for hidden states of ``shape`` (batch, tokens), on the device."""
        if shape not in self._args:
            records = self.capture(torch.zeros(*shape, int(self.cfg.hidden_size)))
            self.remember(shape, records)
        return self._args[shape][k]

    def run_layer(self, k: int, layer: nn.Module, h: torch.Tensor, tokens: torch.Tensor,
                  carry: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Layer ``k`` on hidden states ``h`` of the token ids ``tokens`` (batch, tokens), with what the model hands
        its layers, the ids where the layers read them, and what the layers before handed on (``carry``): its output
        and what it hands on (:meth:`Architecture.layer_output`)."""
        args, kwargs = self.layer_args(tuple(tokens.shape), k)
        handed = self.arch.layer_input(on_device(carry, self.device))
        if self.arch.layers_read_tokens:
            handed = {**handed, "input_ids": tokens.to(self.device)}
        return self.arch.layer_output(layer(h, *args, **{**kwargs, **handed}), handed)

    def remember(self, shape: tuple[int, ...], records: dict[int, tuple]) -> None:
        if shape not in self._args:
            self._args[shape] = {i: (on_device(a, self.device), on_device(kw, self.device))
                                 for i, (_, a, kw) in records.items()}

    def output_pass(self, hidden: torch.Tensor) -> None:
        """The model's forward after its decoder layers: a stand-in for them hands on ``hidden`` (batch, tokens, and
        the hidden state in the form the layers pass it on) to the final norm and the (patched) output matmul."""
        self.base.layers = nn.ModuleList([_Inject(hidden, self.arch.stand_in_output)])
        try:
            with torch.no_grad():
                self.model(inputs_embeds=torch.zeros(*hidden.shape[:2], int(self.cfg.hidden_size)), use_cache=False)
        finally:
            self.base.layers = self.layers


def embedding_rows(spec: TensorSpec, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the embedding table (float32), read in spans of rows, never the whole table; refused when
    a row used is not finite."""
    loader = spec.load
    uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    if not isinstance(loader, RowLoader):
        return embeddings(spec, torch.from_numpy(loader(0))[uniq], inverse, ids)
    width = spec.shape[-1]
    u = uniq.tolist()
    rows = torch.empty(len(u), width)
    span = max(1, EMBED_SPAN_BYTES // (4 * width))
    i = 0
    while i < len(u):
        j = i
        while j + 1 < len(u) and u[j + 1] - u[j] <= EMBED_GAP and u[j + 1] - u[i] < span:
            j += 1
        block = torch.from_numpy(loader.rows(u[i], u[j] + 1))
        rows[i: j + 1] = block[uniq[i: j + 1] - u[i]]
        i = j + 1
    return embeddings(spec, rows, inverse, ids)


def embeddings(spec: TensorSpec, rows: torch.Tensor, inverse: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The embeddings of ``ids`` from the distinct ``rows`` of the table they use, refused when one is not finite."""
    checked_finite(spec.name, rows.numpy())
    return rows[inverse].reshape(*ids.shape, spec.shape[-1])

