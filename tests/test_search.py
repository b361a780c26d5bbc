"""Search: the space decodes valid specs, strategies respect the budget, runs resume exactly."""

import json

import pytest
import torch

from search.importance import sort_model
from search.problem import Budgets, InfeasibleBudget, Problem
from search.run import SearchError, plot_front, require_feasible, run_search
from search.space import SearchSpace, SpaceConfig, SpaceError
from subnet.arch import arch_of
from subnet.supernet import Supernet
from tests.conftest import tiny_model

BLOCKS = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def fake_cost(spec):
    """Additive toy cost: weight bytes read per token at 1 GB/s plus 0.01 ms per layer."""
    ms = spec.weight_bytes() / 1e6 + 0.01 * len(spec.layers)
    return {"decode_ms": ms, "prefill_ms": 10 * ms, "memory_mb": spec.weight_bytes() / 2**20 + 5,
            "size_mb": spec.weight_bytes() / 2**20}


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    imp = sort_model(model, BLOCKS)
    return model, imp


def make_problem(setup, mode="uniform", budgets=None):
    model, imp = setup
    cfg = SpaceConfig(mode=mode, mlp=[96, 64, 32], min_depth_fraction=0.5)
    space = SearchSpace(arch_of(model.config), "llama.cpp", cfg, imp.layer_rank)
    return Problem(space, Supernet(model), BLOCKS[:4], BLOCKS[4:], fake_cost, budgets)


def test_space_grid_is_aligned_and_decodes(setup):
    model, imp = setup
    space = SearchSpace(arch_of(model.config), "llama.cpp", SpaceConfig(mode="hetero", min_depth_fraction=0.5), imp.layer_rank)
    assert all(m % 32 == 0 for m in space.config.mlp)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = [int(torch.randint(n, (1,), generator=gen)) for n in space.sizes]
        spec = space.decode(x)
        assert sorted(ly.index for ly in spec.layers) == imp.keep_layers(len(spec.layers))
    with pytest.raises(SpaceError, match="not held by llama.cpp"):
        SearchSpace(arch_of(model.config), "llama.cpp", SpaceConfig(attn_formats=["int4_b32"]), imp.layer_rank)
    with pytest.raises(SpaceError, match="needs rows that are multiples of 256"):
        SearchSpace(arch_of(model.config), "llama.cpp", SpaceConfig(mlp_formats=["q4_k"]), imp.layer_rank)


def test_format_share_gives_the_chosen_formats_to_the_least_sensitive_blocks(setup):
    model, imp = setup
    arch = arch_of(model.config)
    quant_rank = [2, 0, 3, 1]  # block 2 least sensitive, block 1 most
    cfg = SpaceConfig(attn_formats=["q8_0", "q4_0"], mlp_formats=["q8_0", "q4_0"], format_shares=[1.0, 0.5])
    space = SearchSpace(arch, "llama.cpp", cfg, imp.layer_rank, quant_rank)
    names = [v.name for v in space.vars]
    assert names[-1] == "format_share" and space.vars[-1].choices == (1.0, 0.5)
    x = space.largest(fmt_index=1)  # every format var at q4_0, share 1.0, all 4 blocks
    assert all(ly.formats["q_proj"] == "q4_0" for ly in space.decode(x).layers)
    x[-1] = 1  # share 0.5: blocks 2 and 0 rounded, 3 and 1 keep the widest formats
    spec = space.decode(x)
    got = {ly.index: (ly.formats["o_proj"], ly.formats["down_proj"]) for ly in spec.layers}
    assert got == {0: ("q4_0", "q4_0"), 1: ("q8_0", "q8_0"), 2: ("q4_0", "q4_0"), 3: ("q8_0", "q8_0")}
    assert space.encode(spec) == x and space.decode(space.encode(spec)).to_dict() == spec.to_dict()
    assert "format_share" not in [v.name for v in SearchSpace(arch, "llama.cpp", SpaceConfig(), imp.layer_rank).vars]
    with pytest.raises(SpaceError, match="need uniform mode and a quantization ranking"):
        SearchSpace(arch, "llama.cpp", SpaceConfig(format_shares=[1.0, 0.5]), imp.layer_rank)
    with pytest.raises(SpaceError, match="must lie in"):
        SearchSpace(arch, "llama.cpp", SpaceConfig(format_shares=[0.5, 1.0]), imp.layer_rank, quant_rank)


def test_widened_steps_the_format_share_down_and_cost_violation_leaves_out_accuracy(setup):
    model, imp = setup
    cfg = SpaceConfig(attn_formats=["q8_0", "q4_0"], mlp_formats=["q8_0", "q4_0"], format_shares=[1.0, 0.75, 0.5])
    space = SearchSpace(arch_of(model.config), "llama.cpp", cfg, imp.layer_rank, [2, 0, 3, 1])
    x = space.largest(fmt_index=1)
    assert space.widened(x) == x[:-1] + [1] and space.widened(space.widened(x)) == x[:-1] + [2]
    assert space.widened(x[:-1] + [2]) is None  # the lowest share
    assert SearchSpace(arch_of(model.config), "llama.cpp", SpaceConfig(), imp.layer_rank).widened([0] * 7) is None
    problem = Problem(space, Supernet(model), BLOCKS[:4], BLOCKS[4:], fake_cost, Budgets(size_mb=1.0, max_ppl_increase=0.0))
    cost = {"decode_ms": 1.0, "prefill_ms": 1.0, "memory_mb": 1.0, "size_mb": 1.5}
    assert problem.cost_violation(cost) == pytest.approx(0.5)
    assert problem.violation(problem.reference_ppl() * 2, cost) == pytest.approx(1.5)


def test_choice_vectors_of_one_sub_network_share_one_evaluation(setup):
    """At the widest formats a format share changes nothing: the second vector costs no evaluation."""
    model, imp = setup
    cfg = SpaceConfig(mlp=[96, 64], format_shares=[1.0, 0.5])
    space = SearchSpace(arch_of(model.config), "llama.cpp", cfg, imp.layer_rank, [2, 0, 3, 1])
    problem = Problem(space, Supernet(model), BLOCKS[:4], BLOCKS[4:], fake_cost)
    x = space.largest()
    a = problem.evaluate(x)
    x[-1] = 1
    assert problem.evaluate(x) is a and problem.n_evals == 1


@pytest.mark.parametrize("strategy", ["random", "nsga2", "linas", "sequential"])
def test_strategies_spend_exactly_the_budget(setup, strategy, tmp_path):
    problem = make_problem(setup, mode="hetero" if strategy == "nsga2" else "uniform")
    res = run_search(problem, strategy, 24, seed=1, out=tmp_path, progress=False)
    assert len(res.evaluations) == 24
    assert res.front and res.hypervolume >= 0
    lat = [e.decode_ms for e in res.front]
    assert lat == sorted(lat) and [e.ppl for e in res.front] == sorted((e.ppl for e in res.front), reverse=True)
    saved = json.loads((tmp_path / "front.json").read_text())
    assert saved["strategy"] == strategy and len(saved["front"]) == len(res.front)


def test_same_seed_same_result_and_exact_resume(setup, tmp_path):
    a = run_search(make_problem(setup), "nsga2", 20, seed=5, progress=False)
    b = run_search(make_problem(setup), "nsga2", 20, seed=5, progress=False)
    assert [e.x for e in a.evaluations] == [e.x for e in b.evaluations]
    # interrupted after 12 evaluations, then resumed to 20
    run_search(make_problem(setup), "nsga2", 12, seed=5, out=tmp_path, progress=False)
    with pytest.raises(SearchError, match="pass --resume"):
        run_search(make_problem(setup), "nsga2", 20, seed=5, out=tmp_path, progress=False)
    c = run_search(make_problem(setup), "nsga2", 20, seed=5, out=tmp_path, resume=True, progress=False)
    assert [e.x for e in c.evaluations] == [e.x for e in a.evaluations]


def test_infeasible_budget_names_the_closest(setup):
    problem = make_problem(setup, budgets=Budgets(latency_ms=1e-6))
    res = run_search(problem, "random", 8, seed=0, progress=False)
    with pytest.raises(InfeasibleBudget, match="no sub-network meets the budgets .*closest: perplexity"):
        require_feasible(res, problem)


def test_plot(setup, tmp_path):
    res = run_search(make_problem(setup), "random", 10, seed=0, progress=False)
    path = plot_front({"random": res}, tmp_path / "front.png")
    assert path.stat().st_size > 5000
