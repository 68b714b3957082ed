"""Command line: parses arguments and calls the library. No logic lives here."""

from __future__ import annotations

import functools
import signal
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from ggufmoe.errors import GgufmoeError, one_line
from ggufmoe.model.qtypes import DEFAULT_BASELINES
from ggufmoe.plan.budget import DEFAULT_CTX, Budget
from ggufmoe.plan.kv_types import DEFAULT_KV_TYPE, KvType
from ggufmoe.prune.criteria import DEFAULT_CRITERION, Criterion
from ggufmoe.quant.modes import RoundingMode
from ggufmoe.sensitivity.cost import PROBE_CHUNKS, SensitivityMode

if TYPE_CHECKING:
    from ggufmoe.cluster.ray_cluster import RayCluster
    from ggufmoe.plan.target import Target


class TopK(click.ParamType):
    """Experts per token: a positive number, or ``auto``."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            self.fail(f"{value!r} is neither a positive number nor 'auto'", param, ctx)
        return n


TOP_K = TopK()
TOP_K_HELP = "With --budget, 'auto' lets the plan use one fewer or one more, priced by the local errors."
FIXED_TOP_K = "--top-k N chooses a pruning, which a budget plan chooses itself: --top-k auto lets it choose top-k"


class Size(click.ParamType):
    """A size such as ``128GiB``, ``500M`` or ``1000000``: more than 0 bytes."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        from ggufmoe.units import parse_size

        if isinstance(value, int):
            return value
        try:
            n = parse_size(value)
        except GgufmoeError as e:
            self.fail(str(e), param, ctx)
        if n <= 0:
            self.fail(f"{value!r} is not more than 0 bytes", param, ctx)
        return n


class Sizes(Size):
    """Comma-separated sizes."""

    name = "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            self.fail("no sizes given", param, ctx)
        return [(v, super(Sizes, self).convert(v, param, ctx)) for v in items]


class TargetType(click.ParamType):
    """``host``, ``cpu``, ``cpu-repack`` or ``cuda:SIZE``."""

    name = "TARGET"

    def convert(self, value, param, ctx):
        from ggufmoe.plan.target import Target, parse_target

        if isinstance(value, Target):
            return value
        try:
            return parse_target(value)
        except GgufmoeError as e:
            self.fail(str(e), param, ctx)


class EnumChoice(click.Choice):
    """The values of a ``StrEnum``, given to the command as its members."""

    def __init__(self, enum: type[StrEnum], members=None):
        super().__init__([e.value for e in members or enum])
        self.enum = enum

    def convert(self, value, param, ctx):
        return self.enum(super().convert(value, param, ctx))


SIZE, SIZES, TARGET = Size(), Sizes(), TargetType()
KV_TYPE, CRITERION = EnumChoice(KvType), EnumChoice(Criterion)
FLOAT_KV = (KvType.F32, KvType.F16)  # what eval scores with
CTX = CHUNK = click.IntRange(min=2)  # a context: the tokens llama.cpp holds (and a full one validate fills)
EVAL_CHUNK = CALIB_CHUNK = 512  # tokens per independent chunk, as llama-perplexity's and llama-imatrix's
CTX_HELP = "Context llama.cpp runs at (n_ctx)."
TARGET_HELP = ("The machine: host (this llama.cpp's CPU repacks), cpu (repacking off), cpu-repack (x86 AVX2/AVX512 "
               "repacks) or cuda:SIZE (every layer offloaded to a GPU of SIZE memory).")
CRITERION_HELP = ("Which experts pruning keeps: most often routed to, alpha*frequency + (1-alpha)*mean routing weight "
                  "(best at every keep count measured: eval/results/prune.md), or REAP saliency.")
SENSITIVITY_HELP = ("How tensor and pruning costs are made from the statistics: probes through llama.cpp (one "
                    "conversion per tensor class, layer group and three whole-model types), the calibration's local "
                    "errors alone (nothing converted), or auto: probes up to 2 GiB of F16 weights, local errors above.")


def renamed(new: str):
    """A callback refusing an option that has another name here (``--ctx`` is the context llama.cpp runs at)."""
    def refuse(ctx, param, value):
        if value is not None:
            raise click.BadParameter(f"here the chunk length is {new}; --ctx is the context plan, convert and "
                                     "validate run at", ctx, param)
    return refuse


def ctx_option(purpose: str):
    """``--ctx``, the same default on every command that counts memory or runs llama.cpp."""
    return click.option("--ctx", default=DEFAULT_CTX, show_default=True, type=CTX, help=f"{CTX_HELP} {purpose}")


def kv_option(purpose: str):
    """``--kv-type``, the same choices and default wherever memory is counted."""
    return click.option("--kv-type", default=DEFAULT_KV_TYPE.value, show_default=True, type=KV_TYPE,
                        help=f"KV cache type {purpose}")


def budget_options(size: str | None, required: bool = False, memory_flag: str = "--weights-only"):
    """The options of a budget plan, the same on ``plan``, ``convert`` and ``sweep``, given to the command as one
    ``budget`` (:class:`Budget`; total 0 when ``--budget`` is not given). ``size``: the help of ``--budget``
    (None: the command takes its sizes itself). ``memory_flag``: ``--weights-only``
    (budgets count memory unless given) or ``--memory-budgets`` (budgets are file sizes unless given)."""
    options = [
        ctx_option("The plan fits it; the memory printed is for it."),
        kv_option("the plan fits and the memory printed is for."),
        click.option(memory_flag, "budget_flag", is_flag=True,
                     help="The budget counts the file only, not llama.cpp's runtime memory."
                     if memory_flag == "--weights-only"
                     else "Budgets include llama.cpp's runtime memory at --ctx [default: they are file sizes]."),
        click.option("--target", default="host", show_default=True, type=TARGET, help=TARGET_HELP),
        click.option("--max-active", type=SIZE, help="At most SIZE of weights read per token (a speed target)."),
        click.option("--criterion", type=CRITERION, default=DEFAULT_CRITERION.value, show_default=True,
                     help=CRITERION_HELP),
        click.option("--sensitivity", type=EnumChoice(SensitivityMode), default=SensitivityMode.AUTO.value,
                     show_default=True, help=SENSITIVITY_HELP),
    ]
    if size is not None:
        options.insert(0, click.option("--budget", "budget_size", required=required, type=SIZE, help=size))

    def decorate(f):
        @functools.wraps(f)
        def command(**kw):
            flag = kw.pop("budget_flag")
            kw["budget"] = Budget(kw.pop("budget_size", None) or 0, ctx=kw.pop("ctx"), kv_type=kw.pop("kv_type"),
                                  weights_only=flag if memory_flag == "--weights-only" else not flag,
                                  top_k_auto=kw.get("top_k") == "auto", max_active=kw.pop("max_active"),
                                  target=kw.pop("target"), criterion=kw.pop("criterion"),
                                  sensitivity=kw.pop("sensitivity"))
            return f(**kw)

        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def needs(options: tuple[str, ...], *others: str) -> None:
    """Refuse ``others`` given explicitly on the command line without any of ``options`` (parameter names)."""
    ctx = click.get_current_context()
    flags = {p.name: max(p.opts, key=len) for p in ctx.command.params}
    flag = flags.__getitem__
    given = [flag(o) for o in others if ctx.get_parameter_source(o) not in (None, click.core.ParameterSource.DEFAULT)]
    if given and not any(ctx.params.get(o) for o in options):
        raise GgufmoeError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only with "
                           f"{' or '.join(map(flag, options))}")


def from_hub(what: str, config_only: Callable[[dict], bool] | None = None):
    """SRC may be a Hugging Face repository id (org/name): adds ``--revision`` and gives the command the local
    snapshot folder holding the files it reads (:mod:`ggufmoe.source.hub`; ``what``: their help). ``config_only``:
    whether, given the command's parameters, config.json alone does."""
    def decorate(f):
        @functools.wraps(f)
        def command(**kw):
            from ggufmoe.source.hub import Files, local_source

            src, alone = kw["src"], config_only is not None and config_only(kw)
            kw["src"] = local_source(src, kw.pop("revision"), Files.CONFIG if alone else Files.MODEL,
                                     progress=not kw.get("quiet"))
            if alone and kw["src"] != Path(src):
                click.echo(f"note: planning {src} from its configuration alone (no weights downloaded; with --stats "
                           "they are)", err=True)
            return f(**kw)

        return click.option("--revision", metavar="REV",
                            help="With SRC a Hugging Face repository id (org/name, when no such local path exists): "
                                 f"its branch, tag or commit [default: main]. Downloads {what} into the Hugging Face "
                                 "cache (HF_TOKEN, HF_HUB_OFFLINE and HF_HUB_CACHE apply).")(command)

    return decorate


def on_ray(what: str):
    """``--ray [ADDRESS]``: the command runs ``what`` on a Ray cluster, handed to it as ``cluster`` (a
    :class:`~ggufmoe.cluster.ray_cluster.RayCluster`, connected while it runs; None without the option)."""
    def decorate(f):
        @functools.wraps(f)
        def command(**kw):
            address = kw.pop("ray_address")
            if address and Path(address).exists():
                raise click.BadParameter(f"{address!r} is a path: give the address as --ray=ADDRESS, or --ray last",
                                         param_hint="'--ray'")
            if address is None:
                return f(cluster=None, **kw)
            from ggufmoe.cluster.ray_cluster import RayCluster
            from ggufmoe.cluster.session import RaySession

            with RaySession(address) as session:
                return f(cluster=RayCluster(session), **kw)

        return click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[=ADDRESS]",
                            help=f"Run {what} on a Ray cluster: --ray=ADDRESS connects to a running one (ray start "
                                 "--head prints it), --ray alone starts one on this machine (or joins RAY_ADDRESS's). "
                                 "Every node needs ggufmoe installed and the inputs and outputs at the same paths "
                                 "(a shared filesystem). Needs pip install 'ggufmoe[ray]'.")(command)

    return decorate


HUB_MODEL = "config.json, the tokenizer files and the safetensors weights, no *.bin,"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ggufmoe")
def cli() -> None:
    """Fit Mixture-of-Experts models into a memory budget as one drop-in GGUF for llama.cpp."""


@cli.command()
@click.argument("src", type=click.Path())  # as typed: ./org/name stays a path (from_hub)
@from_hub(HUB_MODEL)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output .gguf file.")
@click.option("--type", "qtype", default=None,
              help="Default type for weight matrices (F32 F16 BF16 Q8_0 Q6_K Q5_K Q4_K Q3_K Q2_K IQ4_XS "
                   "IQ3_S IQ3_XXS IQ2_S IQ2_XS IQ2_XXS IQ1_M IQ1_S), or a llama.cpp mix that is no tensor type "
                   "(Q4_K_M Q5_K_M Q3_K_M Q3_K_S IQ2_M IQ3_M ...: made by llama.cpp's quantizer from a BF16 "
                   "conversion, every tensor at the type llama-quantize gives it) [default: Q8_0; a GGUF source "
                   "keeps its own types, copied as they are].")
@click.option("--tensor-type", "rules", multiple=True, metavar="REGEX=TYPE",
              help="Type for tensors whose GGUF name matches REGEX; repeatable, first match wins.")
@click.option("--imatrix", type=click.Path(path_type=Path),
              help="Importance matrix (llama.cpp .gguf or .dat) [default: the one in --stats].")
@click.option("--stats", type=click.Path(path_type=Path),
              help="Statistics from `ggufmoe calibrate` (or a llama.cpp imatrix: frequency criterion only).")
@click.option("--keep", type=click.IntRange(min=1), help="Routed experts to keep in every MoE layer.")
@click.option("--keep-ratio", type=click.FloatRange(0, 1, min_open=True), help="Fraction of experts to keep.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Weight of frequency in the routing criterion.")
@click.option("--top-k", type=TOP_K, help="Experts used per token [default: the model's]. " + TOP_K_HELP)
@click.option("--top-k-scale", type=click.FloatRange(0, min_open=True), help="Experts used per token = ceil(S * k).")
@click.option("--keep-per-layer", "per_layer", is_flag=True,
              help="With --keep: as many experts in all, but each layer its own count, chosen from the measured "
                   "pruning errors (for the families patches/per-layer-expert-count.patch covers; the file needs "
                   "llama.cpp with that patch, stock llama.cpp refuses it).")
@click.option("--merge", is_flag=True,
              help="Fold each pruned expert into the most similar kept one (weighted by the criterion's score) "
                   "instead of dropping it; needs --stats from the streamed `ggufmoe calibrate`.")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), help="Execute a plan from `ggufmoe plan`.")
@budget_options("Plan for this memory budget and convert (calibrates with --calib unless --stats is given); "
                "--ctx, --kv-type, --weights-only, --target, --max-active and --sensitivity shape its plan.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration text for --budget, and the text whose inputs --rounding aware fits.")
@click.option("--rounding", type=click.Choice([m.value for m in RoundingMode]), default=RoundingMode.LLAMA.value,
              show_default=True,
              help="Who chooses each weight's code: llama.cpp's quantizers (llama), or output-aware rounding (aware: "
                   "codes chosen with second-order error feedback from the layers' real inputs on --calib, in one "
                   "streamed pass before writing; llama.cpp's scales and file format kept, and for each tensor "
                   "whichever rounding has the lower output error on held-out tokens; needs the Hugging Face "
                   "checkpoint).")
@click.option("--threads", type=click.IntRange(min=1),
              help="Quantization threads, and the --rounding aware error feedback's [default: all cores].")
@click.option("--device", default="cpu", show_default=True,
              help="Where the model runs in the passes over --calib (--budget's calibration, the --rounding aware "
                   "pass): cpu, or cuda / cuda:N when torch sees a GPU.")
@click.option("--split-max-size", type=SIZE, help="Shard the output, each shard at most SIZE (e.g. 40G).")
@click.option("--ollama", is_flag=True,
              help="Also write an Ollama Modelfile beside the output (num_ctx: --ctx if given).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted conversion to the same output (same source, options and inputs) "
                   "where it stopped.")
@click.option("--allow-nonfinite", type=click.Choice(["zero"]),
              help="What to do with NaN/Inf in the source's weights, refused by default: 'zero' replaces them with 0 "
                   "(and says how many).")
@on_ray("the quantization (each worker reads its pieces from SRC and sends back their bytes; written here in "
        "order, the same bytes as without --ray)")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def convert(src: Path, out: Path, qtype: str | None, rules: tuple[str, ...], imatrix: Path | None, stats: Path | None,
            keep: int | None, keep_ratio: float | None, alpha: float, top_k: int | str | None,
            top_k_scale: float | None, per_layer: bool, merge: bool, plan_file: Path | None, budget: Budget,
            calib: Path | None, rounding: str, threads: int | None, device: str, split_max_size: int | None,
            ollama: bool, resume: bool, allow_nonfinite: str | None, quiet: bool, cluster: RayCluster | None) -> None:
    """Convert SRC (a Hugging Face model directory, or a GGUF file or its first shard) to a GGUF
    file in one streaming pass. Tensors whose type stays are copied from a GGUF source unchanged.

    Optionally prunes routed experts (--keep/--keep-ratio with --stats), remapping the routers,
    and changes the experts used per token (--top-k/--top-k-scale). Norms, biases and routers
    always stay F32; rows that are not a multiple of a type's block size get that type's
    fallback (see ggufmoe/model/qtypes.py).

    The file grows in .OUT.partial beside the output and appears only when complete. Interrupted
    (Ctrl-C, SIGTERM, a full disk), the finished tensors are kept there: the same command with
    --resume continues. Free disk space is checked before writing.
    """
    from ggufmoe.pipeline.convert import ConvertOptions
    from ggufmoe.pipeline.convert_job import ConvertJob
    from ggufmoe.stats.text import read_text
    from ggufmoe.pipeline.inspect import RunAt, written_memory_line
    from ggufmoe.pipeline.mix import mix_name
    from ggufmoe.plan.report import format_plan
    from ggufmoe.prune.criteria import PruneRequest
    from ggufmoe.quant.rules import TypeRules
    from ggufmoe.units import format_size

    if top_k == "auto" and not budget.total:
        raise GgufmoeError("--top-k auto shapes a --budget plan; give --budget")
    needs(("budget_size",), "max_active", "budget_flag", "sensitivity")
    aware = rounding == RoundingMode.AWARE
    if calib is not None and not budget.total and not aware:
        raise GgufmoeError("--calib applies only with --budget or --rounding aware")
    if aware and calib is None:
        raise GgufmoeError("--rounding aware fits the codes to the layers' inputs on a text: give --calib FILE")
    if device != "cpu" and not (aware or (budget.total and calib is not None)):
        raise GgufmoeError("--device is where the model runs over --calib: for --rounding aware or --budget --calib")
    if (merge or per_layer) and keep is None and keep_ratio is None:
        raise GgufmoeError(f"{'--merge' if merge else '--keep-per-layer'} changes how --keep prunes; give --keep or "
                           "--keep-ratio")
    needs(("keep", "keep_ratio", "budget_size"), "criterion")
    needs(("keep", "keep_ratio"), "alpha", "top_k_scale")
    prune = PruneRequest(keep=keep, keep_ratio=keep_ratio, criterion=budget.criterion, alpha=alpha,
                         top_k=None if top_k == "auto" else top_k, top_k_scale=top_k_scale, merge=merge,
                         per_layer=per_layer)
    mix = mix_name(qtype)
    if mix and aware:
        raise GgufmoeError(f"--type {mix} is made by llama.cpp's quantizer; --rounding aware needs tensor types "
                           f"(--type Q4_K ..., --plan or --budget)")
    opts = ConvertOptions(out=out, types=TypeRules.parse(None, ()) if mix else TypeRules.parse(qtype, rules),
                          imatrix=imatrix, threads=threads, split_max_size=split_max_size or 0, progress=not quiet,
                          stats=stats, prune=prune, resume=resume, zero_nonfinite=allow_nonfinite == "zero",
                          rounding=None, cluster=cluster, device=device)
    if aware:
        from ggufmoe.pipeline.rounding import RoundingOptions  # torch and transformers: only when the model runs

        opts.rounding = RoundingOptions(read_text(calib))
    job = ConvertJob(opts, plan_file, budget if budget.total else None, calib, mix, rules if mix else ())
    if ollama:
        from ggufmoe.gguf.modelfile import modelfile_path
        from ggufmoe.outputs import check_outputs

        check_outputs([modelfile_path(out)], [src, imatrix, stats, plan_file, calib])
    plan, paths = job.run(src)
    if budget.total:
        click.echo(format_plan(plan))
    for path in paths:
        click.echo(f"wrote {path} ({format_size(path.stat().st_size)})")
    run = RunAt(budget.ctx, budget.kv_type, budget.target)
    click.echo(written_memory_line(paths[0], run))
    if ollama:
        from ggufmoe.gguf.modelfile import write_modelfile

        explicit = click.get_current_context().get_parameter_source("ctx") != click.core.ParameterSource.DEFAULT
        click.echo(f"wrote {write_modelfile(paths[0], ctx=budget.ctx if explicit else None)}")


@cli.command()
@click.argument("src", type=click.Path())  # as typed: ./org/name stays a path (from_hub)
@from_hub(HUB_MODEL + " as inspect reads every shard's header,")
@ctx_option("The memory is for it.")
@kv_option("the memory is for.")
@click.option("--target", default="host", show_default=True, type=TARGET, help=TARGET_HELP)
def inspect(src: Path, ctx: int, kv_type: KvType, target: Target) -> None:
    """Show architecture, layers, experts, parameter counts, size at several types and the memory
    llama.cpp needs to run the model at --ctx.

    For a GGUF (a file or its first shard) also the types it stores and its bytes by tensor class.
    """
    from ggufmoe.pipeline.inspect import RunAt, format_summary, summarize

    click.echo(format_summary(summarize(src, RunAt(ctx, kv_type, target))))


@cli.command()
@click.argument("src", type=click.Path())  # as typed: ./org/name stays a path (from_hub)
@from_hub(HUB_MODEL)
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path),
              help="Calibration text file (UTF-8).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output stats file (a llama.cpp GGUF imatrix with expert statistics).")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Use at most this many tokens of the text.")
@click.option("--chunk", default=CALIB_CHUNK, show_default=True, type=CHUNK,
              help="Tokens per chunk; chunks are independent sequences, as llama-imatrix's.")
@click.option("--ctx", hidden=True, callback=renamed("--chunk"), expose_value=False)
@click.option("--resume", is_flag=True,
              help="Continue an interrupted calibration to the same output (same source, text and options) "
                   "after its last complete layer.")
@click.option("--device", default="cpu", show_default=True,
              help="Where each layer runs: cpu, or cuda / cuda:N when torch sees a GPU.")
@click.option("--max-memory", type=SIZE, default="4GiB", show_default=True,
              help="Bound on the working set: one layer's weights, the experts read ahead, one batch's "
                   "activations and the hidden states of all tokens; beyond it the hidden states live in a "
                   "file in .OUT.partial beside the output.")
@click.option("--whole", is_flag=True,
              help="Load the whole model into transformers (float32, CPU) instead of streaming it layer by "
                   "layer; the reference the streamed path is tested against. Needs RAM for all of it.")
@click.option("--local-errors/--no-local-errors", default=True, show_default=True,
              help="Measure each tensor's local quantization errors and each MoE layer's pruning errors (what a "
                   "plan of a model too big to probe rests on). --no-local-errors: the importance matrix and the "
                   "routing statistics alone (for llama-quantize, or pruning by statistics), in less time.")
@click.option("--probes/--no-probes", default=None,
              help="Carry end-to-end probes beside the calibration (held-out tokens through the model with each "
                   "tensor class, run of layers and the whole model quantized, and pruned), which `plan "
                   "--sensitivity streamed` plans from. Default: on for a model above 2 GiB in F16 (too big to "
                   "probe through llama.cpp) or when --probe-text is given.")
@click.option("--probe-text", "probe_files", multiple=True, type=click.Path(path_type=Path),
              help="Another text the probes also run on (repeatable), of a kind the model will serve: the plan "
                   "minimises its KL on all the texts together and predicts it on text like each.")
@click.option("--probe-chunks", type=click.IntRange(min=1), default=PROBE_CHUNKS, show_default=True,
              help="Chunks of --chunk tokens per text the probes run on (their standard error falls as the square "
                   "root of it; memory and time grow with it).")
@on_ray("the calibration: its chunks split into one share per node, each streamed there with the node's CPUs and "
        "--max-memory, the statistics added up here (the same sums); the local errors split by layer over the "
        "shares, the probes carried by the first")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def calibrate(src: Path, text_file: Path, out: Path, max_tokens: int | None, chunk: int, resume: bool, device: str,
              max_memory: int, whole: bool, local_errors: bool, probes: bool | None, probe_files: tuple[Path, ...],
              probe_chunks: int, quiet: bool, cluster: RayCluster | None) -> None:
    """Run the Hugging Face model in SRC over calibration text; write its statistics.

    Per tensor (per expert for expert tensors): the importance matrix. Per MoE layer and
    expert: tokens routed, routing-weight mass and REAP saliency. The output is a llama.cpp
    GGUF imatrix: `ggufmoe convert --imatrix` and llama-quantize read it.

    The model runs one decoder layer at a time, read from the checkpoint (FP8 included) with
    only that layer's weights in memory and routed experts loaded one at a time, so a model far
    larger than RAM calibrates. The state grows in .OUT.partial beside the output and is saved
    after every layer: interrupted (Ctrl-C, SIGTERM), the same command with --resume continues
    after the last complete layer.

    The same pass measures local errors, stored in the output: what each tensor at each
    candidate type, and each MoE layer pruned to each candidate keep count, change on the
    layer's real inputs; and, with --probes, the KL divergence that quantizing each tensor
    class, each run of layers and the whole model, and pruning, cause at the logits on
    held-out tokens. `plan --stats` plans a model too big to probe through llama.cpp from them.

    One piece of the text in eight (pieces of about 16k characters, spread over it) is held out:
    `plan --calib` with the same text measures its probes there, on text the statistics did not see.
    """
    from ggufmoe.outputs import check_outputs
    from ggufmoe.stats.calib_state import CALIBRATION
    from ggufmoe.stats.file import format_summary, save_stats
    from ggufmoe.stats.probe_results import KEY as PROBES_KEY, StreamedProbes
    from ggufmoe.stats.text import read_text

    check_outputs([out], [src, text_file, *probe_files], kind=CALIBRATION, gguf=True)
    if probes is False and probe_files:
        raise GgufmoeError("--probe-text is for the probes: it takes no --no-probes")
    if not local_errors and (probes or probe_files):
        raise GgufmoeError("the probes calibrate the local errors: --no-local-errors takes no --probes or --probe-text")
    if len({f.name for f in probe_files}) < len(probe_files):
        raise GgufmoeError("two --probe-text files have the same name: the plan names each text by its file's name")
    explicit = [f"--{name.replace('_', '-')}" for name in ("resume", "device", "max_memory")
                if click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
    if whole and (explicit or cluster):
        raise GgufmoeError(f"--whole loads the whole model on the CPU; it takes no "
                           f"{', '.join(explicit + ['--ray'] * bool(cluster))}")
    from ggufmoe.pipeline.calibrate import calibrate as run_calibration

    text = read_text(text_file)
    kw = {} if whole else dict(out=out, resume=resume, device=device, max_memory=max_memory,
                               measure_local=local_errors, probes=probes if local_errors else False,
                               probe_texts={f.name: read_text(f) for f in probe_files}, probe_chunks=probe_chunks,
                               cluster=cluster)
    if whole and (probes or probe_files):
        raise GgufmoeError("the probes run in the streamed calibration: --whole takes no --probes or --probe-text")
    stats = run_calibration(src, text, whole=whole, ctx=chunk, max_tokens=max_tokens, progress=not quiet,
                            dataset=text_file.name, **kw)
    if whole:
        save_stats(stats, out)
    click.echo(format_summary(stats))
    if PROBES_KEY in stats.extras:
        click.echo(StreamedProbes.from_json(stats.extras[PROBES_KEY]).summary())
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("src", type=click.Path())  # as typed: ./org/name stays a path (from_hub)
@from_hub("config.json alone to plan from the configuration (with --stats also the tokenizer and the weights)",
          lambda kw: kw["stats"] is None)
@budget_options("Memory budget, e.g. 128GiB or 20M.", required=True)
@click.option("--stats", type=click.Path(path_type=Path), help="Statistics from `ggufmoe calibrate`.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration text, to measure sensitivities (cached in the stats file).")
@click.option("--tensor-type", "rules", multiple=True, metavar="REGEX=TYPE", help="Pin tensors to a type.")
@click.option("--top-k", "top_k", type=TOP_K, help=TOP_K_HELP)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Write the plan as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def plan(src: Path, budget: Budget, stats: Path | None, calib: Path | None, rules: tuple[str, ...],
         top_k: int | str | None, out: Path | None, quiet: bool) -> None:
    """Plan kept experts, top-k and a type per tensor so SRC fits BUDGET.

    SRC is a model directory, a config.json alone (then default sensitivities are used) or a GGUF
    file (default sensitivities; no tensor above the type it stores unless --tensor-type pins it).
    """
    from ggufmoe.outputs import check_outputs
    from ggufmoe.pipeline.planning import build_plan
    from ggufmoe.plan.report import format_plan
    from ggufmoe.stats.text import read_text
    from ggufmoe.quant.rules import TypeRules

    if isinstance(top_k, int):
        raise GgufmoeError(FIXED_TOP_K)
    if out:
        check_outputs([out], [src, stats, calib])
    result = build_plan(src, budget, stats, read_text(calib) if calib else None, TypeRules.parse(None, rules),
                        progress=not quiet)
    click.echo(format_plan(result))
    if out:
        result.save(out)
        click.echo(f"wrote {out}")


@cli.command()
@click.argument("src", type=click.Path())  # as typed: ./org/name stays a path (from_hub)
@from_hub(HUB_MODEL)
@click.option("--budgets", required=True, type=SIZES, help="Comma-separated budgets, e.g. 8M,10M,12M or 96G,128G.")
@click.option("--calib", required=True, type=click.Path(path_type=Path), help="Calibration text.")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="Evaluation text.")
@click.option("--baselines", default=",".join(DEFAULT_BASELINES), show_default=True, metavar="LIST",
              help="llama.cpp mixes to compare with ('' for none).")
@budget_options(None, memory_flag="--memory-budgets")
@click.option("--eval-chunk", default=EVAL_CHUNK, show_default=True, type=CHUNK, help="Tokens per eval chunk.")
@click.option("--eval-ctx", hidden=True, callback=renamed("--eval-chunk"), expose_value=False)
@click.option("--max-tokens", default=8192, show_default=True, type=click.IntRange(min=2),
              help="Evaluation tokens per file.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for quantization and llama.cpp.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Folder for the files and results (a second run resumes).")
@click.option("--base-model", help="The model card's base_model [default: the source's name in the files].")
@click.option("--license", "license_", help="The model card's license [default: general.license of the files].")
@on_ray("the sweep: the calibration and the base conversion as calibrate --ray and convert --ray do, then every "
        "point (plan, convert, validate, evaluate) a task")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def sweep(src: Path, budgets: list[tuple[str, int]], calib: Path, text_file: Path, baselines: str, budget: Budget,
          eval_chunk: int, max_tokens: int, threads: int | None, out: Path, base_model: str | None,
          license_: str | None, quiet: bool, cluster: RayCluster | None) -> None:
    """Plan, convert, validate and evaluate SRC at several budgets, with llama.cpp's mixes as baselines.

    Writes results.json, results.md (one row per file), pareto.png (size vs KL divergence) and
    README.md (a Hugging Face model card of the files) in the output folder; points already in
    results.json are not redone.
    """
    from ggufmoe.pipeline.sweep import SweepOptions, sweep as run

    opts = SweepOptions(budgets=[text for text, _ in budgets], calib=calib,
                        text=text_file, out=out, baselines=tuple(m.strip() for m in baselines.split(",") if m.strip()),
                        planning=budget, eval_chunk=eval_chunk, max_tokens=max_tokens, threads=threads,
                        progress=not quiet, base_model=base_model, license=license_)
    rows = run(src, opts, cluster)
    click.echo((out / "results.md").read_text())
    click.echo(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'pareto.png'}, {out / 'README.md'} "
               f"({len(rows)} files)")


@cli.command()
@click.argument("ggufs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="The model card to write (README.md).")
@click.option("--eval-json", multiple=True, type=click.Path(path_type=Path),
              help="Quality of a file: the output of `ggufmoe eval --json` (repeatable).")
@click.option("--results", type=click.Path(path_type=Path),
              help="Quality and commands of the files from a sweep's results.json (its pareto.png is linked).")
@click.option("--base-model",
              help="The source model, a Hugging Face repository (org/name) [default: its name in the files].")
@click.option("--license", "license_", help="The source's license [default: general.license of the files].")
@ctx_option("The memory column is for it.")
@kv_option("the memory column is for.")
def card(ggufs: tuple[Path, ...], out: Path, eval_json: tuple[Path, ...], results: Path | None,
         base_model: str | None, license_: str | None, ctx: int, kv_type: KvType) -> None:
    """Write a Hugging Face model card for GGUFS: metadata (base_model, quantized, tags, license) and a
    table of every file: size, bits per weight, experts kept, top-k, KL divergence (mean, p99, p99.9),
    top-1, same top-p, perplexity and llama.cpp's memory at --ctx.

    Size, bits, experts and top-k come from each file's header; the quality columns from --eval-json
    or --results ("–" where none is given).
    """
    from ggufmoe.pipeline.card import CardInputs, card as write

    path = write(list(ggufs), out, CardInputs(ctx=ctx, kv_type=kv_type, base_model=base_model, license=license_),
                 eval_json, results)
    click.echo(f"wrote {path}")


@cli.command("eval")
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("--base", required=True, type=click.Path(path_type=Path),
              help="Reference: a GGUF (e.g. the F32 conversion) or the Hugging Face model directory.")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="Evaluation text (UTF-8).")
@click.option("--chunk", default=EVAL_CHUNK, show_default=True, type=CHUNK,
              help="Tokens per chunk: the text is scored in independent chunks of this length.")
@click.option("--ctx", hidden=True, callback=renamed("--chunk"), expose_value=False)
@click.option("--max-tokens", default=8192, show_default=True, type=click.IntRange(min=2),
              help="Score at most this many tokens of the text.")
@click.option("--kv-type", default=DEFAULT_KV_TYPE.value, show_default=True, type=EnumChoice(KvType, FLOAT_KV),
              help="KV cache type of both models (f32: only the weights differ).")
@click.option("--threads", type=click.IntRange(min=1), help="llama.cpp threads.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Where the base's log-probabilities are cached [default: ~/.cache/ggufmoe/logprobs].")
@click.option("--top-p", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="p of same-top-p: the smallest set of most probable tokens whose probabilities sum to at least p.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_(gguf: Path, base: Path, text_file: Path, chunk: int, max_tokens: int, kv_type: KvType, threads: int | None,
          cache_dir: Path | None, top_p: float, as_json: bool, quiet: bool) -> None:
    """Perplexity, KL divergence (mean, 99th and 99.9th percentile), top-1 agreement and same-top-p
    of GGUF against BASE.

    Same-top-p is the share of scored tokens whose top-p set (the smallest set of most probable
    tokens whose probabilities sum to at least p, default 0.9) is the very set the base has.
    Both score the same chunks of --text through their logits (llama.cpp; transformers for a
    Hugging Face BASE). The base's log-probabilities are cached, so comparing many files is cheap.
    """
    import json

    from ggufmoe.runtime.evaluate import evaluate, format_result
    from ggufmoe.stats.text import read_text

    result = evaluate(gguf, base, read_text(text_file), chunk, max_tokens, kv_type == KvType.F32, threads, cache_dir,
                      progress=not quiet, top_p=top_p)
    click.echo(json.dumps(result.to_dict(), indent=1) if as_json else format_result(result))


@cli.command()
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("--ctx", type=click.IntRange(min=1),
              help="num_ctx [default: the model's context length, at most 8192].")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Modelfile to write [default: <GGUF stem>.Modelfile beside the GGUF].")
def modelfile(gguf: Path, ctx: int | None, out: Path | None) -> None:
    """Write an Ollama Modelfile for GGUF (any GGUF; for a split one, any shard or the unsplit name).

    FROM the GGUF, a TEMPLATE translated from its chat template (ChatML, Llama-3, [INST],
    DeepSeek-V3), its EOS and end-of-turn tokens as stops, and num_ctx.
    """
    from ggufmoe.gguf.modelfile import write_modelfile

    path = write_modelfile(gguf, out, ctx)
    click.echo(f"wrote {path}")
    click.echo(f"then: ollama create NAME -f {path}")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--memory-limit", "limit", type=SIZE,
              help="Memory the whole process may use (peak RSS), e.g. 128GiB [default: the --plan's budget].")
@click.option("--ctx", type=CTX,
              help=CTX_HELP + f" It is filled, every token's logits requested [default: the --plan's, else "
                   f"{DEFAULT_CTX}].")
@click.option("--kv-type", type=KV_TYPE, help=f"KV cache type [default: the --plan's, else {DEFAULT_KV_TYPE}].")
@click.option("--prompt", default=None, help="Prompt to generate from [default: a short English sentence].")
@click.option("--n-predict", default=16, show_default=True, type=click.IntRange(min=0), help="Tokens to generate.")
@click.option("--threads", type=click.IntRange(min=1), help="llama.cpp threads [default: llama-cpp-python's].")
@click.option("--timeout", default=3600, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds before the run counts as failed.")
@click.option("--target", type=TARGET,
              help="Run as host, cpu (repacking off), cpu-repack or cuda:SIZE (every layer offloaded) "
                   "[default: the --plan's, else host].")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path),
              help="The plan the GGUF was made from: its memory budget, context, KV type and target unless given.")
def validate(src: Path, limit: int | None, ctx: int | None, kv_type: KvType | None, prompt: str | None, n_predict: int,
             threads: int | None, timeout: float, target: Target | None, plan_file: Path | None) -> None:
    """Load and run the GGUF in SRC in llama.cpp under an enforced memory limit on the whole process.

    A child process loads it (cgroup v2 memory.max where possible, else RLIMIT_AS on its
    address space), evaluates a full context and generates a few tokens; reports peak RSS and
    speed. It fits when the process's peak RSS is within the limit, what a plan's memory counts.
    Fails when it does not fit or does not run. For a split GGUF give the first shard.
    """
    from ggufmoe.plan.budget import Plan
    from ggufmoe.runtime.validate import DEFAULT_PROMPT, format_result, run_settings, validate as run

    plan = Plan.load(plan_file) if plan_file else None
    settings, notes = run_settings(plan, limit, ctx, kv_type, target)
    for note in notes:
        click.echo(note, err=True)
    result = run(src, settings.limit, settings.ctx, prompt if prompt is not None else DEFAULT_PROMPT, n_predict,
                 threads, timeout, settings.target, plan.machine() if plan else None, settings.kv_type)
    click.echo(format_result(result))


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: cleaned up, or kept for --resume


def main() -> None:
    from ggufmoe.cluster import supervisor

    if supervisor.wants_ray(sys.argv[1:]) and not supervisor.supervised():
        sys.exit(supervisor.run_in_child())  # Ray may end the process itself: a parent says so
    try:
        _main()
    finally:
        supervisor.ended()


def _main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(standalone_mode=False, prog_name="ggufmoe")
    except GgufmoeError as e:
        click.echo(f"{e.label}: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        click.echo(f"error: {one_line(e.format_message())}{where}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        click.echo(f"error: {one_line(e.format_message())}", err=True)
        sys.exit(1)
