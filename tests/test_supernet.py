"""The supernet view computes exactly what the extracted sub-network computes, without copying weights."""

import os
import subprocess
import sys

import pytest
import torch

from subnet.arch import arch_of
from subnet.extract import extract
from subnet.spec import SubnetSpec
from subnet.supernet import Supernet
from tests.conftest import tiny_model
from tests.test_extract import IDS, hetero_spec


def specs(arch):
    yield SubnetSpec.full(arch)
    yield SubnetSpec.uniform(arch, layers=[0, 3], heads=2, kv_heads=1, mlp=48, hidden_size=48)
    yield hetero_spec(arch)
    s = SubnetSpec.uniform(arch, layers=[1, 2, 3], heads=2, kv_heads=2)
    s.hidden_channels = list(range(63, 15, -1))
    s.hidden_size = 48
    yield s.validate()


def test_supernet_matches_extracted(family):
    base = tiny_model(family)
    net = Supernet(base)
    for spec in specs(arch_of(base.config)):
        with torch.no_grad():
            want = extract(base, spec)(IDS).logits
        got = net.activate(spec).logits(IDS)
        assert (got - want).abs().max() <= 1e-4, spec.to_dict()


@pytest.mark.parametrize("fmt", ["f32", "q8_0", "q4_0"])
def test_nll_matches_cross_entropy(fmt):
    """The vocab-chunked NLL (rounded head rows streamed) equals cross-entropy of the full logits."""
    base = tiny_model("llama")
    net = Supernet(base).activate(SubnetSpec.full(arch_of(base.config), fmt=fmt))
    blocks = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    total, count = net.nll(blocks, vocab_chunk=50)
    lg = net.logits(blocks)[:, :-1]  # the whole rounded head and embedding at once
    want = torch.nn.functional.cross_entropy(lg.reshape(-1, 128), blocks[:, 1:].reshape(-1), reduction="sum")
    assert count == 33 and total == pytest.approx(float(want), rel=1e-5)
    if fmt == "f32":
        with torch.no_grad():
            assert torch.allclose(lg, base(blocks).logits[:, :-1], atol=1e-4)


def test_supernet_iq4_nl_matches_extracted_and_searches_scales_once():
    """iq4_nl (a per-block scale search) through the supernet: prefix slices round with the whole
    weight's cached scales, gathered columns round on their own; both equal the extracted model rounded."""
    from subnet.quant import fake_quantize_model

    base = tiny_model("llama")
    arch = arch_of(base.config)
    prefix = SubnetSpec.uniform(arch, layers=[0, 2, 3], heads=2, kv_heads=1, mlp=64, fmt="iq4_nl")
    gathered = SubnetSpec.uniform(arch, layers=[1, 3], mlp=64, hidden_size=32, fmt="iq4_nl")
    gathered.layers[0].mlp_channels = list(range(95, 31, -1))  # not a prefix: down_proj's columns gathered
    gathered.hidden_channels = list(range(63, 31, -1))
    net = Supernet(base)
    for spec in (prefix, gathered.validate()):
        sub = extract(base, spec)
        with torch.no_grad():
            want = fake_quantize_model(sub, spec)(IDS).logits
        assert (net.activate(spec).logits(IDS) - want).abs().max() <= 1e-4
    cached = dict(net._scales)
    assert cached  # scales of whole base weights, one entry per (weight, format)
    net.prepare(["q8_0", "iq4_nl"])  # every weight's scales now, once: 4 layers x 7 linears + the tied embedding
    assert len(net._scales) == 4 * 7 + 1 and all(net._scales[k][1] is v[1] for k, v in cached.items())
    cached = dict(net._scales)
    net.activate(prefix).logits(IDS)
    assert all(net._scales[k][1] is v[1] for k, v in cached.items())  # reused, not searched again
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight.mul_(2)  # an in-place change invalidates that weight's scales
    sub = extract(base, prefix)
    with torch.no_grad():
        want = fake_quantize_model(sub, prefix)(IDS).logits
    assert (net.activate(prefix).logits(IDS) - want).abs().max() <= 1e-4


def test_switching_specs_moves_no_weights():
    base = tiny_model("llama")
    ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}
    before = {n: p.clone() for n, p in base.named_parameters()}
    net = Supernet(base)
    for spec in specs(arch_of(base.config)):
        net.activate(spec).logits(IDS)
    for n, p in base.named_parameters():
        assert p.data_ptr() == ptrs[n] and torch.equal(p, before[n])


def test_spec_outside_the_supernet_is_refused():
    from subnet.spec import SpecError

    net = Supernet(tiny_model("llama"))
    spec = SubnetSpec.full(net.arch)
    spec.layers[0].mlp = 500
    with pytest.raises(SpecError, match="MLP width 500"):
        net.activate(spec)


@pytest.mark.parametrize("user_value", [None, "0"])
def test_importing_subnet_first_keeps_mkl_from_caching_buffers(user_value):
    """``import subnet`` sets MKL_DISABLE_FAST_MM before torch loads, unless the user chose a value."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
    if user_value is not None:
        env["MKL_DISABLE_FAST_MM"] = user_value
    code = "import subnet, os, sys; print(os.environ['MKL_DISABLE_FAST_MM'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [user_value or "1", "True"]
