"""`packager tune-supernet` and `packager search --supernet-adapter` on a small random model."""

import pytest
import torch
from click.testing import CliRunner

from packager.cli import _search_problem, main
from search.problem import Budgets
from search.supernet_tuning import SupernetTuningError, load_supernet_adapter
from subnet.loading import load_model
from tests.conftest import tiny_model


def _model_dir(folder, seed):
    from transformers import AutoTokenizer

    from subnet.loading import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    model = tiny_model("llama", seed=seed, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=None)  # fmt: skip
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(model folder, adapter folder tuned on it by the CLI, CLI output)."""
    root = tmp_path_factory.mktemp("tune")
    model = _model_dir(root / "model", seed=0)
    adapter = root / "adapter"
    res = CliRunner().invoke(main, ["tune-supernet", "--model", str(model), "--steps", "3", "--calib-blocks", "8",
                                    "--out", str(adapter)])  # fmt: skip
    assert res.exit_code == 0, res.output
    return model, adapter, res.output


def test_tune_supernet_writes_an_adapter_that_search_merges(tuned):
    model, adapter, output = tuned
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert "tuned 3 steps" in output
    # search's sort of the same model matches the fingerprint, and the adapter changes the searched weights
    plain = _search_problem(str(model), "laptop-cpu", None, "uniform", Budgets(), False, eval_blocks=2)
    merged = _search_problem(str(model), "laptop-cpu", None, "uniform", Budgets(), False, eval_blocks=2,
                             adapter=str(adapter))  # fmt: skip
    a, b = plain.supernet.model.state_dict(), merged.supernet.model.state_dict()
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    res = CliRunner().invoke(main, ["search", "--model", str(model), "--strategy", "random", "--budget", "4",
                                    "--supernet-adapter", str(adapter), "--out", str(adapter.parent / "s")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (adapter.parent / "s" / "front.json").is_file()


def test_adapter_on_another_base_or_sort_is_one_clear_error(tuned, tmp_path):
    model, adapter, _ = tuned
    other = _model_dir(tmp_path / "other", seed=1)
    res = CliRunner().invoke(main, ["search", "--model", str(other), "--strategy", "random", "--budget", "4",
                                    "--supernet-adapter", str(adapter), "--out", str(tmp_path / "s")])  # fmt: skip
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "different base or importance sort" in errors[0] and "Traceback" not in res.output
    assert not (tmp_path / "s").exists()
    with pytest.raises(SupernetTuningError, match="different base or importance sort"):
        load_supernet_adapter(load_model(str(model)).model, adapter)  # the same model, unsorted


def test_tune_supernet_refuses_an_existing_output(tuned):
    model, adapter, _ = tuned
    res = CliRunner().invoke(main, ["tune-supernet", "--model", str(model), "--steps", "1", "--calib-blocks", "8",
                                    "--out", str(adapter)])  # fmt: skip
    assert res.exit_code == 2 and "already exists" in res.output and "--force" in res.output
