"""``ggufmoe convert`` as asked: a conversion as given, the execution of a saved plan, or a plan made
for a memory budget first (calibrating when needed) and then executed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ggufmoe.errors import GgufmoeError
from ggufmoe.pipeline.planning import check_plan, convert_to_budget, options_from_plan
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.pipeline.mix import convert_mix
from ggufmoe.plan.budget import Budget, Plan
from ggufmoe.stats.opened import OpenedModel


@dataclass
class ConvertJob:
    opts: ConvertOptions
    plan_file: Path | None = None  # a plan from `ggufmoe plan`
    budget: Budget | None = None  # plan for this budget first
    calib: Path | None = None  # calibration text for the budget plan
    mix: str | None = None  # a llama.cpp mix (Q4_K_M ...) made by llama.cpp (ggufmoe.pipeline.mix)
    overrides: tuple[str, ...] = ()  # REGEX=TYPE for the mix, as llama-quantize's --tensor-type

    def run(self, src: str | Path) -> tuple[Plan | None, list[Path]]:
        """The plan made or executed (None for a conversion as given) and the files written."""
        if self.plan_file and self.budget:
            raise GgufmoeError("give --plan or --budget, not both")
        req = self.opts.prune
        if (self.plan_file or self.budget) and req is not None and req.asks:
            raise GgufmoeError("--keep, --keep-ratio, --top-k N, --top-k-scale and --merge choose a pruning; with "
                               "--plan or --budget the plan chooses it (--top-k auto lets it choose top-k)")
        if self.mix:
            if self.plan_file or self.budget:
                raise GgufmoeError(f"--type {self.mix} is a llama.cpp mix; --plan and --budget choose the types "
                                   "themselves")
            return None, convert_mix(src, self.opts, self.mix, self.overrides)
        if self.plan_file:
            plan = Plan.load(self.plan_file)
            model = OpenedModel.open(src, config_ok=False)
            check_plan(plan, self.plan_file, model)
            return plan, convert(model, options_from_plan(plan, self.opts))
        if self.budget:
            return convert_to_budget(src, self.opts, self.budget, self.calib, self.opts.types)
        return None, convert(src, self.opts)
