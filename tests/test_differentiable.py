"""Differentiable joint search: the relaxed supernet is exact at one-hot, expected costs are exact,
latency pressure buys cheaper architectures, and runs are deterministic."""

from dataclasses import dataclass, replace

import pytest
import torch

from search.differentiable import (
    DiffConfig,
    RelaxedSupernet,
    build_cost_tables,
    differentiable_search,
    one_hot,
    run_differentiable,
)
from search.importance import sort_model
from search.space import SearchSpace, SpaceConfig
from subnet.arch import arch_of
from subnet.supernet import Supernet
from tests.conftest import tiny_model

BLOCKS = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = BLOCKS[:2, :20]
FAST = DiffConfig(steps=10, batch=2, seq_len=32, lr=0.2, snapshots=1, teacher_topk=16)


def fake_cost(spec):
    """Additive toy cost: weight bytes read per token at 1 GB/s, 0.01 ms per layer and per query head."""
    ms = spec.weight_bytes() / 1e6 + 0.01 * len(spec.layers) + 0.01 * sum(ly.heads for ly in spec.layers)
    return {"decode_ms": ms, "size_mb": spec.weight_bytes() / 2**20}


@dataclass
class FakeProblem:
    space: SearchSpace
    supernet: Supernet
    calib_blocks: torch.Tensor
    latency_budget_ms: float | None = None

    def cost_of(self, spec):
        return fake_cost(spec)


@pytest.fixture(scope="module")
def sorted_model():
    model = tiny_model("llama")
    imp = sort_model(model, BLOCKS)
    return model, imp


def make_space(sorted_model, mode="uniform", formats=("q8_0", "q4_0"), embed=("q8_0", "q4_0"), **over):
    model, imp = sorted_model
    cfg = SpaceConfig(mode=mode, mlp=[96, 64, 32], kv_heads=[2, 1], min_depth_fraction=0.5,
                      attn_formats=list(formats), mlp_formats=list(formats), embed_formats=list(embed), **over)  # fmt: skip
    return SearchSpace(arch_of(model.config), "llama.cpp", cfg, imp.layer_rank)


def random_xs(space, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[int(torch.randint(s, (1,), generator=gen)) for s in space.sizes] for _ in range(n)]


@pytest.mark.parametrize(
    "mode,formats,over",
    [
        ("hetero", ("f32",), {"group_heads": [2, 1]}),  # within-group head choices
        ("uniform", ("f32",), {"hidden": [64, 32]}),  # soft hidden masks and mixed norms
        ("uniform", ("q8_0", "q4_0"), {}),  # simulated formats
        ("hetero", ("f32", "q4_0"), {}),
    ],
)
def test_one_hot_relaxation_is_the_subnet(sorted_model, mode, formats, over):
    model, _ = sorted_model
    space = make_space(sorted_model, mode, formats, formats if "f32" in formats else ("q8_0",), **over)
    net, relaxed = Supernet(model), RelaxedSupernet(model, space)
    everything = {i: 0 for i in range(space.n_var)}
    for x in random_xs(space, 6) + [space.smallest()]:
        want = net.activate(space.decode(x)).logits(IDS)
        probs = [p.float() for p in one_hot(space, x)]
        soft = relaxed.logits(IDS, probs)  # masks and mixtures with 0/1 weights
        hard = relaxed.logits(IDS, probs, {i: c for i, c in zip(everything, x)})  # frozen: slices only
        assert (soft - want).abs().max() <= 1e-4, x
        assert (hard - want).abs().max() <= 1e-4, x


@pytest.mark.parametrize("mode", ["uniform", "hetero"])
def test_expected_cost_is_exact_at_one_hot(sorted_model, mode):
    space = make_space(sorted_model, mode)
    tables = build_cost_tables(space, lambda s: [fake_cost(s)["decode_ms"], s.num_params()], ["decode_ms", "params"])
    for x in random_xs(space, 10, seed=1) + [space.largest(), space.smallest()]:
        spec = space.decode(x)
        got = tables.expected(space, one_hot(space, x))
        assert float(got[0]) == pytest.approx(fake_cost(spec)["decode_ms"], rel=1e-9)
        assert float(got[1]) == pytest.approx(spec.num_params(), rel=1e-9)


def test_expected_cost_is_multilinear(sorted_model):
    """Under soft probabilities the table gives the exact expectation (checked by enumeration)."""
    space = make_space(sorted_model, "uniform", embed=("q8_0",))
    tables = build_cost_tables(space, lambda s: [fake_cost(s)["decode_ms"]], ["decode_ms"])
    gen = torch.Generator().manual_seed(2)
    probs = [torch.softmax(torch.randn(v.size, generator=gen, dtype=torch.float64), 0) for v in space.vars]
    import itertools

    want = 0.0
    for x in itertools.product(*[range(v.size) for v in space.vars]):
        w = 1.0
        for p, xi in zip(probs, x):
            w *= float(p[xi])
        want += w * fake_cost(space.decode(x))["decode_ms"]
    assert float(tables.expected(space, probs)[0]) == pytest.approx(want, rel=1e-9)


def test_latency_pressure_picks_cheaper_architectures(sorted_model):
    model, _ = sorted_model
    problem = FakeProblem(make_space(sorted_model, "hetero"), Supernet(model), BLOCKS)
    res = run_differentiable(problem, seed=0, config=replace(FAST, lambdas=(0.0, 20.0)))
    free, pressed = (fake_cost(problem.space.decode(r.x))["decode_ms"] for r in res.runs)
    assert pressed < free
    assert res.runs[1].predicted_latency_ms == pytest.approx(fake_cost(problem.space.decode(res.runs[1].x))["decode_ms"])


def test_latency_budget_drives_lambda(sorted_model):
    model, _ = sorted_model
    space = make_space(sorted_model, "uniform")
    lo, hi = (fake_cost(space.decode(x))["decode_ms"] for x in (space.smallest(), space.largest()))
    problem = FakeProblem(space, Supernet(model), BLOCKS, latency_budget_ms=lo + 0.4 * (hi - lo))
    res = run_differentiable(problem, seed=0, config=replace(FAST, steps=20, budget_fractions=(1.0,)))
    assert res.runs[0].predicted_latency_ms <= problem.latency_budget_ms * 1.05
    assert max(t["lambda"] for t in res.runs[0].trace) > FAST.lambda_init  # it started above: lambda rose


def test_same_seed_same_candidates(sorted_model):
    model, _ = sorted_model
    problem = FakeProblem(make_space(sorted_model, "hetero"), Supernet(model), BLOCKS)
    cfg = replace(FAST, steps=6, gumbel=True, lambdas=(2.0,), snapshots=2)
    a = differentiable_search(problem, 10, seed=3, config=cfg)
    b = differentiable_search(problem, 10, seed=3, config=cfg)
    assert a == b and 1 <= len(a) <= 3
    assert all(len(x) == problem.space.n_var for x in a)
    assert len(differentiable_search(problem, 1, seed=3, config=replace(cfg, steps=2))) == 1


def test_model_weights_untouched(sorted_model):
    model, _ = sorted_model
    before = {n: p.clone() for n, p in model.named_parameters()}
    problem = FakeProblem(make_space(sorted_model, "uniform"), Supernet(model), BLOCKS)
    run_differentiable(problem, seed=0, config=replace(FAST, steps=3, lambdas=(1.0,)))
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())


def test_one_hot_relaxation_with_qkv_bias():
    model = tiny_model("qwen2")
    cfg = SpaceConfig(mode="hetero", mlp=[96, 64], kv_heads=[2, 1], group_heads=[2, 1], min_depth_fraction=0.5,
                      attn_formats=["f32"], mlp_formats=["f32", "q8_0"], embed_formats=["f32"])  # fmt: skip
    space = SearchSpace(arch_of(model.config), "llama.cpp", cfg, layer_rank=[2, 0, 3, 1])
    net, relaxed = Supernet(model), RelaxedSupernet(model, space)
    for x in random_xs(space, 4, seed=5):
        want = net.activate(space.decode(x)).logits(IDS)
        assert (relaxed.logits(IDS, [p.float() for p in one_hot(space, x)]) - want).abs().max() <= 1e-4
