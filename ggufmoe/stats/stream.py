"""Streamed calibration: the statistics of :mod:`ggufmoe.stats.collect`, one decoder layer at a time.

The whole-model path loads the model with ``from_pretrained`` in float32, which a 671B model
cannot afford (2.7 TB). Here the model is built on the meta device only to learn its module
classes, paths and parameter names (transformers stays the reference implementation: every
layer that runs is transformers' own decoder-layer module), and the weights come from the
checkpoint through our own reader (:class:`ggufmoe.source.hf.HFSource`: ``pread``, FP8 block
dequantization; no ``accelerate``, no GPU needed).

This module is the run itself (:func:`stream_stats`, :class:`StreamedRun`: its state, resuming and
the loop over the layers). Its pieces: one decoder layer's two phases (:mod:`ggufmoe.stats.layer_pass`),
the working-set bound (:mod:`ggufmoe.stats.working_set`), the meta-device model, made real one part
at a time (:mod:`ggufmoe.stats.skeleton`), the routed experts read ahead from the checkpoint
(:mod:`ggufmoe.stats.expert_loader`), the hidden states between layers (:mod:`ggufmoe.stats.hidden`)
and the resumable state (:mod:`ggufmoe.stats.calib_state`).

The run, for calibration tokens laid out in batches of chunks exactly as the whole-model path
lays them out (:func:`ggufmoe.stats.text.batches`):

1. **Embedding.** The rows of the tokens are read from the embedding table (the architecture's
   ``token_embd`` spec, in row spans, never the whole table), and the model's own forward is run
   up to its first decoder layer with decoder layers that only capture what they get (the hidden
   states, and the rotary ``position_embeddings``, mask and position ids the model hands each
   layer; those depend on the batch's shape only and are kept per shape).
2. **Per layer** ``k``: the layer's parameters and buffers other than the fused routed-expert
   matrices are made real (float32, on ``device``), read under the checkpoint names transformers'
   loading renames map them from. The statistics are recorded by the same :class:`Collector` as
   in the whole-model path, restricted to the layer's tensors. Phase 1 runs the layer over every
   batch; its fused experts module does not compute: it records its input, routing indices and
   weights for all tokens and returns zeros. Phase 2 loads the routed experts one at a time from
   the checkpoint (gate/up/down specs of the layer; ``gate_up = cat(gate, up)`` as transformers
   fuses them), read ahead in a background thread within a bound in bytes, computes each over
   every token routed to it and adds the weighted outputs to the layer's output — the shared
   :func:`route_experts`, which records the imatrix rows, routing counts, routing mass and REAP
   exactly as the whole-model path does. The layer is then put back on the meta device. What a
   layer hands the next besides its hidden states (GLM-5: the indexer's top-k,
   :meth:`~ggufmoe.arch.base.Architecture.layer_output`) is kept per batch for the next layer.
   Adding the routed output after the layer ran holds where the layer adds it to its output as it
   is (qwen3moe, qwen2moe, mixtral, olmoe, deepseek2 and most others); every MoE layer checks it on
   a few tokens first, and where it does not hold (Gemma 4's norms after the experts) phase 2 only
   sums the routed output and phase 3 runs the layer again with its experts module handing that
   sum back (:mod:`ggufmoe.stats.layer_pass`). The parity tests compare with the whole-model path.
3. **Output.** After the last layer the model's own forward runs with no decoder layers (its
   final norm) into the output matmul, whose input is recorded (no logits are computed).

The hidden states (tokens x hidden, float32) pass from layer to layer in two :class:`RowStore`
buffers, plus one for the experts' input: in memory when they fit in ``max_memory`` beside one
layer's step (its weights and statistics, the experts in use and read ahead, a forward's
activations), else mapped from files in the state directory (:meth:`StreamedRun.working_set`). A forward
runs at most ``BATCH_TOKENS`` tokens (whole chunks), fewer when ``max_memory`` is tight; the
statistics do not depend on it beyond summation order.

Resumable: everything lives in a state directory beside the output, ``.NAME.partial``, locked
as ``convert``'s is (:mod:`ggufmoe.state_dir`). After every layer the layer's output (the next
layer's input), the layer's statistics (``layer.K.npz``) and then the progress record
(``state.json``: layers complete and a fingerprint of the source files, the token ids and the
context) are written durably (:mod:`ggufmoe.stats.calib_state`). Ctrl-C (or SIGTERM) keeps what
is complete; ``resume=True`` continues after the last complete layer; without it an existing
state directory is an error that says what to do. The directory is removed once the statistics
are written.

Memory: one layer's non-expert weights, the routed experts in use and read ahead (at most
``max_memory / 16``, 1 GiB, at least one expert), one batch's activations, the statistics of one
layer, what the local errors sample in one layer (:meth:`StreamedRun.local_bytes`), and the hidden
states (mapped: the pages touched since they were last handed back).

Local errors (:mod:`ggufmoe.stats.local_errors`, :mod:`ggufmoe.stats.prune_error`) are measured on the way:
plain tensors' inputs are sampled by the :class:`Collector`'s hooks in phase 1 and their errors computed
(in a thread pool) once the layer's importance rows are complete; each routed expert's, while phase 2
has it loaded; the pruning errors after phase 2, with the layer's own MoE block re-routing. The output-aware
rounding (``rounding``) runs each layer a second time in the model as rounded so far (:mod:`ggufmoe.stats.rounded_model`).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ggufmoe.arch import architecture_for
from ggufmoe.arch.base import Architecture
from ggufmoe.errors import GgufmoeError, Interrupted
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.source.hf import HFSource
from ggufmoe.state_dir import partial_path
from ggufmoe.stats.calib_state import (HIDDEN, MOE_IN, STATE_VERSION, CalibrationState, Progress,
                                       calibration_fingerprint)
from ggufmoe.quant.rules import quantizable
from ggufmoe.stats.collect import Collector, calibratable
from ggufmoe.stats.hf_model import load_tokenizer
from ggufmoe.stats.file import Stats, save_stats
from ggufmoe.stats.hidden import RowStore
from ggufmoe.stats.imatrix import Imatrix, ImatrixEntry
from ggufmoe.stats.layer_pass import LayerPasses
from ggufmoe.stats.local_errors import KEY as LOCAL_KEY, LocalErrors, LocalOptions
from ggufmoe.stats.error_meter import LocalMeter
from ggufmoe.stats.rounded_model import RoundedModel
from ggufmoe.stats.rounding import Rounder, RoundingRequest
from ggufmoe.stats.probe_results import KEY as PROBES_KEY
from ggufmoe.stats.probe_streams import ProbeRequest, ProbeStreams
from ggufmoe.stats.prune_error import KeptSets
from ggufmoe.stats.skeleton import Skeleton, embedding_rows, unsupported
from ggufmoe.stats.text import CALIB_CTX, Share, calibration_rows, calibration_tokens, share_of, warn_if_few_tokens
from ggufmoe.stats.working_set import WorkingSet, WorkingSetBound

DEFAULT_MAX_MEMORY = 4 * 1024**3


def parse_device(device: str | torch.device) -> torch.device:
    """``cpu`` or ``cuda[:N]``, checked against what torch sees, or one clear error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise GgufmoeError(f"--device {device}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GgufmoeError(f"--device {device}: torch sees no GPU (CUDA unavailable in this torch build "
                               f"{torch.__version__} or on this machine)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GgufmoeError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise GgufmoeError(f"--device {device}: only cpu and cuda are supported")
    return dev


def stream_stats(model_dir: str | Path, text: str, ctx: int = CALIB_CTX, max_tokens: int | None = None,
                 progress: bool = True, dataset: str = "calibration", out: str | Path | None = None,
                 resume: bool = False, device: str | torch.device = "cpu", max_memory: int = DEFAULT_MAX_MEMORY,
                 in_memory: bool | None = None, keep_on_error: bool = True,
                 resume_hint: str = "run the same command with --resume", local: LocalOptions | None = None,
                 measure_local: bool = True, kept_sets: KeptSets | None = None,
                 probes: ProbeRequest | None = None, rounding: RoundingRequest | None = None,
                 share: Share | None = None) -> Stats:
    """The statistics :func:`ggufmoe.stats.collect.collect_stats` gives, computed one layer at a time.

    With ``out`` the statistics are written there (atomically) and the state directory beside it
    makes the run resumable (``resume``); without it a temporary directory (``tempfile``'s) holds
    what does not stay in memory and nothing is resumable. ``measure_local``: also measure the local
    errors of :mod:`ggufmoe.stats.local_errors` (sampled as ``local`` says), stored with the statistics, and with
    ``kept_sets`` (the candidate prunings of a layer, from its statistics) the local pruning errors of
    :mod:`ggufmoe.stats.prune_error`. ``probes``: end-to-end probes carried beside the calibration
    (:mod:`ggufmoe.stats.probe_streams`), their KL stored with the statistics. ``rounding``: round the tensors it
    names with their inputs as the pass goes (:mod:`ggufmoe.stats.rounding`), into its store. ``in_memory`` forces where the hidden
    states live (None: decided by ``max_memory``). ``share``: only that share of the text's chunks
    (:func:`~ggufmoe.stats.text.share_of`), whose statistics summed with the other shares' are the text's.

    Interrupted (Ctrl-C, SIGTERM) after a complete layer, the state directory is kept and the
    :class:`Interrupted` error says so, ending with ``resume_hint`` (how to continue). Failed with
    another error after a complete layer, it is kept only with ``keep_on_error``.
    """
    model_dir = Path(model_dir)
    dev = parse_device(device)
    src = HFSource(model_dir)
    if not src.can_calibrate:
        raise GgufmoeError(f"{model_dir}: cannot be calibrated (no weights)")
    arch = calibratable(architecture_for(src))
    specs = list(arch.tensors())
    if not text or not text.strip():
        raise GgufmoeError("calibration text is empty")
    tokenizer = load_tokenizer(model_dir)
    ids, prefix = calibration_tokens(tokenizer, text, ctx, max_tokens)
    if share is None:
        warn_if_few_tokens(len(ids), arch.n_expert, arch.top_k)
    else:
        ids = share_of(ids, ctx - len(prefix), share)
    ids = torch.from_numpy(ids)
    local = (local or LocalOptions()) if measure_local else None
    fingerprint = calibration_fingerprint(model_dir, ids, prefix, ctx, repr(local) + (probes.key() if probes else ""))
    run = StreamedRun(src, arch, specs, ids, prefix, ctx, dev, progress, local, kept_sets if local else None)
    if share is not None:  # the shares split the local errors by layer: layer k on share k mod n
        run.measures = lambda k: share[0] == (0 if k is None else k % share[1])
    if probes is not None:
        run.streams = ProbeStreams(arch, probes, dev, kept_sets, progress)
    if rounding is not None:
        run.rounder = Rounder.for_rows(rounding, ctx, run.rows, device=dev)
    n_chunks = run.n_chunks
    if out is None:
        with tempfile.TemporaryDirectory(prefix="ggufmoe-calibrate-") as tmp:
            state = CalibrationState(Path(tmp) / "state", "calibration")
            stats = run.run(state, fingerprint, False, max_memory, in_memory)
    else:
        out = Path(out)
        state = CalibrationState(partial_path(out), out.name)
        stats = run.run(state, fingerprint, resume, max_memory, in_memory, out=out, keep_on_error=keep_on_error,
                        resume_hint=resume_hint)
    stats.imatrix = Imatrix(stats.imatrix.entries, [dataset], n_chunks, ctx)
    if out is not None:
        save_stats(stats, out)
        state.remove()
    return stats


# --- the run --------------------------------------------------------------------------------------------

class StreamedRun(WorkingSetBound, LayerPasses):
    """One streamed calibration: the embedding, every decoder layer in turn (:class:`LayerPasses`) within the
    working set (:class:`WorkingSetBound`), the output; resumable after any complete layer."""

    def __init__(self, src: HFSource, arch: Architecture, specs: list[TensorSpec], ids: torch.Tensor,
                 prefix: list[int], ctx: int, device: torch.device, progress: bool, local: LocalOptions | None = None,
                 kept_sets: KeptSets | None = None):
        self.src, self.arch, self.specs, self.device, self.progress = src, arch, specs, device, progress
        self.local, self.kept_sets = local, kept_sets
        self.meter: LocalMeter | None = None  # while running, when local errors are measured
        self.ids, self.prefix, self.ctx = ids, prefix, ctx
        self.n_chunks, self.rows = calibration_rows(len(ids), len(prefix), ctx)  # rows: tokens, prefixes included
        self.batches: list[torch.Tensor] = []  # laid out by working_set()
        self.offsets: list[int] = [0]
        self.moe_width = int(arch.cfg.hidden_size)
        self.width = arch.hidden_streams * self.moe_width
        self.hidden_shape = (self.width,) if arch.hidden_streams == 1 else (arch.hidden_streams, self.moe_width)
        self.n_layers = int(arch.cfg.num_hidden_layers)
        self.by_layer: dict[int | None, list[TensorSpec]] = {}
        for s in specs:
            self.by_layer.setdefault(s.layer, []).append(s)
        self.moe_layers = {s.layer for s in specs if s.is_expert}
        self.durable = True  # whether the state directory is kept for --resume (set by run())
        self.phase1_share = 0.5  # of a MoE layer's time; measured on each MoE layer for the next bar
        self.carry: list[dict[str, torch.Tensor]] = []  # set per run (_run_layers)
        self.streams: ProbeStreams | None = None  # end-to-end probes carried beside the calibration
        self.rounder: Rounder | None = None  # the output-aware rounding carried beside it
        self.own_moe_in: RowStore | None = None
        # whose local errors this run measures: layer k, or None for the embedding and output (all: one process)
        self.measures: Callable[[int | None], bool] = lambda k: True

    def run(self, state: CalibrationState, fingerprint: str, resume: bool, max_memory: int, in_memory: bool | None,
            out: Path | None = None, keep_on_error: bool = True,
            resume_hint: str = "run the same command with --resume") -> Stats:
        working = self.working_set(max_memory, in_memory)
        self.durable = out is not None  # a temporary state directory is never resumed: nothing to keep on disk
        skeleton = Skeleton(self.src, self.arch, self.specs, self.device)
        state.lock()
        kept = None
        try:
            kept = state.kept()
            if kept is not None and not resume:
                raise GgufmoeError(f"{state.path} holds an interrupted calibration to {state.what} "
                                   f"({kept.layers_done} of {kept.n_layers} layers): add --resume to continue it, "
                                   f"or delete the directory to start over")
            if kept is not None and (kept.version, kept.fingerprint, kept.n_layers, kept.rows, kept.width) != \
                    (STATE_VERSION, fingerprint, self.n_layers, self.rows, self.width):
                raise GgufmoeError(f"{state.path}: the interrupted calibration kept there was made from another "
                                   f"source, text or context; delete the directory to start over")
            state.progress = kept
            self._check_disk(state, working)
            if kept is not None and self.progress:
                tqdm.write(f"resuming: {kept.layers_done} of {self.n_layers} layers are done already", file=sys.stderr)
        except BaseException:
            state.release(keep=kept is not None)  # an earlier run's, else nothing in it
            raise
        try:
            return self._run(skeleton, state, fingerprint, working)
        except KeyboardInterrupt:
            if state.layers_done == 0 or out is None:
                state.remove()
                raise
            state.unlock()
            raise Interrupted(f"{state.layers_done} of {self.n_layers} layers are kept in {state.path}: "
                              f"{resume_hint} to continue") from None
        except BaseException:
            state.release(keep=state.layers_done > 0 and out is not None and keep_on_error)
            raise

    def _run(self, skeleton: Skeleton, state: CalibrationState, fingerprint: str, working: WorkingSet) -> Stats:
        self.meter = LocalMeter(self.rows, self.local) if self.local is not None else None
        try:
            return self._run_layers(skeleton, state, fingerprint, working)
        finally:
            if self.meter is not None:
                self.meter.close()
                self.meter = None
            if self.rounder is not None:
                self.rounder.close()

    def _run_layers(self, skeleton: Skeleton, state: CalibrationState, fingerprint: str, working: WorkingSet) -> Stats:
        start = state.layers_done
        paths = [state.path / name for name in HIDDEN]
        mem = working.in_memory
        embedded = None
        if start == 0:
            h_in = RowStore.create(paths[0], self.rows, self.width, mem)
            embedded = self.embed(skeleton, h_in)
        else:
            h_in = RowStore.open(paths[start % 2], self.rows, self.width, mem)
            if self.streams is not None and not self.streams.load(state):
                raise GgufmoeError(f"{state.path}: the interrupted calibration kept there has no probe streams; "
                                   f"delete the directory to start over")
        self.carry = state.load_carry(start - 1, len(self.batches))
        h_out = RowStore.create(paths[(start + 1) % 2], self.rows, self.width, mem)
        moe_in = RowStore.create(state.path / MOE_IN, self.rows, self.moe_width, mem) if self.moe_layers else None
        rounded = None if self.rounder is None else \
            RoundedModel.of(self, state, self.embedding_spec(), start, mem)
        meter = self.meter
        for k in range(start, self.n_layers):
            self.meter = meter if self.measures(k) else None  # a layer another share measures: statistics alone
            try:
                entries, layers, local = self.layer(skeleton, k, h_in, h_out, moe_in, working)
            finally:
                self.meter = meter
            if rounded is not None:
                rounded.layer(skeleton, k, h_in, moe_in, working)
            if k == 0 and embedded is not None:
                local.update(embedded)
            if self.durable:
                h_out.save()
                state.save_carry(k, self.carry)
                if rounded is not None:
                    rounded.save(k)
                if self.streams is not None:
                    self.streams.save(state)
            state.save_layer(k, entries, layers, local if self.meter and self.measures(k) else None)
            state.save(Progress(STATE_VERSION, fingerprint, k + 1, self.n_layers, self.rows, self.width))
            state.drop_carry(k - 1)
            if rounded is not None:
                rounded.done(k)
            h_in.drop_pages()
            h_in, h_out = h_out, h_in
        del h_out, moe_in
        entries, layers, local = {}, {}, LocalErrors(info=self.meter.info if self.meter else {})
        for k in range(self.n_layers):
            e, r, lo = state.load_layer(k)
            entries.update(e)
            layers.update(r)
            if lo is not None:
                local.update(lo)
        out_entries, out_local = self.output(skeleton, h_in)
        if rounded is not None:  # the output matmul in the rounded model, rounded
            self.rounder.begin(recording=False)
            self.output(skeleton, rounded.h_in)
        entries.update(out_entries)
        stats = Stats(Imatrix(dict(sorted(entries.items())), [], 0, 0), dict(sorted(layers.items())),
                      source=str(self.src.path), has_routing=True)
        if self.meter is not None:
            local.update(out_local)
            stats.extras[LOCAL_KEY] = local.to_json()
        if self.streams is not None:
            stats.extras[PROBES_KEY] = self.streams.finish(skeleton, self.by_layer.get(None, []), out_entries).to_json()
        return stats

    def embed(self, skeleton: Skeleton, h0: RowStore) -> LocalErrors | None:
        """Layer 0's input: embedding rows through the model's own forward up to its first layer; the
        embedding's local errors."""
        spec = self.embedding_spec()
        for batch, a, b in zip(self.batches, self.offsets, self.offsets[1:]):
            records = skeleton.capture(skeleton.input_embeddings(embedding_rows(spec, batch)))
            skeleton.remember(tuple(batch.shape), records)
            h0.tensor[a:b] = records[0][0].reshape(b - a, self.width)
        if self.streams is not None:
            self.streams.embed(skeleton, spec)
        if self.meter is None or not quantizable(spec) or not self.measures(None):
            return None
        self.meter.embedding(spec, torch.cat([b.reshape(-1) for b in self.batches]))
        return self.meter.finish([spec.name], None)

    def embedding_spec(self) -> TensorSpec:
        """The token embedding table's tensor."""
        spec = next((s for s in self.by_layer.get(None, []) if s.parsed.base == "token_embd"), None)
        if spec is None:
            raise unsupported(self.arch, "no token embedding tensor")
        return spec

    def output(self, skeleton: Skeleton, h: RowStore) -> tuple[dict[str, ImatrixEntry], LocalErrors]:
        """The output matmul's input: the model's final norm over every token (on the CPU; no logits); its
        local errors."""
        specs = self.by_layer.get(None, [])
        out = [s for s in specs if s.parsed.base == "output"]
        if not out:
            return {}, LocalErrors()
        meter = self.meter if self.measures(None) else None
        if meter is not None:
            meter.wanted = {s.name for s in out if quantizable(s)}
        if self.rounder is not None:
            self.rounder.want(out)
        device, skeleton.device = skeleton.device, torch.device("cpu")
        try:
            skeleton.materialize(skeleton.model, skip=(skeleton.layers,))
        finally:
            skeleton.device = device
        collector = Collector(skeleton.model, specs, sample=self.sampler())
        try:
            for batch, a, b in zip(self.batches, self.offsets, self.offsets[1:]):
                self.set_offset(a, b)
                skeleton.output_pass(h.tensor[a:b].view(*batch.shape, *self.hidden_shape))
        finally:
            collector.remove()
        if self.rounder is not None:
            self.rounder.plain(out)
            self.rounder.finish_layer()
        entries = collector.entries()
        if meter is None:
            return entries, LocalErrors()
        for s in out:
            if s.name in meter.wanted and s.name in entries:
                meter.plain(s, entries[s.name].importance_row(0))
        return entries, meter.finish([s.name for s in out], None)
