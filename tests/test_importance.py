"""Importance sorting: permutations keep the function, prefixes hold the best units, bad input is named."""

import pytest
import torch

from search.importance import ImportanceError, layer_scores, quantization_rank, sort_model, unit_scores
from subnet.arch import arch_of
from subnet.spec import SubnetSpec
from subnet.supernet import Supernet
from tests.conftest import tiny_model

BLOCKS = torch.randint(3, 128, (8, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("unit", ["magnitude", "taylor"])
@pytest.mark.parametrize("layer", ["cosine", "ppl"])
def test_sorted_model_computes_the_same(family, unit, layer):
    model = tiny_model(family)
    with torch.no_grad():
        before = model(BLOCKS[:2]).logits
    imp = sort_model(model, BLOCKS, unit, layer)
    with torch.no_grad():
        after = model(BLOCKS[:2]).logits
    assert (after - before).abs().max() < 1e-4
    assert sorted(imp.layer_rank) == list(range(4))
    # every unit kind is now in descending score order
    s = imp.unit_scores
    for row in s["mlp"] + s["groups"]:
        assert row == sorted(row, reverse=True)
    assert s["hidden"] == sorted(s["hidden"], reverse=True)
    rescored = unit_scores(model, BLOCKS, unit)
    assert torch.all(rescored["mlp"][:, :-1] >= rescored["mlp"][:, 1:] - 1e-3 * rescored["mlp"].max())


def test_sorting_makes_prefixes_better():
    """On a model with planted unimportant units, the sorted prefix loses less than the unsorted one."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :48] *= 0.01  # first half of every MLP barely matters
    arch = arch_of(model.config)
    spec = SubnetSpec.uniform(arch, mlp=48)
    net = Supernet(model)
    full = net.activate(SubnetSpec.full(arch)).perplexity(BLOCKS)
    unsorted = net.activate(spec).perplexity(BLOCKS)
    sort_model(model, BLOCKS)
    sorted_ppl = net.activate(spec).perplexity(BLOCKS)
    assert abs(sorted_ppl - full) < abs(unsorted - full)


def test_layer_scores_rank_an_identity_block_last():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()  # block 2 passes its input through unchanged
    scores = layer_scores(model, BLOCKS, "cosine")
    assert min(range(4), key=lambda i: scores[i]) == 2


def test_quantization_rank_orders_blocks_by_the_cost_of_rounding_them_alone():
    """Each score is the perplexity with that block alone in the narrow format (the rest wide), as the
    extracted model rounded by fake_quantize_model scores it; the rank sorts the scores."""
    from search.evaluate import perplexity
    from subnet.extract import extract
    from subnet.quant import fake_quantize_model

    model = tiny_model("llama", vocab_size=128)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3)  # sharper predictions: rounding moves perplexity
    rank, scores = quantization_rank(model, BLOCKS, "q4_0", "q8_0")
    arch = arch_of(model.config)
    for i in range(arch.num_layers):
        spec = SubnetSpec.full(arch, "q8_0")
        spec.layers[i].formats = dict.fromkeys(spec.layers[i].formats, "q4_0")
        want = perplexity(fake_quantize_model(extract(model, spec), spec), BLOCKS, batch_size=4)
        assert scores[i] == pytest.approx(want, rel=1e-4)
    assert sorted(rank) == list(range(4)) and all(scores[a] <= scores[b] for a, b in zip(rank, rank[1:]))
    assert len(set(scores)) == 4  # rounding one block or another is not free
    with pytest.raises(ImportanceError, match="calibration text too short"):
        quantization_rank(model, BLOCKS[:1, :20], "q4_0", "q8_0")


def test_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ImportanceError, match="calibration text too short: 20 tokens"):
        sort_model(model, BLOCKS[:1, :20])
    with pytest.raises(ImportanceError, match="unknown unit importance method 'fisherx'"):
        unit_scores(model, BLOCKS, "fisherx")
