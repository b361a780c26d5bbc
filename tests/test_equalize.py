"""Activation-aware channel equalization: the float model is unchanged, the rounding error drops."""

import pytest
import torch

from subnet.arch import arch_of
from subnet.equalize import GROUPS, _group_inputs, equalize_channels, layer_groups, rounding_error
from tests.conftest import tiny_model

BLOCKS = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def salient_model(family):
    """A tiny model whose first layer has one loud hidden channel into q/k/v and one into o (per KV head)."""
    model = tiny_model(family)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.input_layernorm.weight[3] *= 30
        layer.self_attn.v_proj.weight[5] *= 30
    return model


@torch.no_grad()
def group_errors(model, fmt):
    arch = arch_of(model.config)
    inputs = _group_inputs(model, BLOCKS, 1)
    return {(i, g.name): rounding_error(inputs[(i, g.name)], [lin.weight for lin in g.linears],
                                        torch.ones(inputs[(i, g.name)].shape[1]), fmt)
            for i, layer in enumerate(model.model.layers) for g in layer_groups(layer, arch)}  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_equalization_keeps_the_function_and_cuts_the_rounding_error_it_reports(family):
    model = salient_model(family)
    with torch.no_grad():
        ref = model(BLOCKS).logits
    before = group_errors(model, "q4_0")
    rows = equalize_channels(model, BLOCKS, ["q4_0"], sample_every=1)
    with torch.no_grad():
        assert torch.allclose(model(BLOCKS).logits, ref, atol=1e-4, rtol=1e-4)
    assert [(r["layer"], r["group"]) for r in rows] == [(i, g) for i in range(4) for g in GROUPS]
    after = group_errors(model, "q4_0")
    for r in rows:
        key = (r["layer"], r["group"])
        assert r["error_ratio"] <= 1.0
        if r["group"] in ("o", "down"):  # no later step rescales these linears' rows: the rows report what
            # the model now does (q/k/v and gate/up were weighed after v's and up's rows were rescaled)
            assert after[key] == pytest.approx(r["error_ratio"] * before[key], rel=1e-3)
    loud = {r["group"]: r for r in rows if r["layer"] == 0}
    assert loud["qkv"]["alpha"] > 0 and after[(0, "qkv")] < 0.9 * before[(0, "qkv")]
    assert loud["o"]["alpha"] > 0 and loud["o"]["error_ratio"] < 0.9


def test_nothing_to_equalize_without_a_narrow_format():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert equalize_channels(model, BLOCKS, []) == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
