"""The allocator's pieces on small hand-made inputs: greedy allocation, the convex hull of a tensor's
options, the keep counts tried, the power-law fit and the layer factors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggufmoe.arch import architecture_for
from ggufmoe.model.qtypes import row_bytes
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.plan.allocate import Option, _TooSmall, allocate, keep_candidates, options_for
from ggufmoe.sensitivity.prune_cost import prune_cost
from ggufmoe.plan.layout import padded
from ggufmoe.prune.criteria import MAX_KEEP_CANDIDATES, Pruning
from ggufmoe.quant.rules import TypeRules
from ggufmoe.sensitivity.cost import Sensitivity
from ggufmoe.sensitivity.fit import apply_layer_factors, fit_power, layer_groups, power_costs
from ggufmoe.source.config import ConfigSource
from ggufmoe.stats.file import ExpertStats, Stats
from ggufmoe.stats.imatrix import Imatrix


def spec(name: str, shape: tuple[int, ...], **kw) -> TensorSpec:
    return TensorSpec(name, shape, load=lambda i: None, **kw)


# --- greedy allocation ----------------------------------------------------------------------------

A = [Option(T.Q2_K, 100, 10.0), Option(T.Q4_K, 200, 4.0), Option(T.Q6_K, 300, 3.0)]  # slopes 0.06, 0.01
B = [Option(T.Q2_K, 100, 5.0), Option(T.Q4_K, 150, 1.0)]  # slope 0.08


def test_allocate_takes_the_best_cost_per_byte_first():
    choice, used = allocate({"a": A, "b": B}, 350)
    assert (choice["a"], choice["b"], used) == (A[1], B[1], 350)
    # a byte less: b's upgrade (0.08 per byte) still fits, a's (0.06) no longer does
    choice, used = allocate({"a": A, "b": B}, 349)
    assert (choice["a"], choice["b"], used) == (A[0], B[1], 250)
    # everything fits: every tensor at its best option
    choice, used = allocate({"a": A, "b": B}, 10_000)
    assert (choice["a"], choice["b"], used) == (A[2], B[1], 450)


def test_allocate_skips_an_upgrade_that_does_not_fit_and_goes_on():
    big = [Option(T.Q2_K, 100, 10.0), Option(T.Q8_0, 300, 0.0)]  # 0.05 per byte, 200 bytes
    small = [Option(T.Q2_K, 100, 5.0), Option(T.Q4_K, 150, 3.0)]  # 0.04 per byte, 50 bytes
    choice, used = allocate({"big": big, "small": small}, 260)
    assert (choice["big"], choice["small"], used) == (big[0], small[1], 250)


def test_allocate_single_options_and_exact_fit():
    fixed = [Option(T.F32, 64, 0.0)]
    choice, used = allocate({"norm": fixed, "a": A}, 64 + 200)
    assert choice == {"norm": fixed[0], "a": A[1]} and used == 264


def test_allocate_too_small_says_what_the_cheapest_needs():
    with pytest.raises(_TooSmall) as e:
        allocate({"a": A, "b": B}, 199)
    assert e.value.needed == 200


def test_allocate_always_fits_and_reports_its_bytes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        groups = {}
        for g in range(5):
            sizes = np.cumsum(rng.integers(1, 50, size=4))
            costs = np.sort(rng.random(4))[::-1]
            groups[str(g)] = [Option(T.Q4_K, int(n), float(c)) for n, c in zip(sizes, costs)]
        budget = int(rng.integers(sum(o[0].nbytes for o in groups.values()), 1000))
        choice, used = allocate(groups, budget)
        assert used == sum(o.nbytes for o in choice.values()) <= budget
        assert all(choice[g] in opts for g, opts in groups.items())


# --- options: the lower convex hull of bytes vs. cost ---------------------------------------------

NAME = "blk.0.attn_q.weight"
SHAPE = (256, 512)  # rows of 512 values: every K-type fits, no fallbacks
# Q4_K lies above the hull (Q3_K -> Q5_K is the better step), Q6_K is dominated (more bytes, more cost)
COSTS = {"Q2_K": 10.0, "IQ3_XXS": 5.0, "Q3_K": 4.0, "Q4_K": 3.9, "Q5_K": 1.0, "Q6_K": 1.2, "Q8_0": 0.1, "F16": 0.0}


def nbytes(t: T) -> int:
    return padded(row_bytes(t, SHAPE[-1]) * SHAPE[0])


def sens(costs: dict[str, float] = COSTS, name: str = NAME) -> Sensitivity:
    return Sensitivity({name: dict(costs)}, True, {})


def test_options_are_the_lower_convex_hull():
    opts = options_for(spec(NAME, SHAPE), sens(), TypeRules(None), with_stats=False)
    # IQ3_XXS is poor without an importance matrix: offered only with statistics
    assert [o.qtype.name for o in opts] == ["Q2_K", "Q3_K", "Q5_K", "Q8_0", "F16"]
    assert [o.cost for o in opts] == [COSTS[o.qtype.name] for o in opts]
    assert [o.nbytes for o in opts] == [nbytes(o.qtype) for o in opts]
    slopes = [(a.cost - b.cost) / (b.nbytes - a.nbytes) for a, b in zip(opts, opts[1:])]
    assert all(s > 0 for s in slopes) and slopes == sorted(slopes, reverse=True)  # convex: returns fall
    with_stats = options_for(spec(NAME, SHAPE), sens(), TypeRules(None), with_stats=True)
    assert [o.qtype.name for o in with_stats] == ["Q2_K", "IQ3_XXS", "Q3_K", "Q5_K", "Q8_0", "F16"]


def test_options_of_pinned_and_f32_tensors():
    pins = TypeRules.parse(None, ["attn_q=Q6_K"])
    assert options_for(spec(NAME, SHAPE), sens(), pins, False) == [Option(T.Q6_K, nbytes(T.Q6_K), 0.0)]
    norm = spec("blk.0.attn_norm.weight", (512,))
    assert options_for(norm, sens(name=norm.name), TypeRules(None), False) == [Option(T.F32, padded(4 * 512), 0.0)]


def test_options_count_the_repacked_copy():
    """A type llama.cpp's CPU backend repacks takes its bytes twice (file and copy)."""
    n = row_bytes(T.Q5_K, 512) * 256
    pin = TypeRules.parse(None, ["attn_q=Q5_K"])
    pinned = options_for(spec(NAME, SHAPE), sens(), pin, False, repack={T.Q5_K: 8})
    assert pinned == [Option(T.Q5_K, padded(n) + n, 0.0)]
    # twice the bytes of Q5_K are more than Q8_0's, for a higher cost: off the hull, and Q6_K is on it now
    opts = options_for(spec(NAME, SHAPE), sens(), TypeRules(None), False, repack={T.Q5_K: 8})
    assert [o.qtype.name for o in opts] == ["Q2_K", "Q3_K", "Q6_K", "Q8_0", "F16"]


def test_options_of_a_gguf_source_are_capped_at_its_type():
    stored = spec(NAME, SHAPE, source_type=T.Q4_K)
    opts = options_for(stored, sens(), TypeRules(None), False)
    # fewer bits only, requantizing keeps the stored type's error; the stored type itself is a copy
    assert [(o.qtype.name, o.cost) for o in opts] == [("Q2_K", 10.0 + 3.9), ("Q3_K", 4.0 + 3.9), ("Q4_K", 3.9)]
    # a stored type the sensitivities do not price costs what the next priced type at or above it costs
    q5_0 = options_for(spec(NAME, SHAPE, source_type=T.Q5_0), sens(), TypeRules(None), False)
    assert q5_0[-1].qtype == T.Q5_0 and q5_0[-1].cost == COSTS["Q5_K"]


# --- keep counts tried ----------------------------------------------------------------------------

def arch_from(tmp_path, config):
    config.save_pretrained(tmp_path)
    return architecture_for(ConfigSource(tmp_path))


def routing_stats(n_expert: int) -> Stats:
    one = np.ones(n_expert)
    return Stats(Imatrix({}, [], 0, 0), {0: ExpertStats(one, one, one, 100)})


def test_keep_candidates_without_groups(tmp_path):
    from transformers import Qwen3MoeConfig

    arch = arch_from(tmp_path, Qwen3MoeConfig(num_experts=24, num_experts_per_tok=4, num_hidden_layers=2))
    assert keep_candidates(arch, routing_stats(24)) == list(range(24, 11, -1))  # all down to half, one by one
    assert keep_candidates(arch, None) == [24]  # no statistics: nothing to choose experts by
    assert keep_candidates(arch, Stats(Imatrix({}, [], 0, 0), {})) == [24]  # an imatrix alone: the same
    assert keep_candidates(arch, None, config_only=True) == list(range(24, 11, -1))


def test_keep_candidates_with_groups(tmp_path):
    from transformers import DeepseekV3Config

    arch = arch_from(tmp_path / "v3", DeepseekV3Config())  # 256 experts in 8 groups, 4 used, top-8
    keep = keep_candidates(arch, routing_stats(256))
    assert len(keep) == MAX_KEEP_CANDIDATES and keep[0] == 256 and keep[-1] == 128
    assert all(k % 8 == 0 for k in keep) and keep == sorted(set(keep), reverse=True)
    assert keep == [256, 248, 232, 224, 216, 200, 192, 184, 168, 160, 152, 136, 128]
    # one group of eight used per token: fewer than 64 experts cannot route top-8
    narrow = arch_from(tmp_path / "narrow", DeepseekV3Config(n_routed_experts=64, n_group=8, topk_group=1))
    assert keep_candidates(narrow, routing_stats(64)) == [64]


def test_prune_cost_is_the_routing_mass_removed():
    mass = np.array([4.0, 3.0, 2.0, 1.0])
    stats = Stats(Imatrix({}, [], 0, 0), {0: ExpertStats(mass, mass, mass, 10), 1: ExpertStats(mass, mass, mass, 10)})
    plan = Pruning(4, 2, 2, 2, "reap", 0.5, {0: [0, 1], 1: [0, 2]})
    assert prune_cost(plan, stats, 2.0) == pytest.approx(2.0 * (0.3 + 0.4) / 2)
    assert prune_cost(Pruning(4, 2, 4, 2, "reap", 0.5, {}), stats, 2.0) == 0.0
    assert prune_cost(plan, None, 2.0) == pytest.approx(2.0 * 0.5)  # no statistics: the experts' share


# --- the power-law fit ----------------------------------------------------------------------------

def test_fit_power_recovers_a_power_law():
    errors = [0.5, 1.0, 2.0, 8.0]
    b, a = fit_power(errors, [0.3 * e ** 0.8 for e in errors])
    assert b == pytest.approx(0.8) and a == pytest.approx(0.3)


def test_fit_power_clips_the_slope_and_needs_two_errors():
    errors = [1.0, 2.0, 4.0]
    b, a = fit_power(errors, [e ** 3 for e in errors])
    assert b == 1.5 and a == pytest.approx(math.exp(np.mean([3 * math.log(e) - 1.5 * math.log(e) for e in errors])))
    assert fit_power(errors, [e ** 0.1 for e in errors])[0] == 0.5
    # one point, or the same error twice: slope 1, factor the (geometric) mean ratio
    assert fit_power([2.0], [0.5]) == (1.0, pytest.approx(0.25))
    assert fit_power([2.0, 2.0], [0.5, 2.0]) == (1.0, pytest.approx(0.5))


def test_power_costs_are_exact_at_the_anchor():
    errors = {"x": {"Q3_K": 2.0, "Q2_K": 8.0, "F16": 0.0}, "y": {"Q3_K": 0.0, "Q2_K": 1.0}}
    c = power_costs(errors, "Q3_K", 0.5, 0.5)
    assert c["x"] == {"Q3_K": 1.0, "Q2_K": pytest.approx(0.5 * 2.0 * 2.0), "F16": 0.0}
    assert c["y"] == {"Q3_K": 0.0, "Q2_K": 0.0}  # no error at the anchor: nothing to scale


# --- layer factors --------------------------------------------------------------------------------

def test_layer_groups_are_runs_of_consecutive_blocks():
    specs = [spec(f"blk.{i}.attn_q.weight", (256, 256)) for i in range(6)] + [spec("output.weight", (256, 256))]
    groups = layer_groups(specs, 4)
    assert list(groups) == ["0-1", "2-3", "4", "5"]
    assert groups["0-1"] == ["blk.0.attn_q.weight", "blk.1.attn_q.weight"]
    assert layer_groups(specs, 10) == {str(i): [f"blk.{i}.attn_q.weight"] for i in range(6)}
    assert layer_groups(specs, 0) == {}


def block_costs() -> dict[str, dict[str, float]]:
    return {"blk.0.attn_q.weight": {"Q3_K": 1.0, "Q4_K": 0.5}, "blk.0.ffn_down_exps.weight": {"Q3_K": 2.0},
            "blk.1.attn_q.weight": {"Q3_K": 1.0, "Q4_K": 0.5}, "blk.1.ffn_down_exps.weight": {"Q3_K": 2.0},
            "output.weight": {"Q3_K": 5.0}}


KINDS = {"attn_q": ["blk.0.attn_q.weight", "blk.1.attn_q.weight"],
         "ffn_down_exps": ["blk.0.ffn_down_exps.weight", "blk.1.ffn_down_exps.weight"], "output": ["output.weight"]}
GROUPS = {"0": ["blk.0.attn_q.weight", "blk.0.ffn_down_exps.weight"],
          "1": ["blk.1.attn_q.weight", "blk.1.ffn_down_exps.weight"]}


def test_layer_factors_follow_the_layer_probes():
    cost = block_costs()
    f = apply_layer_factors(cost, KINDS, GROUPS, {"0": 3.0, "1": 1.0}, "Q3_K")
    assert f == {"0": pytest.approx(1.5), "1": pytest.approx(0.5)}
    assert cost["blk.0.attn_q.weight"] == {"Q3_K": pytest.approx(1.5), "Q4_K": pytest.approx(0.75)}  # every type
    assert cost["blk.1.ffn_down_exps.weight"]["Q3_K"] == pytest.approx(1.0)
    assert cost["output.weight"] == {"Q3_K": 5.0}  # outside the blocks: untouched


def test_layer_factors_keep_class_totals():
    """Classes spread unevenly over the groups: both margins are met (iterative proportional fitting)."""
    cost = block_costs()
    cost["blk.0.ffn_down_exps.weight"]["Q3_K"] = 6.0
    before = {k: sum(cost[n]["Q3_K"] for n in names) for k, names in KINDS.items()}
    layer_kl = {"0": 1.0, "1": 3.0}
    apply_layer_factors(cost, KINDS, GROUPS, layer_kl, "Q3_K")
    after = {k: sum(cost[n]["Q3_K"] for n in names) for k, names in KINDS.items()}
    assert after == {k: pytest.approx(v, rel=1e-6) for k, v in before.items()}
    share = {g: sum(cost[n]["Q3_K"] for n in names) for g, names in GROUPS.items()}
    total = sum(share.values())
    expected = {g: pytest.approx(v / sum(layer_kl.values()), rel=1e-6) for g, v in layer_kl.items()}
    assert {g: v / total for g, v in share.items()} == expected


def test_layer_factors_without_measurements_change_nothing():
    cost = block_costs()
    assert apply_layer_factors(cost, KINDS, GROUPS, {"0": 0.0, "1": 0.0}, "Q3_K") == {"0": 1.0, "1": 1.0}
    assert cost == block_costs()
