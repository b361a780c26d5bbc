"""Extraction: materialize a SubnetSpec of a loaded model as a standalone, smaller model.

Weights are sliced by the spec's index lists (prefixes by default), so a model whose units were
importance-sorted in place yields its best sub-networks as prefixes. Uniform specs give a stock
transformers model; heterogeneous ones a ``subnet.hetero`` model that saves and reloads through
``AutoModelForCausalLM`` with per-layer sizes.
"""

from __future__ import annotations

import torch

from subnet.arch import arch_of
from subnet.hetero import hetero_config
from subnet.spec import LayerSpec, SubnetSpec


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a q/k/v projection (or columns of o_proj)."""
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def layer_index_sets(spec: SubnetSpec, layer: LayerSpec) -> dict[str, torch.Tensor]:
    """Index tensors that cut one base layer down to ``layer``: query rows, KV rows, MLP channels."""
    b = spec.base
    return {
        "q": head_rows(layer.head_index(b.group_size), b.head_dim),
        "kv": head_rows(layer.kv_index(), b.head_dim),
        "mlp": torch.tensor(layer.mlp_index(), dtype=torch.long),
    }


def sliced_state(model, spec: SubnetSpec) -> dict[str, torch.Tensor]:
    """The state dict of the sub-network, sliced from the base model (new tensors, base untouched)."""
    src = model.model
    hid = torch.tensor(spec.hidden_index(), dtype=torch.long)
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": src.embed_tokens.weight[:, hid],
        "model.norm.weight": src.norm.weight[hid],
    }
    for new_i, ly in enumerate(spec.layers):
        base_layer = src.layers[ly.index]
        idx = layer_index_sets(spec, ly)
        att, mlp = base_layer.self_attn, base_layer.mlp
        p = f"model.layers.{new_i}."
        rows = {"q_proj": idx["q"], "k_proj": idx["kv"], "v_proj": idx["kv"]}
        for name, r in rows.items():
            lin = getattr(att, name)
            out[p + f"self_attn.{name}.weight"] = lin.weight[r][:, hid]
            if lin.bias is not None:
                out[p + f"self_attn.{name}.bias"] = lin.bias[r]
        out[p + "self_attn.o_proj.weight"] = att.o_proj.weight[hid][:, idx["q"]]
        if att.o_proj.bias is not None:
            out[p + "self_attn.o_proj.bias"] = att.o_proj.bias[hid]
        out[p + "mlp.gate_proj.weight"] = mlp.gate_proj.weight[idx["mlp"]][:, hid]
        out[p + "mlp.up_proj.weight"] = mlp.up_proj.weight[idx["mlp"]][:, hid]
        out[p + "mlp.down_proj.weight"] = mlp.down_proj.weight[hid][:, idx["mlp"]]
        out[p + "input_layernorm.weight"] = base_layer.input_layernorm.weight[hid]
        out[p + "post_attention_layernorm.weight"] = base_layer.post_attention_layernorm.weight[hid]
    if not spec.base.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight[:, hid]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def subnet_config(model, spec: SubnetSpec):
    """The HF config of the extracted sub-network (stock class when uniform, heterogeneous otherwise)."""
    base_cfg = model.config
    d = base_cfg.to_dict()
    d.pop("per_layer_config", None)
    d.pop("quantization_config", None)
    d["hidden_size"] = spec.hidden_size
    d["head_dim"] = spec.base.head_dim
    d["num_hidden_layers"] = len(spec.layers)
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = [d["layer_types"][ly.index] for ly in spec.layers]
    if "max_window_layers" in d:
        d["max_window_layers"] = min(d["max_window_layers"], len(spec.layers))
    d["subnet_spec"] = spec.to_dict()
    per_layer = [
        {"num_attention_heads": ly.heads, "num_key_value_heads": ly.kv_heads, "intermediate_size": ly.mlp}
        for ly in spec.layers
    ]
    stock = spec.is_uniform and spec.hidden_size % spec.layers[0].heads == 0
    if stock:  # a plain llama/mistral/qwen2 config that any transformers loads
        d.update(per_layer[0])
        return type(base_cfg).from_dict(d)
    return hetero_config(spec.base.family, d, per_layer)


def extract(model, spec: SubnetSpec, dtype: torch.dtype | None = None):
    """A standalone model holding exactly the spec's sub-network of ``model`` (weights copied)."""
    from subnet.hetero import model_class

    spec.validate(arch_of(model.config))
    config = subnet_config(model, spec)
    state = sliced_state(model, spec)
    cls = model_class(config)
    sub = cls(config)
    missing, unexpected = sub.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and spec.base.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"extraction mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if spec.base.tie_word_embeddings:
        sub.tie_weights()
    sub.to(dtype or next(model.parameters()).dtype)
    sub.generation_config = model.generation_config
    return sub.eval()
