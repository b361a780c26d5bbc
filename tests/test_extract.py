"""Extraction of uniform and heterogeneous sub-networks from tiny Llama / Qwen2 models."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import subnet  # noqa: F401  (registers heterogeneous classes)
from subnet.arch import arch_of
from subnet.extract import extract
from subnet.spec import SubnetSpec
from tests.conftest import tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 120, 33, 8]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def hetero_spec(arch):
    spec = SubnetSpec.uniform(arch, layers=[0, 2, 3])
    spec.layers[0].heads, spec.layers[0].kv_heads = 2, 1  # one KV group with both its query heads
    spec.layers[1].mlp = 40
    spec.layers[1].mlp_channels = list(range(95, 55, -1))  # arbitrary order: index lists, not prefixes
    spec.layers[2].kv_groups = [1]
    spec.layers[2].kv_heads, spec.layers[2].heads = 1, 1
    spec.layers[2].group_heads = [1]
    return spec.validate()


def test_full_spec_reproduces_base_exactly(family):
    base = tiny_model(family)
    sub = extract(base, SubnetSpec.full(arch_of(base.config)))
    assert torch.equal(logits(sub), logits(base))


@pytest.mark.parametrize("kind", ["uniform", "hetero"])
def test_pruned_spec_saves_and_reloads(family, kind, tmp_path):
    base = tiny_model(family)
    arch = arch_of(base.config)
    if kind == "uniform":
        spec = SubnetSpec.uniform(arch, layers=[0, 3], heads=2, kv_heads=1, mlp=48, hidden_size=48)
    else:
        spec = hetero_spec(arch)
    sub = extract(base, spec)
    assert sub.num_parameters() == spec.num_params()
    sub.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back) is type(sub)
    assert torch.equal(logits(back), logits(sub))
    assert back.config.subnet_spec == spec.to_dict()
    out = back.generate(IDS[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    no_cache = back.generate(IDS[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(out, no_cache)  # the KV cache is right for per-layer KV head counts


def test_hetero_layer_shapes(family):
    base = tiny_model(family)
    sub = extract(base, hetero_spec(arch_of(base.config)))
    att0 = sub.model.layers[0].self_attn
    assert att0.q_proj.out_features == 2 * 16 and att0.k_proj.out_features == 16
    assert sub.model.layers[1].mlp.gate_proj.out_features == 40
    assert sub.model.layers[2].mlp.gate_proj.out_features == 96


def test_index_lists_pick_the_named_units():
    """A layer kept with a reordered KV group and MLP channels computes what the base units compute."""
    base = tiny_model("llama")
    arch = arch_of(base.config)
    spec = hetero_spec(arch)
    sub = extract(base, spec)
    b_mlp = base.model.layers[2].mlp
    s_mlp = sub.model.layers[1].mlp
    idx = spec.layers[1].mlp_channels
    assert torch.equal(s_mlp.gate_proj.weight, b_mlp.gate_proj.weight[idx])
    assert torch.equal(s_mlp.down_proj.weight, b_mlp.down_proj.weight[:, idx])
    # layer 3 kept KV group 1, query head 1 inside it = base query head 3
    b_att, s_att = base.model.layers[3].self_attn, sub.model.layers[2].self_attn
    assert torch.equal(s_att.q_proj.weight, b_att.q_proj.weight[3 * 16:4 * 16])
    assert torch.equal(s_att.k_proj.weight, b_att.k_proj.weight[16:32])
