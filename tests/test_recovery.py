"""Recovery fine-tuning (LoRA + KD) and sandwich-rule supernet tuning on tiny random models."""

import shutil
import time
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from search.recovery import RecoveryConfig, RecoveryError, kd_loss, recover
from search.supernet_tuning import (
    SupernetTuningConfig,
    SupernetTuningError,
    load_supernet_adapter,
    tune_supernet,
)
from subnet.arch import arch_of
from subnet.extract import extract
from subnet.spec import SubnetSpec
from tests.conftest import tiny_model
from tests.test_extract import hetero_spec

FAST = {"seq_len": 32, "batch_size": 4, "rank": 4, "alpha": 8, "warmup_steps": 2, "min_calib_windows": 4, "eval_batch_size": 8}


@pytest.fixture(scope="module")
def teacher_and_text():
    """A tiny llama with sharper next-token distributions and text sampled from it (learnable, unlike
    uniform random ids): 40 calibration blocks and 8 validation blocks of 64 tokens."""
    base = tiny_model("llama", vocab_size=128)
    with torch.no_grad():
        base.model.embed_tokens.weight.mul_(3)
    torch.manual_seed(0)
    ids = base.generate(
        torch.randint(3, 128, (48, 1)), do_sample=True, top_k=0, max_new_tokens=63, min_new_tokens=63, pad_token_id=0
    )
    return base, ids[:40], ids[40:]


def pruned(base):
    return SubnetSpec.uniform(arch_of(base.config), layers=[0, 3], heads=2, kv_heads=1, mlp=32)


def kd_to_teacher(base, model, blocks):
    with torch.no_grad():
        return float(kd_loss(model(blocks).logits, base(blocks).logits))


def test_recovery_lowers_kd_and_perplexity(teacher_and_text, tmp_path):
    base, calib, val = teacher_and_text
    spec = pruned(base)
    sub = extract(base, spec)
    before = [p.clone() for p in sub.parameters()]
    res = recover(base, sub, spec, calib, val, RecoveryConfig(**FAST, lr=1e-2, max_steps=30, eval_every=10), progress=False)
    assert res.ppl_after < res.ppl_before
    assert kd_to_teacher(base, res.model, val) < 0.8 * kd_to_teacher(base, sub, val)
    assert res.stopped_reason in ("converged", "early stop", "max steps")
    assert 0 < res.best_step <= res.steps_run <= 30
    assert res.history[0]["step"] == 0 and res.wall_s > 0
    assert all(torch.equal(a, b) for a, b in zip(before, sub.parameters()))  # the caller's model is untouched


@pytest.mark.parametrize("kind", ["uniform", "hetero"])
def test_merged_model_is_plain_and_reloads(teacher_and_text, tmp_path, kind):
    base, calib, val = teacher_and_text
    spec = pruned(base) if kind == "uniform" else hetero_spec(arch_of(base.config))
    sub = extract(base, spec)
    res = recover(base, sub, spec, calib, val, RecoveryConfig(**FAST, lr=1e-2, max_steps=6, eval_every=3), progress=False)
    m = res.model
    assert type(m) is type(sub)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in sub.state_dict().items()}
    linears = [mod for mod in m.modules() if "Linear" in type(mod).__name__]
    assert linears and all(type(mod) is torch.nn.Linear for mod in linears)
    assert res.best_step > 0
    assert not torch.equal(m.model.layers[0].self_attn.q_proj.weight, sub.model.layers[0].self_attn.q_proj.weight)
    m.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.allclose(back(val).logits, m(val).logits, atol=1e-5)


def test_resume_gives_the_same_weights(teacher_and_text, tmp_path):
    base, calib, val = teacher_and_text
    spec = pruned(base)
    sub = extract(base, spec)
    cfg = RecoveryConfig(**FAST, lr=5e-3, max_steps=8, eval_every=4, checkpoint_every=4, patience=10, dropout=0.1)
    full = recover(base, sub, spec, calib, val, cfg, out_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-8"]
    shutil.rmtree(tmp_path / "checkpoint-8")  # as if the run had been killed after step 4..7
    t0 = time.perf_counter()
    noted = replace(spec, meta={"selected": "by another stage"})  # how a spec was chosen does not change the run
    resumed = recover(base, sub, noted, calib, val, cfg, out_dir=tmp_path, resume=True, progress=False)
    assert resumed.wall_s > time.perf_counter() - t0  # steps 1..4, run before the interruption, count too
    assert resumed.steps_run == full.steps_run == 8 and resumed.history == full.history
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    other = RecoveryConfig(**{**FAST, "lr": 1e-3}, max_steps=8, eval_every=4, checkpoint_every=4)
    with pytest.raises(RecoveryError, match="different run"):
        recover(base, sub, spec, calib, val, other, out_dir=tmp_path, resume=True, progress=False)


def test_full_spec_is_refused(teacher_and_text):
    base, calib, val = teacher_and_text
    spec = SubnetSpec.full(arch_of(base.config))
    with pytest.raises(RecoveryError, match="nothing to recover"):
        recover(base, extract(base, spec), spec, calib, val, RecoveryConfig(**FAST), progress=False)
    q = SubnetSpec.full(arch_of(base.config), fmt="q8_0")
    with pytest.raises(RecoveryError, match="qat=True"):
        recover(base, extract(base, q), q, calib, val, RecoveryConfig(**FAST), progress=False)


def test_too_little_calibration_text(teacher_and_text):
    base, calib, val = teacher_and_text
    spec = pruned(base)
    with pytest.raises(RecoveryError, match=r"too little calibration text: 64 tokens.*at least 4 \(128 tokens\)"):
        recover(base, extract(base, spec), spec, calib[:1], val, RecoveryConfig(**FAST), progress=False)


def test_divergence_stops_and_keeps_the_best(teacher_and_text, tmp_path):
    base, calib, val = teacher_and_text
    spec = pruned(base)
    sub = extract(base, spec)
    cfg = RecoveryConfig(**{**FAST, "warmup_steps": 1}, lr=1e3, max_steps=40, eval_every=2)
    res = recover(base, sub, spec, calib, val, cfg, progress=False)
    assert res.stopped_reason == "diverged"
    assert res.steps_run < 40
    assert res.ppl_after == pytest.approx(res.ppl_before, rel=1e-4)  # best = the untouched start
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


@pytest.mark.parametrize("fmt", ["q4_0", "iq4_nl"])
def test_qat_trains_against_the_quantized_forward(teacher_and_text, fmt):
    from search.evaluate import perplexity
    from subnet.quant import fake_quantize_model

    base, calib, val = teacher_and_text
    spec = SubnetSpec.uniform(arch_of(base.config), layers=[0, 1, 3], mlp=64, fmt=fmt, embed_format="q8_0")
    sub = extract(base, spec)
    res = recover(base, sub, spec, calib, val, RecoveryConfig(**FAST, lr=1e-2, max_steps=12, eval_every=6, qat=True),
                  progress=False)  # fmt: skip
    plain = recover(base, sub, spec, calib, val, RecoveryConfig(**FAST, lr=1e-2, max_steps=2, eval_every=2),
                    progress=False)  # fmt: skip
    assert res.ppl_before != pytest.approx(plain.ppl_before)  # qat measures the quantized sub-network
    # ... exactly as the simulation rounds it (the training rounder starts at ggml's own scales)
    assert res.ppl_before == pytest.approx(perplexity(fake_quantize_model(sub, spec), val, batch_size=8), rel=1e-5)
    assert res.ppl_after < res.ppl_before
    assert all(type(m) is torch.nn.Linear for m in res.model.modules() if "Linear" in type(m).__name__)
    # the merged weights are float (not rounded): the exporter applies the format
    w = res.model.model.layers[0].mlp.up_proj.weight
    from subnet.quant import fake_quantize

    assert not torch.equal(w, fake_quantize(w, fmt))
    # the scales training rounded at come back, one per linear; the final score is taken at them,
    # so it is the held-out perplexity training saw at its best step
    assert sorted(res.block_scales) == sorted(
        n for n, m in res.model.named_modules() if type(m) is torch.nn.Linear and n.startswith("model.layers."))
    best = min(h["val_ppl"] for h in res.history if "val_ppl" in h)
    assert res.ppl_after == pytest.approx(best, rel=1e-4)


def test_supernet_tuning_saves_and_merges(teacher_and_text, tmp_path):
    from peft import PeftModel

    base, calib, _ = teacher_and_text
    model = tiny_model("llama", vocab_size=128)
    model.load_state_dict(base.state_dict())
    arch = arch_of(model.config)
    specs = [pruned(model), SubnetSpec.uniform(arch, layers=[0, 1, 3], mlp=64), hetero_spec(arch)]
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SupernetTuningConfig(rank=4, alpha=8, lr=1e-3, steps=4, batch_size=2, seq_len=32)
    path = tune_supernet(model, specs, calib, cfg, out_dir=tmp_path / "adapter", progress=False)
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    for k, v in model.state_dict().items():  # the base is left as it was (parametrizations removed)
        assert torch.equal(v, orig[k]), k
    assert all(type(m.self_attn.q_proj) is torch.nn.Linear for m in model.model.layers)
    # peft reads the saved adapter too, and merges it to the same weights
    via_peft = PeftModel.from_pretrained(tiny_model("llama", vocab_size=128), path).merge_and_unload()
    load_supernet_adapter(model, path)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.3.self_attn.o_proj.weight"):
        assert not torch.equal(model.state_dict()[name], orig[name])  # gradients reached every linear via the view
    # (tiny_model(seed=0) re-creates the same base weights, so the merges must agree)
    peft_state = via_peft.state_dict()
    for k, v in model.state_dict().items():
        if "_proj" in k:
            assert torch.allclose(v, peft_state[k], atol=1e-6), k
    with pytest.raises(SupernetTuningError, match="different base"):
        load_supernet_adapter(tiny_model("llama", seed=1, vocab_size=128), path)


def test_supernet_tuning_with_a_search_space(teacher_and_text, tmp_path):
    from search.space import SearchSpace, SpaceConfig

    base, calib, _ = teacher_and_text
    arch = arch_of(base.config)
    space = SearchSpace(arch, "onnxruntime", SpaceConfig(depth=[4, 3], attn_formats=["f32"], mlp_formats=["f32"]),
                        layer_rank=[0, 3, 1, 2])  # fmt: skip
    cfg = SupernetTuningConfig(rank=2, alpha=4, steps=2, batch_size=2, seq_len=32)
    path = tune_supernet(base, space, calib, cfg, out_dir=tmp_path / "a", progress=False)
    assert (path / "tuning.json").is_file()


def test_patience_grows_with_long_runs(teacher_and_text):
    assert RecoveryConfig(max_steps=120, eval_every=20).evaluations_patience == 2  # the pack's runs: unchanged
    assert RecoveryConfig(max_steps=600, eval_every=20).evaluations_patience == 8
    assert RecoveryConfig(max_steps=600, eval_every=20, patience_share=0).evaluations_patience == 2
    with pytest.raises(RecoveryError, match="patience_share"):
        RecoveryConfig(patience_share=1.5).check()
    base, calib, val = teacher_and_text  # a run that cannot progress lasts at least that many evaluations
    spec = pruned(base)
    sub = extract(base, spec)
    runs = {share: recover(base, sub, spec, calib, val, RecoveryConfig(**FAST, lr=1e-9, max_steps=40, eval_every=2,
                                                                        patience_share=share), progress=False)
            for share in (0.0, 0.25)}  # fmt: skip
    assert runs[0.0].steps_run < 2 * 5 <= runs[0.25].steps_run  # 20 evaluations: patience 2, then 5
