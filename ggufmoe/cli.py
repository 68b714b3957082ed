"""Command line: parses arguments and calls the library. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import GgufmoeError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ggufmoe")
def cli() -> None:
    """Fit Mixture-of-Experts models into a memory budget as one drop-in GGUF for llama.cpp."""


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output .gguf file.")
@click.option("--type", "qtype", default="Q8_0", show_default=True,
              help="Default type for weight matrices (F32 F16 BF16 Q8_0 Q6_K Q5_K Q4_K Q3_K Q2_K IQ4_XS "
                   "IQ3_S IQ3_XXS IQ2_S IQ2_XS IQ2_XXS IQ1_M IQ1_S).")
@click.option("--tensor-type", "rules", multiple=True, metavar="REGEX=TYPE",
              help="Type for tensors whose GGUF name matches REGEX; repeatable, first match wins.")
@click.option("--imatrix", type=click.Path(path_type=Path),
              help="Importance matrix (llama.cpp .gguf or .dat) [default: the one in --stats].")
@click.option("--stats", type=click.Path(path_type=Path),
              help="Statistics from `ggufmoe calibrate` (or a llama.cpp imatrix: frequency criterion only).")
@click.option("--keep", type=click.IntRange(min=1), help="Routed experts to keep in every MoE layer.")
@click.option("--keep-ratio", type=click.FloatRange(0, 1, min_open=True), help="Fraction of experts to keep.")
@click.option("--criterion", type=click.Choice(["frequency", "routing", "reap"]), default="routing", show_default=True,
              help="Which experts to keep: most often routed to, alpha*frequency + (1-alpha)*mean routing weight, "
                   "or REAP saliency.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Weight of frequency in the routing criterion.")
@click.option("--top-k", type=click.IntRange(min=1), help="Experts used per token [default: the model's].")
@click.option("--top-k-scale", type=click.FloatRange(0, min_open=True), help="Experts used per token = ceil(S * k).")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), help="Execute a plan from `ggufmoe plan`.")
@click.option("--budget", metavar="SIZE",
              help="Plan for this memory budget and convert (calibrates with --calib unless --stats is given).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text for --budget.")
@click.option("--ctx", default=8192, show_default=True, type=click.IntRange(min=1), help="Context for --budget.")
@click.option("--kv-type", default="f16", show_default=True, type=click.Choice(["f32", "f16", "q8_0", "q4_0"]),
              help="KV cache type for --budget.")
@click.option("--weights-only", is_flag=True, help="--budget counts the file only, not the runtime memory.")
@click.option("--threads", type=click.IntRange(min=1), help="Quantization threads [default: all cores].")
@click.option("--split-max-size", metavar="SIZE", help="Shard the output, each shard at most SIZE (e.g. 40G).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def convert(src: Path, out: Path, qtype: str, rules: tuple[str, ...], imatrix: Path | None, stats: Path | None,
            keep: int | None, keep_ratio: float | None, criterion: str, alpha: float, top_k: int | None,
            top_k_scale: float | None, plan_file: Path | None, budget: str | None, calib: Path | None, ctx: int,
            kv_type: str, weights_only: bool, threads: int | None, split_max_size: str | None, quiet: bool) -> None:
    """Convert the Hugging Face model in SRC to a GGUF file in one streaming pass.

    Optionally prunes routed experts (--keep/--keep-ratio with --stats), remapping the routers,
    and changes the experts used per token (--top-k/--top-k-scale). Norms, biases and routers
    always stay F32; rows that are not a multiple of a type's block size get that type's
    fallback (see ggufmoe/quant.py).
    """
    from .convert import ConvertOptions, convert as run
    from .prune import PruneRequest
    from .tensor_types import TypeRules
    from .units import format_size, parse_size

    prune = PruneRequest(keep=keep, keep_ratio=keep_ratio, criterion=criterion, alpha=alpha, top_k=top_k,
                         top_k_scale=top_k_scale)
    opts = ConvertOptions(out=out, types=TypeRules.parse(qtype, rules), imatrix=imatrix, threads=threads,
                          split_max_size=parse_size(split_max_size) if split_max_size else 0, progress=not quiet,
                          stats=stats, prune=prune)
    if plan_file and budget:
        raise GgufmoeError("give --plan or --budget, not both")
    if plan_file:
        from .plan import Plan, options_from_plan

        paths = run(src, options_from_plan(Plan.load(plan_file), opts))
    elif budget:
        from .plan import Budget, convert_to_budget, format_plan

        plan, paths = convert_to_budget(src, opts, Budget(parse_size(budget), ctx, kv_type, weights_only), calib,
                                        opts.types, criterion)
        click.echo(format_plan(plan))
    else:
        paths = run(src, opts)
    for path in paths:
        click.echo(f"wrote {path} ({format_size(path.stat().st_size)})")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
def inspect(src: Path) -> None:
    """Show architecture, layers, experts, parameter counts and size at several types."""
    from .inspect import format_summary, summarize

    click.echo(format_summary(summarize(src)))


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path),
              help="Calibration text file (UTF-8).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output stats file (a llama.cpp GGUF imatrix with expert statistics).")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Use at most this many tokens of the text.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=2),
              help="Tokens per chunk; chunks are independent sequences, as llama-imatrix's.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def calibrate(src: Path, text_file: Path, out: Path, max_tokens: int | None, ctx: int, quiet: bool) -> None:
    """Run the Hugging Face model in SRC over calibration text; write its statistics.

    Per tensor (per expert for expert tensors): the importance matrix. Per MoE layer and
    expert: tokens routed, routing-weight mass and REAP saliency. The output is a llama.cpp
    GGUF imatrix: `ggufmoe convert --imatrix` and llama-quantize read it.
    """
    from .stats import check_output, collect_stats, format_summary, read_text, save_stats

    check_output(out)
    text = read_text(text_file)
    stats = collect_stats(src, text, ctx=ctx, max_tokens=max_tokens, progress=not quiet, dataset=text_file.name)
    save_stats(stats, out)
    click.echo(format_summary(stats))
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--budget", required=True, metavar="SIZE", help="Memory budget, e.g. 128GiB or 20M.")
@click.option("--ctx", default=8192, show_default=True, type=click.IntRange(min=1), help="Context to fit.")
@click.option("--kv-type", default="f16", show_default=True, type=click.Choice(["f32", "f16", "q8_0", "q4_0"]),
              help="KV cache type.")
@click.option("--stats", type=click.Path(path_type=Path), help="Statistics from `ggufmoe calibrate`.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration text, to measure sensitivities (cached in the stats file).")
@click.option("--weights-only", is_flag=True, help="Budget the file only, not llama.cpp's runtime memory.")
@click.option("--tensor-type", "rules", multiple=True, metavar="REGEX=TYPE", help="Pin tensors to a type.")
@click.option("--criterion", type=click.Choice(["frequency", "routing", "reap"]), default="reap", show_default=True,
              help="Which experts to keep when pruning pays.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Write the plan as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def plan(src: Path, budget: str, ctx: int, kv_type: str, stats: Path | None, calib: Path | None, weights_only: bool,
         rules: tuple[str, ...], criterion: str, out: Path | None, quiet: bool) -> None:
    """Plan kept experts, top-k and a type per tensor so SRC fits BUDGET.

    SRC is a model directory or a config.json alone (then default sensitivities are used).
    """
    from .plan import Budget, build_plan, format_plan
    from .stats import read_text
    from .tensor_types import TypeRules
    from .units import parse_size

    result = build_plan(src, Budget(parse_size(budget), ctx, kv_type, weights_only), stats,
                        read_text(calib) if calib else None, TypeRules.parse("Q8_0", rules), criterion,
                        progress=not quiet)
    click.echo(format_plan(result))
    if out:
        result.save(out)
        click.echo(f"wrote {out}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except GgufmoeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
