"""GGUF export and the llama.cpp backend: parity with torch, formats, fallbacks, tokenizer, safe writes."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from conftest import tiny_model
from subnet.arch import MLP_LINEARS, arch_of
from subnet.extract import extract
from subnet.spec import SubnetSpec
from targets import llamacpp
from targets.backend import Workload
from targets.gguf_export import GGUFExportError, write_gguf

TEXT = "The capital of France is Paris. The quick brown fox jumps over the lazy dog, 42 times."


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE (GPT-2 style) tokenizer trained here, with bos/eos/unk specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT, "Paris is a city in France on the river Seine."] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>", pad_token="</s>"
    )


def hetero_spec(arch):
    """Per-layer heads, KV heads and MLP widths differ (written as `deci`)."""
    spec = SubnetSpec.uniform(arch)
    spec.layers[1].heads, spec.layers[1].kv_heads = 2, 1
    spec.layers[2].mlp = 40
    spec.layers[3].heads = 2
    return spec


def ids_of(tokenizer):
    return tokenizer.encode(TEXT)


def gguf_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("hetero", [False, True], ids=["uniform", "hetero"])
def test_f32_parity(tmp_path, tokenizer, family, hetero):
    model = tiny_model(family, vocab_size=len(tokenizer))
    arch = arch_of(model.config)
    spec = hetero_spec(arch) if hetero else SubnetSpec.full(arch)
    sub = extract(model, spec)
    art = llamacpp.export(sub, tokenizer, spec, tmp_path / "m.gguf", parity_tokens=ids_of(tokenizer))
    expected_arch = "deci" if hetero else ("qwen2" if family == "qwen2" else "llama")
    assert art.meta["arch"] == expected_arch
    p = art.meta["parity"]
    assert p["format_class"] == "f32" and p["n_tokens"] == len(ids_of(tokenizer))
    assert p["max_abs_diff"] <= 1e-3 and p["top1_agreement"] == 1.0 and p["within_bounds"]
    runner = llamacpp.load(art, n_ctx=64)
    try:
        ids = ids_of(tokenizer)[:8]
        want = sub.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert runner.generate(ids, 6) == want[0, len(ids) :].tolist()
    finally:
        runner.close()


def test_tokenizer_carried(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    spec = SubnetSpec.full(arch_of(model.config))
    sub = extract(model, spec)
    sub.config.name_or_path = "/models/org/Tiny-Llama"  # the folder it was loaded from
    art = write_gguf(sub, tokenizer, spec, tmp_path / "m.gguf")
    fields = gguf.GGUFReader(art.path).fields
    assert fields["general.name"].contents() == "Tiny-Llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.tokens"].contents() == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.token_type"].contents()[:3] == [3, 3, 3]  # the specials are CONTROL
    assert json.loads(fields["packager.spec"].contents()) == spec.to_dict()
    runner = llamacpp.load(art, n_ctx=64)
    try:
        for text in (TEXT, "  Seine,river\nParis!"):
            assert runner.llm.tokenize(text.encode(), add_bos=False) == tokenizer.encode(text)
        assert runner.llm.detokenize(tokenizer.encode(TEXT)).decode() == TEXT
    finally:
        runner.close()


def test_mixed_formats_parity(tmp_path, tokenizer):
    """q8_0 attention, q4_0 MLP, q8_0 embedding: written as asked; parity within the quantized bound."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    spec = SubnetSpec.full(arch_of(model.config), fmt="q8_0")
    for ly in spec.layers:
        ly.formats.update({n: "q4_0" for n in MLP_LINEARS})
    sub = extract(model, spec)
    art = llamacpp.export(sub, tokenizer, spec, tmp_path / "m.gguf", parity_tokens=ids_of(tokenizer))
    types = gguf_types(art.path)
    assert types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert all(types[f"blk.{i}.attn_{n}.weight"] == "Q8_0" for i in range(4) for n in ("q", "k", "v", "output"))
    assert all(types[f"blk.{i}.ffn_{n}.weight"] == "Q4_0" for i in range(4) for n in ("gate", "up", "down"))
    assert art.meta["file_type"] in ("MOSTLY_Q8_0", "MOSTLY_Q4_0") and art.meta["fallbacks"] == []
    p = art.meta["parity"]
    assert p["format_class"] == "quantized" and p["within_bounds"], p
    # the simulated quantization is what llama.cpp runs: far closer than the unquantized model
    with torch.no_grad():
        plain = sub(torch.tensor([ids_of(tokenizer)])).logits[0].numpy()
    runner = llamacpp.load(art, n_ctx=64)
    try:
        assert p["max_abs_diff"] < np.abs(runner.logits(ids_of(tokenizer)) - plain).max()
    finally:
        runner.close()


def test_iq4_nl_written_at_kept_block_scales(tmp_path, tokenizer):
    """Scales kept from the weights before a (simulated) recovery step: every iq4_nl tensor is written at
    them, q/k rows moved with their scales by the rope permutation, and llama.cpp runs what torch
    simulates at those scales."""
    from subnet.quant import TrainingRounder, fake_quantize_model, ggml_dequantize
    from targets.gguf_export import GGUF_LINEAR, HF_MODULE, _rope_permute

    model = tiny_model("llama", vocab_size=len(tokenizer))
    spec = SubnetSpec.uniform(arch_of(model.config), fmt="iq4_nl", embed_format="q8_0")
    sub = extract(model, spec)
    names = [n for n, m in sub.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    scales = {n: TrainingRounder(sub.get_submodule(n).weight, "iq4_nl").scales for n in names}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what recovery does to the weights: a small move away from where the scales were found
        for n in names:
            w = sub.get_submodule(n).weight
            w.add_(0.05 * w.std() * torch.randn(w.shape, generator=gen))
    art = llamacpp.export(sub, tokenizer, spec, tmp_path / "m.gguf", parity_tokens=ids_of(tokenizer), block_scales=scales)
    assert art.meta["kept_scales"] == len(names) == 28
    sim = fake_quantize_model(sub, spec, activations=False, block_scales=scales)
    tensors = {t.name: t for t in gguf.GGUFReader(art.path).tensors}
    for layer, name, heads in ((2, "k_proj", 2), (1, "down_proj", None)):
        want = sim.get_submodule(f"model.layers.{layer}.{HF_MODULE[name]}.{name}").weight.detach().numpy()
        want = _rope_permute(want, heads) if heads else want
        t = tensors[f"blk.{layer}.{GGUF_LINEAR[name]}.weight"]
        assert t.tensor_type.name == "IQ4_NL"
        assert np.array_equal(ggml_dequantize(np.asarray(t.data), "iq4_nl", want.shape), want)
    assert art.meta["parity"]["within_bounds"], art.meta["parity"]
    again = write_gguf(sub, tokenizer, spec, tmp_path / "searched.gguf")  # no kept scales: ggml searches them
    assert again.meta["kept_scales"] == 0
    assert gguf_types(again.path) == gguf_types(art.path)
    assert (tmp_path / "searched.gguf").read_bytes() != (tmp_path / "m.gguf").read_bytes()


def test_kquant_fallback_recorded(tmp_path, tokenizer):
    """q4_k everywhere on hidden 256: 256-long rows keep Q4_K, the 64/96-long ones fall back to Q5_0."""
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=256)
    arch = arch_of(model.config)
    sub = extract(model, SubnetSpec.full(arch))
    spec = SubnetSpec.full(arch, fmt="q4_k")  # o_proj (64) and down_proj (96) rows cannot hold Q4_K
    art = llamacpp.export(sub, tokenizer, spec, tmp_path / "m.gguf", parity_tokens=ids_of(tokenizer))
    fell = {(f["tensor"], f["requested"], f["written"]) for f in art.meta["fallbacks"]}
    want = {(f"blk.{i}.{n}.weight", "q4_k", "q5_0") for i in range(4) for n in ("attn_output", "ffn_down")}
    assert fell == want
    types = gguf_types(art.path)
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q5_0"
    stored = json.loads(gguf.GGUFReader(art.path).fields["packager.fallbacks"].contents())
    assert stored == art.meta["fallbacks"]
    assert art.meta["parity"]["within_bounds"], art.meta["parity"]


def test_existing_output_refused(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    spec = SubnetSpec.full(arch_of(model.config))
    sub = extract(model, spec)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(GGUFExportError, match="already exists"):
        write_gguf(sub, tokenizer, spec, out)
    assert out.read_bytes() == b"keep me"
    write_gguf(sub, tokenizer, spec, out, force=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


def test_no_partial_file_after_failure(tmp_path, tokenizer, monkeypatch):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    spec = SubnetSpec.full(arch_of(model.config))
    sub = extract(model, spec)

    def boom(self, *a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="simulated"):
        write_gguf(sub, tokenizer, spec, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_fail_clearly(tmp_path, tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama", vocab_size=len(tokenizer))
    arch = arch_of(model.config)
    spec = SubnetSpec.full(arch)
    sub = extract(model, spec)
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(GGUFExportError, match="not a byte-level BPE"):
        write_gguf(sub, PreTrainedTokenizerFast(tokenizer_object=wp), spec, tmp_path / "a.gguf")
    with pytest.raises(GGUFExportError, match="not the spec's sub-network"):
        write_gguf(sub, tokenizer, SubnetSpec.uniform(arch, layers=[0, 1]), tmp_path / "b.gguf")
    with pytest.raises(GGUFExportError, match="int8 is not a format llama.cpp stores"):
        write_gguf(sub, tokenizer, SubnetSpec.full(arch, fmt="int8"), tmp_path / "c.gguf")
    narrow = hetero_spec(arch)  # layer 2 MLP is 40 wide: ffn_down rows of 40 cannot hold q8_0 (blocks of 32)
    for ly in narrow.layers:
        ly.formats["down_proj"] = "q8_0"
    with pytest.raises(GGUFExportError, match=r"blk\.2\.ffn_down\.weight: .*cannot hold rows of length 40"):
        write_gguf(extract(model, hetero_spec(arch)), tokenizer, narrow, tmp_path / "d.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_measure_in_subprocess(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    spec = SubnetSpec.full(arch_of(model.config), fmt="q8_0")
    art = write_gguf(extract(model, spec), tokenizer, spec, tmp_path / "m.gguf")
    m = llamacpp.measure(art, Workload(prompt_tokens=16, gen_tokens=4), threads=1, repeats=2)
    assert m.runtime == "llama.cpp" and m.repeats == 2
    assert m.prefill_ms > 0 and m.decode_ms_per_token > 0 and m.peak_rss_mb > 0
    assert m.fingerprint["runtime_version"] == llamacpp.version() and m.fingerprint["threads"] == 1
    assert m.settings == llamacpp.DEPLOYMENT == {"use_mmap": False, "kv_cache": "f16"}  # read, not mapped
    with pytest.raises(llamacpp.LlamaCppError, match="batch"):
        llamacpp.measure(art, Workload(16, 4, batch=2), threads=1)


# ---- integration: the embedded SmolLM2 --------------------------------------------------------
PROMPT = "The capital of France is"


def smollm2_specs(arch):
    uniform = SubnetSpec.uniform(arch, layers=[i for i in range(arch.num_layers) if i not in (20, 25)], fmt="q8_0")
    hetero = SubnetSpec.uniform(arch, fmt="q8_0")
    for i in (5, 12, 19):  # one KV group (3 query heads) fewer in a few layers, narrower MLP in others
        hetero.layers[i].heads, hetero.layers[i].kv_heads = 6, 2
    for i in (8, 16):
        hetero.layers[i].mlp = 1280
    return {"uniform": uniform, "hetero": hetero}


@pytest.mark.integration
def test_smollm2_tokenizer_matches_original_gguf(tmp_path, smollm2):
    from subnet.loading import embedded_gguf_path

    spec = SubnetSpec.uniform(smollm2.arch, layers=[0], fmt="q8_0")
    art = write_gguf(extract(smollm2.model, spec), smollm2.tokenizer, spec, tmp_path / "m.gguf")
    ours, orig = gguf.GGUFReader(art.path).fields, gguf.GGUFReader(embedded_gguf_path()).fields
    keys = [k for k in orig if k.startswith("tokenizer.")]
    assert len(keys) >= 12
    for k in keys:
        assert ours[k].contents() == orig[k].contents(), k


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["uniform", "hetero"])
def test_smollm2_q8_0_generates(tmp_path, smollm2, kind):
    from subnet.quant import fake_quantize_model

    spec = smollm2_specs(smollm2.arch)[kind]
    sub = extract(smollm2.model, spec)
    tok = smollm2.tokenizer
    art = llamacpp.export(sub, tok, spec, tmp_path / "m.gguf")
    assert art.meta["arch"] == ("llama" if kind == "uniform" else "deci")
    assert art.meta["parity"]["within_bounds"], art.meta["parity"]
    ids = tok.encode(PROMPT)
    runner = llamacpp.load(art, n_ctx=64)
    try:
        got = runner.generate(ids, 12)
    finally:
        runner.close()
    ref = fake_quantize_model(sub, spec).generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    ref = ref[0, len(ids) :].tolist()
    assert got[:6] == ref[:6], (tok.decode(got), tok.decode(ref))
    text = tok.decode(got)
    assert sum(c.isalpha() for c in text) >= 10 and text.isascii(), text
