"""Shared fixtures: tiny random Llama / Qwen2 models built in code, and the embedded SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


def tiny_config(family: str = "llama", **over):
    """A small random config: 4 layers, hidden 64, 4 query / 2 KV heads (head_dim 16), MLP 96."""
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=(family == "llama"),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(over)
    return (Qwen2Config if family == "qwen2" else LlamaConfig)(**kw)


def tiny_model(family: str = "llama", seed: int = 0, **over):
    """A tiny random causal LM in eval mode, weights scaled so activations stay informative."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cls = Qwen2ForCausalLM if family == "qwen2" else LlamaForCausalLM
    model = cls(tiny_config(family, **over)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.shape[0] > 0:
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial norms and biases
    return model


@pytest.fixture(params=["llama", "qwen2"])
def family(request):
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (converted once, cached under $PACKAGER_HOME)."""
    from subnet.loading import load_model

    return load_model(None)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PACKAGER_SKIP_INTEGRATION"):
        skip = pytest.mark.skip(reason="PACKAGER_SKIP_INTEGRATION is set")
        for item in items:
            if "integration" in item.keywords:
                item.add_marker(skip)
