"""``ggufmoe convert`` as asked: a conversion as given, the execution of a saved plan, or a plan made
for a memory budget first (calibrating when needed) and then executed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ggufmoe.errors import GgufmoeError
from ggufmoe.pipeline.budget import check_plan, convert_to_budget, options_from_plan
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.plan.budget import Budget, Plan


@dataclass
class ConvertJob:
    opts: ConvertOptions
    plan_file: Path | None = None  # a plan from `ggufmoe plan`
    budget: Budget | None = None  # plan for this budget first
    calib: Path | None = None  # calibration text for the budget plan
    criterion: str = "reap"  # which experts the budget plan keeps
    sensitivity: str = "auto"  # how the budget plan's costs are made (pipeline.budget.build_plan)

    def run(self, src: str | Path) -> tuple[Plan | None, list[Path]]:
        """The plan made or executed (None for a conversion as given) and the files written."""
        if self.plan_file and self.budget:
            raise GgufmoeError("give --plan or --budget, not both")
        req = self.opts.prune
        if (self.plan_file or self.budget) and req is not None and \
                (req.merge or req.per_layer or req.keep or req.keep_ratio or req.top_k or req.top_k_scale):
            raise GgufmoeError("--keep, --keep-ratio, --top-k N, --top-k-scale and --merge choose a pruning; with "
                               "--plan or --budget the plan chooses it (--top-k auto lets it choose top-k)")
        if self.plan_file:
            plan = Plan.load(self.plan_file)
            check_plan(plan, self.plan_file, Path(src))
            return plan, convert(src, options_from_plan(plan, self.opts))
        if self.budget:
            return convert_to_budget(src, self.opts, self.budget, self.calib, self.opts.types, self.criterion,
                                     self.sensitivity)
        return None, convert(src, self.opts)
