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
@click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix (llama.cpp .gguf or .dat).")
@click.option("--threads", type=click.IntRange(min=1), help="Quantization threads [default: all cores].")
@click.option("--split-max-size", metavar="SIZE", help="Shard the output, each shard at most SIZE (e.g. 40G).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def convert(src: Path, out: Path, qtype: str, rules: tuple[str, ...], imatrix: Path | None, threads: int | None,
            split_max_size: str | None, quiet: bool) -> None:
    """Convert the Hugging Face model in SRC to a GGUF file in one streaming pass.

    Norms, biases and routers always stay F32; rows that are not a multiple of a type's
    block size get that type's fallback (see ggufmoe/quant.py).
    """
    from .convert import ConvertOptions, convert as run
    from .tensor_types import TypeRules
    from .units import format_size, parse_size

    opts = ConvertOptions(out=out, types=TypeRules.parse(qtype, rules), imatrix=imatrix, threads=threads,
                          split_max_size=parse_size(split_max_size) if split_max_size else 0, progress=not quiet)
    for path in run(src, opts):
        click.echo(f"wrote {path} ({format_size(path.stat().st_size)})")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
def inspect(src: Path) -> None:
    """Show architecture, layers, experts, parameter counts and size at several types."""
    from .inspect import format_summary, summarize

    click.echo(format_summary(summarize(src)))


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
