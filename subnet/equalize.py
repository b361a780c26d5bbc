"""Activation-aware channel equalization (AWQ, Lin et al. 2024) before weights are rounded.

A linear's input channels that carry large activations matter most, and a block format rounds every
column of a block alike. Scaling input channel j of the linear's weight up by s_j and the channel's
producer down by s_j leaves the float model's function unchanged but gives the salient columns more of
the grid. Per group of linears sharing one input, s = mean|x|^alpha (normalised), alpha chosen on a
grid to minimise the rounding error of the group's outputs on calibration text, summed over the
formats the search may give it. Four groups per decoder layer, each with an exact place to fold 1/s:

- o        ← v's rows (and bias): attention mixes v rows with weights that sum to one; with GQA one
  scale per KV channel serves every query head of its group
- q, k, v  ← the input RMSNorm's weight
- down     ← up's rows (the MLP is act(gate) * up, linear in up)
- gate, up ← the post-attention RMSNorm's weight
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from subnet.arch import arch_of
from subnet.quant import fake_quantize

GROUPS = ("o", "qkv", "down", "gate_up")  # the order they are equalized in, per layer


@dataclass
class Group:
    """Linears that read one input, and how to fold a per-channel scale into that input's producer."""

    name: str
    linears: list[torch.nn.Linear]
    producer: list[torch.Tensor]  # tensors whose dim 0 is the input channel (or the KV channel, for o)
    expand: int = 1  # input channels per producer channel group (GQA: query heads per KV head)
    head_dim: int = 0


def layer_groups(layer, arch) -> list[Group]:
    """The four equalizable groups of an HF Llama-family decoder layer, in ``GROUPS`` order."""
    attn, mlp = layer.self_attn, layer.mlp
    v = [attn.v_proj.weight] + ([attn.v_proj.bias] if attn.v_proj.bias is not None else [])
    # a group whose producer is another group's linear (v, up) comes first, so that one's rows are
    # final when its own columns are scaled: rounding error is weighed on the weights that get exported
    return [Group("o", [attn.o_proj], v, arch.group_size, arch.head_dim),
            Group("qkv", [attn.q_proj, attn.k_proj, attn.v_proj], [layer.input_layernorm.weight]),
            Group("down", [mlp.down_proj], [mlp.up_proj.weight]),
            Group("gate_up", [mlp.gate_proj, mlp.up_proj], [layer.post_attention_layernorm.weight])]  # fmt: skip


def _expanded(s: torch.Tensor, g: Group) -> torch.Tensor:
    """A producer-channel scale laid out over the group's input channels (query head h reads KV head h // expand)."""
    if g.expand == 1:
        return s
    kv = s.view(-1, 1, g.head_dim)
    return kv.expand(kv.shape[0], g.expand, g.head_dim).reshape(-1)


def _reduced(a: torch.Tensor, g: Group) -> torch.Tensor:
    """Input-channel activation magnitudes averaged onto producer channels."""
    return a if g.expand == 1 else a.view(-1, g.expand, g.head_dim).mean(1).reshape(-1)


def rounding_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, fmt: str,
                   outputs: list[torch.Tensor] | None = None) -> float:  # fmt: skip
    """Squared error of the group's outputs on ``x`` when each weight is scaled by ``s`` (per input
    channel), rounded through ``fmt`` and unscaled. ``outputs``: the float outputs ``x @ w.T``, when
    the caller already has them."""
    outputs = outputs if outputs is not None else [x @ w.T for w in weights]
    xs = x / s
    return sum(float(((xs @ fake_quantize(w * s, fmt).T - y) ** 2).sum()) for w, y in zip(weights, outputs))


def best_scale(x: torch.Tensor, g: Group, formats: list[str], grid: int) -> tuple[float, torch.Tensor, float]:
    """(alpha, producer-channel scale, error relative to no scaling) minimising the group's rounding
    error averaged over ``formats``, each relative to its own error without scaling."""
    weights = [lin.weight.detach().float() for lin in g.linears]
    outputs = [x @ w.T for w in weights]  # the float reference, once for every alpha and format
    a = _reduced(x.abs().mean(0), g)
    one = torch.ones_like(a)
    base = {f: rounding_error(x, weights, _expanded(one, g), f, outputs) for f in formats}
    best = (0.0, one, 1.0)
    for k in range(1, grid):
        alpha = k / (grid - 1)
        s = a.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = statistics.fmean(rounding_error(x, weights, _expanded(s, g), f, outputs) / max(base[f], 1e-30)
                               for f in formats)  # fmt: skip
        if err < best[2]:
            best = (alpha, s, err)
    return best


def _group_inputs(model, blocks: torch.Tensor, sample_every: int) -> dict[tuple[int, str], torch.Tensor]:
    """Every group's input on calibration ``blocks`` (every ``sample_every``-th token), one forward pass."""
    arch = arch_of(model.config)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for g in layer_groups(layer, arch):

            def grab(_mod, inp, key=(i, g.name)):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1])
                seen.setdefault(key, []).append(x[::sample_every].float())

            handles.append(g.linears[0].register_forward_pre_hook(grab))
    try:
        model.model(blocks)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


@torch.no_grad()
def equalize_channels(model, blocks: torch.Tensor, formats: list[str], grid: int = 11, sample_every: int = 4) -> list[dict]:
    """Equalize every decoder layer's input channels in place for rounding through ``formats``.

    The float model's outputs are unchanged (up to float rounding). Returns one row per group:
    layer, group, the chosen alpha and the rounding error relative to no scaling (1.0: left alone).
    """
    from rich.progress import Progress

    if not formats:
        return []
    arch = arch_of(model.config)
    inputs = _group_inputs(model, blocks, sample_every)
    rows = []
    with Progress(transient=True) as bar:
        task = bar.add_task(f"equalize channels for {', '.join(formats)}", total=arch.num_layers)
        for i, layer in enumerate(model.model.layers):
            for g in layer_groups(layer, arch):
                alpha, s, err = best_scale(inputs.pop((i, g.name)), g, formats, grid)
                if alpha:
                    for lin in g.linears:
                        lin.weight.mul_(_expanded(s, g).to(lin.weight.dtype))
                    for t in g.producer:
                        t.div_(s.view(-1, *([1] * (t.dim() - 1))).to(t.dtype))
                rows.append({"layer": i, "group": g.name, "alpha": alpha, "error_ratio": err})
            bar.advance(task)
    return rows
