"""Importance sorting: score units on calibration text, then permute the model so prefixes are best.

Units: MLP channels, query heads (inside their KV group), KV groups, hidden channels, and whole
blocks. Unit scores come from activation magnitude (Minitron-style) or a first-order Taylor score
|activation x gradient| (whittle / LLM-Pruner style). Blocks cannot be reordered, so their ranking is
kept and depth choices keep the top-k blocks: "cosine" is 1 - cos(block input, block output)
(ShortGPT's block influence); "ppl" is the perplexity increase when the block alone is dropped.
Blocks are also ranked by how much rounding them costs (``quantization_rank``), so that a search
can give its narrow weight formats to the least sensitive blocks first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from subnet.arch import arch_of
from subnet.heap import return_freed_heap
from subnet.permute import permute_heads, permute_hidden, permute_mlp
from subnet.spec import SubnetSpec
from subnet.supernet import Supernet

UNIT_METHODS = ("magnitude", "taylor")
LAYER_METHODS = ("cosine", "ppl")


class ImportanceError(ValueError):
    pass


@dataclass
class Importance:
    """Result of sorting: which methods ran, and the block ranking (most important first)."""

    unit_method: str
    layer_method: str
    layer_scores: list[float]
    layer_rank: list[int]
    calibration_tokens: int
    unit_scores: dict = field(default_factory=dict)  # sorted scores per unit kind, for inspection
    quant_rank: list[int] | None = None  # blocks least sensitive to rounding first (quantization_rank)
    quant_scores: list[float] | None = None  # perplexity with that block alone rounded, per block
    quant_formats: list[str] | None = None  # [narrow, wide]: what the scores rounded to and from

    def keep_layers(self, k: int) -> list[int]:
        """The k most important blocks, in model order."""
        return sorted(self.layer_rank[:k])

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path) -> "Importance":
        return cls(**json.loads(Path(path).read_text()))


def _check(blocks: torch.Tensor, min_tokens: int = 256) -> None:
    if blocks.dim() != 2 or blocks.numel() < min_tokens:
        raise ImportanceError(
            f"calibration text too short: {blocks.numel()} tokens, importance sorting needs at least {min_tokens}"
        )


def unit_scores(model, blocks: torch.Tensor, method: str = "magnitude", batch: int = 4) -> dict:
    """Per-unit scores: ``mlp`` [L, I], ``heads`` [L, H] and ``hidden`` [E] (higher = more important)."""
    if method not in UNIT_METHODS:
        raise ImportanceError(f"unknown unit importance method {method!r}; choose one of {', '.join(UNIT_METHODS)}")
    _check(blocks)
    arch = arch_of(model.config)
    L, hd = arch.num_layers, arch.head_dim
    mlp = torch.zeros(L, arch.intermediate_size)
    heads = torch.zeros(L, arch.num_heads)
    hidden = torch.zeros(arch.hidden_size)
    captured: list[tuple[str, int, torch.Tensor]] = []
    taylor = method == "taylor"

    def grab(kind, i):
        def hook(_mod, args, out=None):
            t = args[0] if out is None else out
            if taylor:
                t.retain_grad()
            captured.append((kind, i, t))

        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(grab("mlp", i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(grab("heads", i)))
        handles.append(layer.input_layernorm.register_forward_hook(grab("hidden", i)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(grab("hidden", i)))
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task(f"importance ({method})", total=blocks.shape[0])
            for s in range(0, blocks.shape[0], batch):
                ids = blocks[s : s + batch]
                captured.clear()
                with torch.set_grad_enabled(taylor):
                    out = model(ids, labels=ids if taylor else None)
                    if taylor:
                        model.zero_grad(set_to_none=True)
                        out.loss.backward()
                for kind, i, t in captured:
                    v = (t * t.grad).abs() if taylor else t.abs()
                    v = v.detach().reshape(-1, v.shape[-1]).sum(0)
                    if kind == "mlp":
                        mlp[i] += v
                    elif kind == "heads":
                        heads[i] += v.view(arch.num_heads, hd).sum(-1)
                    else:
                        hidden += v
                bar.advance(task, ids.shape[0])
    finally:
        for h in handles:
            h.remove()
        captured.clear()
        model.zero_grad(set_to_none=True)
    return {"mlp": mlp, "heads": heads, "hidden": hidden}


@torch.inference_mode()
def layer_scores(model, blocks: torch.Tensor, method: str = "cosine", batch: int = 4) -> list[float]:
    """Per-block importance (higher = more important)."""
    if method not in LAYER_METHODS:
        raise ImportanceError(f"unknown block importance method {method!r}; choose one of {', '.join(LAYER_METHODS)}")
    _check(blocks)
    arch = arch_of(model.config)
    if method == "ppl":
        net = Supernet(model)
        net.simulate_quantization = False
        scores = []
        with Progress(transient=True) as bar:
            task = bar.add_task("block importance (ppl)", total=arch.num_layers)
            for i in range(arch.num_layers):
                keep = [j for j in range(arch.num_layers) if j != i]
                scores.append(net.activate(SubnetSpec.uniform(arch, layers=keep)).perplexity(blocks))
                bar.advance(task)
        return scores
    sims = torch.zeros(arch.num_layers)
    count = 0

    def hook(i):
        def fn(_mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            sims[i] += torch.nn.functional.cosine_similarity(x, y, dim=-1).sum()

        return fn

    handles = [ly.register_forward_hook(hook(i), with_kwargs=True) for i, ly in enumerate(model.model.layers)]
    try:
        for s in range(0, blocks.shape[0], batch):
            ids = blocks[s : s + batch]
            model(ids)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return (1 - sims / count).tolist()


@torch.no_grad()
def apply_sort(model, scores: dict) -> dict:
    """Permute the model in place so every unit kind is sorted by descending score; returns sorted scores."""
    arch = arch_of(model.config)
    group = arch.group_size
    out = {"mlp": [], "heads": [], "groups": []}
    for i, layer in enumerate(model.model.layers):
        order = torch.argsort(scores["mlp"][i], descending=True)
        permute_mlp(layer, order)
        out["mlp"].append(scores["mlp"][i][order].tolist())
        hs = scores["heads"][i].view(arch.num_kv_heads, group)
        within = [torch.argsort(hs[g], descending=True).tolist() for g in range(arch.num_kv_heads)]
        group_order = torch.argsort(hs.sum(-1), descending=True).tolist()
        permute_heads(layer, group_order, within, arch.num_kv_heads, arch.head_dim)
        out["heads"].append([float(hs[g, h]) for g in group_order for h in within[g]])
        out["groups"].append(hs.sum(-1)[group_order].tolist())
    order = torch.argsort(scores["hidden"], descending=True)
    permute_hidden(model, order)
    out["hidden"] = scores["hidden"][order].tolist()
    return out


def sort_model(model, blocks: torch.Tensor, unit_method: str = "magnitude", layer_method: str = "cosine") -> Importance:
    """Score and permute ``model`` in place on calibration ``blocks``; return the block ranking."""
    scores = unit_scores(model, blocks, unit_method)
    sorted_scores = apply_sort(model, scores)
    ls = layer_scores(model, blocks, layer_method)
    rank = sorted(range(len(ls)), key=lambda i: -ls[i])
    return_freed_heap()
    return Importance(unit_method, layer_method, ls, rank, int(blocks.numel()), sorted_scores)


def quantization_rank(model, blocks: torch.Tensor, narrow: str, wide: str) -> tuple[list[int], list[float]]:
    """Blocks ordered from least to most sensitive to rounding, and each block's score: the perplexity
    on ``blocks`` with that block's linears alone in ``narrow`` and every other weight in ``wide``."""
    _check(blocks)
    arch = arch_of(model.config)
    net = Supernet(model).prepare([narrow, wide])
    scores = []
    with Progress(transient=True) as bar:
        task = bar.add_task(f"block sensitivity to {narrow}", total=arch.num_layers)
        for i in range(arch.num_layers):
            spec = SubnetSpec.full(arch, wide)
            spec.layers[i].formats = dict.fromkeys(spec.layers[i].formats, narrow)
            scores.append(net.activate(spec).perplexity(blocks))
            bar.advance(task)
    return_freed_heap()
    return sorted(range(arch.num_layers), key=lambda i: scores[i]), scores
