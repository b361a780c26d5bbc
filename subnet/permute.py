"""In-place permutations of a Llama-family model's units that leave its function unchanged.

Importance sorting uses these so that every sub-network is a prefix of the most important units:
MLP channels move their gate/up rows and down column; query heads move inside their KV group and
KV groups move with their query heads; hidden channels move through the embedding, every norm, every
projection and the LM head.
"""

from __future__ import annotations

import torch

from subnet.extract import head_rows


def _perm_(t: torch.Tensor, order: torch.Tensor, dim: int) -> None:
    t.data.copy_(t.data.index_select(dim, order))


@torch.no_grad()
def permute_mlp(layer, order) -> None:
    """Reorder a layer's MLP channels: new channel i is old channel order[i]."""
    order = torch.as_tensor(order, dtype=torch.long)
    mlp = layer.mlp
    _perm_(mlp.gate_proj.weight, order, 0)
    _perm_(mlp.up_proj.weight, order, 0)
    _perm_(mlp.down_proj.weight, order, 1)


@torch.no_grad()
def permute_heads(layer, group_order, within_order, num_kv_heads: int, head_dim: int) -> None:
    """Reorder KV groups (``group_order``) and query heads inside each group (``within_order[g]``).

    ``within_order[g]`` lists, for *old* group g, its query positions in their new order.
    """
    att = layer.self_attn
    group = len(within_order[0])
    q_heads = [g * group + h for g in group_order for h in within_order[g]]
    q_rows = head_rows(q_heads, head_dim)
    kv_rows = head_rows(list(group_order), head_dim)
    for lin, rows in ((att.q_proj, q_rows), (att.k_proj, kv_rows), (att.v_proj, kv_rows)):
        _perm_(lin.weight, rows, 0)
        if lin.bias is not None:
            _perm_(lin.bias, rows, 0)
    _perm_(att.o_proj.weight, q_rows, 1)


@torch.no_grad()
def permute_hidden(model, order) -> None:
    """Reorder the hidden (residual-stream) channels of the whole model."""
    order = torch.as_tensor(order, dtype=torch.long)
    m = model.model
    _perm_(m.embed_tokens.weight, order, 1)
    _perm_(m.norm.weight, order, 0)
    for layer in m.layers:
        _perm_(layer.input_layernorm.weight, order, 0)
        _perm_(layer.post_attention_layernorm.weight, order, 0)
        att, mlp = layer.self_attn, layer.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
            _perm_(lin.weight, order, 1)
        for lin in (att.o_proj, mlp.down_proj):
            _perm_(lin.weight, order, 0)
            if lin.bias is not None:
                _perm_(lin.bias, order, 0)
    lm = model.get_output_embeddings()
    if lm is not None and lm.weight.data_ptr() != m.embed_tokens.weight.data_ptr():
        _perm_(lm.weight, order, 1)
