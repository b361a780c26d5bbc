"""Loading: safe defaults, clear one-line errors, the embedded SmolLM2."""

import pytest
import torch
from click.testing import CliRunner

from packager.cli import main
from subnet.arch import UnsupportedArchitecture
from subnet.extract import extract
from subnet.loading import LoadedModel, ModelLoadError, load_model
from subnet.spec import SubnetSpec
from tests.conftest import tiny_model


def test_pickle_checkpoint_is_refused(tmp_path):
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle checkpoints .*--allow-pickle"):
        load_model(tmp_path)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedArchitecture, match="unsupported architecture 'gpt2': packager supports llama, mistral, qwen2"):
        load_model(tmp_path)


def test_missing_things_fail_in_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(tmp_path / "weights.txt")


def test_cli_error_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "has no config.json" in result.output


@pytest.mark.integration
def test_smollm2_inspect_extract_generate(smollm2):
    a = smollm2.arch
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.intermediate_size) == (30, 576, 9, 3, 1536)
    assert smollm2.model.num_parameters() == 134_515_008
    spec = SubnetSpec.uniform(a, layers=[i for i in range(30) if i not in (20, 24)])
    spec.layers[3].mlp = 1280
    sub = extract(smollm2.model, spec)
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = sub.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert len(text.strip()) > 0
    assert sub.num_parameters() == spec.num_params()


@pytest.mark.integration
def test_cli_inspect_embedded():
    result = CliRunner().invoke(main, ["inspect", "--json"])
    assert result.exit_code == 0, result.output
    import json

    info = json.loads(result.output[result.output.index("{"):])
    assert info["parameters"] == 134_515_008 and info["layers"] == 30
    assert info["per_layer"][0] == {"layer": 0, "heads": 9, "kv_heads": 3, "head_dim": 64, "mlp": 1536, "hidden": 576}


def test_a_loaded_model_is_named_after_where_it_came_from():
    names = {src: LoadedModel(None, None, None, src).name for src in
             ("embedded:SmolLM2-135M-Instruct", "models/Llama-3.2-1B", "/w/qwen2.5-0.5b-q8_0.gguf", "HuggingFaceTB/SmolLM2-360M")}
    assert list(names.values()) == ["SmolLM2-135M-Instruct", "Llama-3.2-1B", "qwen2.5-0.5b-q8_0", "SmolLM2-360M"]
