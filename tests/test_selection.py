"""Choosing the winner: the shortlist per format family, the ladder within a family, promotion and its step down."""

from types import SimpleNamespace

from packager.selection import (candidate_key, format_family, ladder_probes, promotion_candidate, share_try_key,
                                shortlist_by_family, spread, stepped_down)
from search.importance import sort_model
from search.problem import Budgets, Problem
from search.space import SearchSpace, SpaceConfig
from subnet.arch import ATTN_LINEARS, MLP_LINEARS, arch_of
from subnet.spec import SubnetSpec
from subnet.supernet import Supernet
from tests.conftest import tiny_model
from tests.test_search import BLOCKS, fake_cost


def cand(ppl, attn, mlp, narrowed, ms=None):
    """A front point whose first ``narrowed`` blocks take ``attn``/``mlp`` formats, the rest q8_0."""
    spec = SubnetSpec.uniform(arch_of(tiny_model("llama", num_hidden_layers=6).config), fmt="q8_0")
    for ly in spec.layers[:narrowed]:
        ly.formats.update({n: attn for n in ATTN_LINEARS} | {n: mlp for n in MLP_LINEARS})
    return SimpleNamespace(ppl=ppl, decode_ms=ms if ms is not None else 10.0 - ppl / 10, x=[narrowed, int(ppl * 10)],
                           spec_obj=lambda: spec)  # fmt: skip


def test_a_share_try_is_named_by_the_spec_it_recovers():
    """A new winner narrowing as many blocks gets a new name: a stale checkpoint is not resumed into it."""
    a, b = cand(1.0, "q4_0", "q4_0", 3).spec_obj(), cand(1.0, "iq4_nl", "q4_0", 3).spec_obj()
    assert share_try_key(a, [0, 1, 2]) == share_try_key(SubnetSpec.from_json(a.to_json()), [0, 1, 2])
    assert share_try_key(a, [0, 1, 2]).startswith("narrow-3-") and share_try_key(a, [0, 1, 2]) != share_try_key(b, [0, 1, 2])


def test_spread_picks_evenly_from_most_to_least_accurate():
    front = [SimpleNamespace(ppl=float(v)) for v in (5, 1, 4, 2, 3)]
    assert [e.ppl for e in spread(front, 3)] == [1.0, 3.0, 5.0]
    assert [e.ppl for e in spread(front, 1)] == [1.0]
    assert len(spread(front, 9)) == 5 and spread(front, 0) == []


def test_promotion_takes_the_fastest_near_miss_faster_than_every_passing_candidate():
    def tried(ms, after, meets):
        return {"evaluation": {"decode_ms": ms}, "floor_ppl_after": after, "floor_ppl_limit": 30.0, "meets_floor": meets}

    fast_near, slow_near, far, passing = tried(8.0, 31.0, False), tried(9.0, 30.5, False), tried(7.0, 40.0, False), tried(8.5, 29.9, True)
    assert promotion_candidate([slow_near, fast_near, far], 0.05, None) is fast_near  # 40 is beyond the 5% margin
    assert promotion_candidate([slow_near, fast_near, passing], 0.05, 8.5) is fast_near
    assert promotion_candidate([slow_near, passing], 0.05, 8.5) is None  # slower than the passing one: no need
    assert promotion_candidate([passing], 0.05, None) is None


def test_shortlist_takes_the_most_accurate_of_each_format_family():
    """Three families (q8_0/q4_0, iq4_nl/q4_0, q4_0/q4_0 by narrowest format per role): one each, the
    most accurate member, whatever the share of narrowed blocks; with fewer families, the front fills in."""
    front = [cand(30.6, "q8_0", "q4_0", 3), cand(32.6, "q8_0", "q4_0", 4), cand(31.9, "iq4_nl", "q4_0", 3),
             cand(35.0, "iq4_nl", "q4_0", 4), cand(33.0, "q4_0", "q4_0", 3), cand(36.6, "q4_0", "q4_0", 4)]
    assert format_family(front[0].spec_obj()) == ("q8_0", "q4_0", "q8_0", "q8_0")
    assert format_family(front[2].spec_obj()) == format_family(front[3].spec_obj())
    assert [e.ppl for e in shortlist_by_family(front, 3)] == [30.6, 31.9, 33.0]
    assert [e.ppl for e in shortlist_by_family(front, 2)] == [30.6, 33.0]  # spread over the families
    assert [e.ppl for e in shortlist_by_family(front, 5)] == [30.6, 31.9, 32.6, 33.0, 36.6]
    assert shortlist_by_family(front, 0) == []


def outcome(e, meets):
    return {"evaluation": {"x": e.x, "decode_ms": e.decode_ms}, "meets_floor": meets}


def test_ladder_bisects_toward_the_fastest_member_of_each_family_that_met_the_floor():
    """One family of five rungs (iq4_nl, 1..5 blocks narrowed): from a passing first rung the middle of
    the rest is probed, then the middle of what is left on the side the outcome points to."""
    rungs = [cand(30.0 + i, "iq4_nl", "iq4_nl", i + 1) for i in range(5)]
    other = [cand(31.5, "q4_0", "q4_0", 1), cand(33.5, "q4_0", "q4_0", 2)]
    front = rungs + other
    assert ladder_probes(front, []) == []  # nothing tried yet
    first = [outcome(rungs[0], True), outcome(other[0], False)]  # the q4_0 family missed: no probe there
    assert ladder_probes(front, first) == [rungs[2]]
    assert ladder_probes(front, first + [outcome(rungs[2], True)]) == [rungs[3]]
    assert ladder_probes(front, first + [outcome(rungs[2], False)]) == [rungs[1]]
    # the fastest passing rung sits just below a miss (or is the last rung): the family is done
    assert ladder_probes(front, first + [outcome(rungs[2], True), outcome(rungs[3], False)]) == []
    assert ladder_probes(front, first + [outcome(rungs[4], True)]) == []
    assert candidate_key(rungs[0].x) == "1,300"


def test_a_step_down_widens_the_most_sensitive_blocks_within_the_budgets_and_the_speed_to_beat():
    """From every block narrowed, the next share that changes the sub-network (0.9 of 4 blocks rounds to
    all 4: skipped) puts the most rounding-sensitive block (1) back at q8_0; not where that breaks a
    budget, is no faster than the fastest passing candidate, or no share is left."""
    model = tiny_model("llama")
    imp = sort_model(model, BLOCKS)
    cfg = SpaceConfig(attn_formats=["q8_0", "q4_0"], mlp_formats=["q8_0", "q4_0"], format_shares=[1.0, 0.9, 0.75])
    space = SearchSpace(arch_of(model.config), "llama.cpp", cfg, imp.layer_rank, [2, 0, 3, 1])
    problem = Problem(space, Supernet(model), BLOCKS[:4], BLOCKS[4:], fake_cost)
    e = problem.evaluate(space.largest(fmt_index=1))
    down = stepped_down(problem, e, None)
    assert down.x[-1] == 2 and down.decode_ms > e.decode_ms
    assert {ly.index for ly in down.spec_obj().layers if ly.formats["q_proj"] == "q8_0"} == {1}
    assert stepped_down(problem, down, None) is None  # no lower share
    assert stepped_down(problem, e, down.decode_ms) is None  # no faster than a candidate that met the floor
    problem.budgets = Budgets(size_mb=e.size_mb)
    assert stepped_down(problem, e, None) is None  # over the size budget
