"""GPTQ rounding of kept-scale-format linears (subnet.gptq) on random weights and a tiny Llama."""

import copy

import pytest
import torch

from subnet.arch import LINEARS, arch_of
from subnet.extract import extract
from subnet.gptq import gptq_round, gptq_weight, swap_compensation
from subnet.quant import block_scales, fake_quantize, fake_quantize_model, round_to_scales
from subnet.spec import SubnetSpec
from tests.conftest import tiny_model


def correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are correlated and unevenly scaled, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    return (torch.randn(n, 16, generator=g) @ torch.randn(16, cols, generator=g) + 0.3 * torch.randn(n, cols, generator=g)
            ) @ mix * torch.linspace(0.2, 3.0, cols)  # fmt: skip


@pytest.mark.parametrize("fmt", ["iq4_nl", "q4_0", "int4s_b32"])
def test_gptq_weight_sits_on_its_scales_and_cuts_the_output_error(fmt):
    torch.manual_seed(0)
    w = torch.randn(48, 160)
    x = correlated_inputs(4000, 160)
    comp, s = gptq_weight(w, x.T @ x, fmt)
    assert s.shape == (48, 5) and comp.dtype == w.dtype
    assert not torch.equal(comp, w)  # every column but the first carries the earlier ones' error
    assert torch.equal(comp[:, 0], w[:, 0])
    q = round_to_scales(comp, s, fmt)  # GPTQ's rounding: what the exporter writes at those scales
    assert not torch.equal(comp, q)  # kept float, off the grid, for training to move
    rtn = round_to_scales(w, block_scales(w, fmt), fmt)
    assert torch.equal(rtn, fake_quantize(w, fmt))

    def err(a):
        return float(((x @ (a - w).T) ** 2).mean())

    assert err(q) < 0.7 * err(rtn)


def test_gptq_weight_rejects_a_format_without_kept_scales():
    with pytest.raises(ValueError, match="keeps no block scales"):
        gptq_weight(torch.randn(4, 32), torch.eye(32), "q8_0")


def _spec(model):
    spec = SubnetSpec.uniform(arch_of(model.config), layers=[0, 1, 3], mlp=64, fmt="iq4_nl", embed_format="q8_0")
    for ly in spec.layers:  # a mixed spec: GPTQ leaves the absmax-format linears to round-to-nearest
        ly.formats["k_proj"] = "q8_0"
    return spec


def test_gptq_round_brings_the_quantized_model_closer_to_the_float_one():
    model = tiny_model("llama", vocab_size=128)
    spec = _spec(model)
    torch.manual_seed(1)
    blocks = torch.randint(3, 128, (16, 48))
    rtn_model = fake_quantize_model(extract(model, spec), spec)
    sub = extract(model, spec)
    before = {n: p.clone() for n, p in sub.named_parameters()}
    kept = gptq_round(sub, spec, blocks, micro_batch=5, progress=False)

    iq4 = {f"model.layers.{i}.{'self_attn' if n in LINEARS[:4] else 'mlp'}.{n}"
           for i, ly in enumerate(spec.layers) for n in LINEARS if ly.formats[n] == "iq4_nl"}  # fmt: skip
    assert set(kept) == iq4
    for n, p in sub.named_parameters():  # only the iq4_nl linears changed; the rest is put back
        assert torch.equal(p, before[n]) == (n.removesuffix(".weight") not in iq4), n
    gptq_model = fake_quantize_model(sub, spec, block_scales=kept)
    with torch.no_grad():
        ref = extract(model, spec)(blocks).logits

        def err(m):
            return float(((m(blocks).logits - ref) ** 2).mean())

        assert err(gptq_model) < err(rtn_model)


def test_swap_compensation_keeps_what_training_changed():
    model = tiny_model("llama", vocab_size=128)
    spec = _spec(model)
    plain = extract(model, spec)
    compensated = extract(model, spec)
    gptq_round(compensated, spec, torch.randint(3, 128, (8, 32)), progress=False)
    trained = copy.deepcopy(compensated)
    g = torch.Generator().manual_seed(3)
    delta = {n: 1e-3 * torch.randn(p.shape, generator=g) for n, p in trained.named_parameters()}
    with torch.no_grad():
        for n, p in trained.named_parameters():
            p += delta[n]
    before = {n: p.clone() for n, p in trained.named_parameters()}
    swap_compensation(trained, compensated, plain, [(0, "q_proj"), (1, "down_proj")])  # taken out
    plain_w, comp_w = dict(plain.named_parameters()), dict(compensated.named_parameters())
    for n, p in trained.named_parameters():
        if n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            assert not torch.equal(plain_w[n], comp_w[n])
            torch.testing.assert_close(p, plain_w[n] + delta[n])
        else:
            assert torch.equal(p, before[n]), n


def test_gptq_round_leaves_a_spec_without_kept_scale_formats_alone():
    model = tiny_model("qwen2", vocab_size=128)
    spec = SubnetSpec.uniform(arch_of(model.config), layers=[0, 2], fmt="q5_0", embed_format="q8_0")
    sub = extract(model, spec)
    before = [p.clone() for p in sub.parameters()]
    assert gptq_round(sub, spec, torch.randint(3, 128, (4, 32)), progress=False) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, sub.parameters()))


def test_recovery_keeps_the_scales_gptq_rounded_at():
    from search.evaluate import perplexity
    from search.recovery import RecoveryConfig, recover
    from tests.test_recovery import FAST

    model = tiny_model("llama", vocab_size=128)
    spec = _spec(model)
    torch.manual_seed(2)
    calib, val = torch.randint(3, 128, (24, 64)), torch.randint(3, 128, (4, 64))
    sub = extract(model, spec)
    kept = gptq_round(sub, spec, calib, progress=False)
    res = recover(model, sub, spec, calib, val, RecoveryConfig(**FAST, max_steps=2, eval_every=2, qat=True),
                  progress=False, block_scales=kept)  # fmt: skip
    assert res.block_scales.keys() == kept.keys()
    assert all(torch.equal(res.block_scales[n], kept[n]) for n in kept)
    # training starts from GPTQ's rounding, not from a fresh scale search on the GPTQ'd weights
    scored = perplexity(fake_quantize_model(sub, spec, block_scales=kept), val, batch_size=8)
    assert res.ppl_before == pytest.approx(scored, rel=1e-5)
    bad = {n: s[:, :1] for n, s in kept.items()}
    with pytest.raises(ValueError, match="do not fit"):
        recover(model, sub, spec, calib, val, RecoveryConfig(**FAST, max_steps=1, qat=True), progress=False,
                block_scales=bad)  # fmt: skip

