"""How close a plan's memory is to a measured run: the part the model and llama.cpp add, compared with what they
added to the validate child's own baseline. The process before loading (Python with llama_cpp) moves with the
machine's state by several MiB, which a plan covers with a stated spread (ggufmoe.plan.process); the model's part
is what the memory formulas predict."""

from ggufmoe.plan.process import BASELINE_SPREAD_BYTES, interpreter_baseline


def model_part_error(predicted_total: float, peak_rss: float, baseline_rss: float) -> float:
    """Relative error of the predicted model part against the measured one (bytes in, a fraction out)."""
    predicted = predicted_total - interpreter_baseline() - BASELINE_SPREAD_BYTES
    measured = peak_rss - baseline_rss
    return abs(predicted - measured) / measured
