"""Shipped text splits, exact perplexity, and the offline lm-eval tasks."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from search.evaluate import EvaluateError, nll_per_block, perplexity, perplexity_ratio
from search.text import (CHECK_AT, CHECK_EVERY, DATA_DIR, SPLITS, TextError, document_sentences, documents,
                         holdout_blocks, load_text, report_blocks, split_documents, split_token_ids, token_blocks)
from targets.backend import runner_nll_per_block


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from subnet.loading import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def _norm(s: str) -> str:
    return re.sub(r"\W+", " ", s.lower()).strip()


def test_splits_share_no_sentence_and_look_like_prose():
    sents = {s: {_norm(x) for d in documents(s) for x in document_sentences(d)} for s in SPLITS}
    shared = (sents["calibration"] | sents["check"]) & sents["evaluation"]
    assert not shared, sorted(shared)[:3]
    for split in SPLITS:
        text = load_text(split)
        assert len(documents(split)) >= 30
        assert not re.search(r"\{\{|\}\}|\[\[|<ref|&quot;|https?://|Project Gutenberg", text)


def test_unknown_split_and_too_short_text_give_clear_errors(tokenizer):
    with pytest.raises(TextError, match="unknown text split 'train'"):
        load_text("train")
    with pytest.raises(TextError, match=r"calibration text too short: \d+ tokens, need 100000000"):
        token_blocks(tokenizer, "calibration", 100_000, 1_000)


def test_token_blocks_are_deterministic_disjoint_and_real(tokenizer):
    a = token_blocks(tokenizer, "evaluation", 64, 5)
    b = token_blocks(tokenizer, "evaluation", 64, 5)
    assert a.shape == (5, 64) and a.dtype == torch.long and torch.equal(a, b)
    text = tokenizer.decode(a[0])
    assert text in tokenizer.decode(tokenizer(load_text("evaluation"), add_special_tokens=False)["input_ids"][:64])
    # blocks come from different places of the split and never from the calibration split
    assert len({tuple(r.tolist()) for r in a}) == 5
    assert not torch.equal(a, token_blocks(tokenizer, "calibration", 64, 5))


def _where(ids: torch.Tensor, block: torch.Tensor) -> int:
    """The token offset of ``block`` in ``ids`` (the shipped text never repeats 64 tokens)."""
    hits = (ids.unfold(0, len(block), 1) == block).all(dim=1).nonzero().flatten()
    assert len(hits) == 1
    return int(hits[0])


def test_holdout_blocks_are_spread_over_the_split_and_disjoint(tokenizer):
    ids = split_token_ids(tokenizer, "calibration")
    train, held = holdout_blocks(tokenizer, "calibration", 64, 8, 2)
    every = token_blocks(tokenizer, "calibration", 64, 10)
    assert train.shape == (8, 64) and held.shape == (2, 64)
    # one held-out block from each half of the split
    assert torch.equal(held, every[[2, 7]])
    # more training blocks on the same grid: the held-out ones stay put, and no training token is held out
    more, same = holdout_blocks(tokenizer, "calibration", 64, 40, 2, grid=10)
    assert more.shape == (40, 64) and torch.equal(same, held)
    for t in (train, more):
        starts = sorted(_where(ids, b) for b in t)
        assert starts[-1] > len(ids) * 3 // 4 and all(b - a >= 64 for a, b in zip(starts, starts[1:]))
        assert all(abs(s - _where(ids, h)) >= 64 for s in starts for h in held)
    with pytest.raises(TextError, match="at least one block on each side"):
        holdout_blocks(tokenizer, "calibration", 64, 8, 0)
    with pytest.raises(TextError, match="too short for"):
        holdout_blocks(tokenizer, "calibration", 64, len(ids) // 64, 2, grid=10)


def test_check_split_is_whole_calibration_documents_the_calibration_split_leaves_out():
    """The floor check's text: every eleventh document of calibration.txt, from all three sources, and none
    of them in the calibration split that everything is fitted and trained on."""
    whole = split_documents((DATA_DIR / "calibration.txt").read_text(encoding="utf-8"))
    check, calibration = documents("check"), documents("calibration")
    assert check == whole[CHECK_AT::CHECK_EVERY] and len(check) + len(calibration) == len(whole)
    assert not set(check) & set(calibration)
    assert sorted([*check, *calibration]) == sorted(whole)
    # the round-robin of Wikipedia, news and Botchan: an odd period takes long and short documents alike
    sizes = sorted(len(d) for d in check)
    assert sizes[0] < 3_000 < 20_000 < sizes[-1]
    assert 0.05 < len(load_text("check")) / sum(len(d) for d in whole) < 0.12


def test_report_blocks_miss_every_token_the_search_scores(tokenizer):
    n = len(split_token_ids(tokenizer, "evaluation"))
    searched = {i * (n // 8) + k for i in range(8) for k in range(256)}
    for count in (8, 32):
        blocks = report_blocks(tokenizer, count)
        stride = n // count
        starts = [i * stride + stride // 2 for i in range(count)]
        assert blocks.shape == (count, 256)
        assert torch.equal(blocks[1], split_token_ids(tokenizer, "evaluation")[starts[1] : starts[1] + 256])
        assert not searched & {s + k for s in starts for k in range(256)}
    with pytest.raises(TextError, match="phase 0.5 does not fit blocks of 4096 tokens"):
        token_blocks(tokenizer, "evaluation", 4096, 20, phase=0.5)


def test_perplexity_ratio_pairs_blocks_and_brackets_the_ratio():
    torch.manual_seed(0)
    hardness = torch.rand(40) * 400 + 300  # per-block NLL sums: some text is far harder than the rest
    other = hardness + 6 + torch.randn(40)  # +6 nats per 255-token block, give or take one
    r = perplexity_ratio(hardness, other, 255)
    assert r["ratio"] == pytest.approx(math.exp((other - hardness).mean().item() / 255))
    assert r["low"] < r["ratio"] < r["high"] and r["blocks"] == 40
    # paired: the spread of hardness between blocks does not widen the interval
    assert r["high"] - r["low"] < 0.005  # unpaired, it would be about 0.1 wide
    assert perplexity_ratio(hardness, hardness, 255) == {"ratio": 1.0, "low": 1.0, "high": 1.0, "blocks": 40}
    with pytest.raises(EvaluateError, match="same >= 2 blocks"):
        perplexity_ratio(hardness, other[:5], 255)


def test_runner_nll_per_block_matches_torch():
    model = tiny_model(vocab_size=128)
    torch.manual_seed(2)
    blocks = torch.randint(0, 128, (3, 9))

    class Runner:  # a runtime's runner: logits of one sequence as numpy
        def logits(self, ids):
            with torch.no_grad():
                return model(torch.tensor([ids])).logits[0].numpy()

    got = runner_nll_per_block(Runner(), blocks)
    assert got == pytest.approx(nll_per_block(model, blocks).numpy(), rel=1e-4)
    assert math.exp(got.sum() / (3 * 8)) == pytest.approx(perplexity(model, blocks), rel=1e-4)


def test_perplexity_is_exp_of_mean_token_nll():
    model = tiny_model(vocab_size=128)
    torch.manual_seed(1)
    blocks = torch.randint(0, 128, (5, 17))
    by_hand = []
    with torch.no_grad():
        for row in blocks:  # one block at a time, log-softmax by hand
            logp = torch.log_softmax(model(row[None]).logits[0, :-1].double(), -1)
            by_hand += [-logp[i, row[i + 1]].item() for i in range(len(row) - 1)]
    expected = math.exp(sum(by_hand) / len(by_hand))
    for bs in (1, 2, 5):  # batching (with a ragged last batch) must not change the result
        assert perplexity(model, blocks, batch_size=bs) == pytest.approx(expected, rel=1e-5)
    model.train()  # scored in eval mode, and the caller's mode comes back
    assert perplexity(model, blocks) == pytest.approx(expected, rel=1e-5) and model.training
    model.eval()
    sums = nll_per_block(model, blocks, batch_size=3)
    assert sums.shape == (5,)
    assert sums[0].item() == pytest.approx(sum(by_hand[:16]), rel=1e-5)
    # a model returning a plain tuple (a patched forward) is scored the same
    plain = lambda input_ids, use_cache: (model(input_ids=input_ids).logits,)  # noqa: E731
    plain.parameters = model.parameters
    assert perplexity(plain, blocks) == pytest.approx(expected, rel=1e-5)


def test_perplexity_rejects_bad_blocks():
    model = tiny_model(vocab_size=128)
    with pytest.raises(EvaluateError, match="LongTensor"):
        perplexity(model, torch.zeros(2, 8))
    with pytest.raises(EvaluateError, match="predict no token"):
        perplexity(model, torch.zeros(2, 1, dtype=torch.long))


def test_perplexity_on_real_text_falls_below_uniform(tokenizer):
    """A tiny random model scores near uniform; cross-check against F.cross_entropy on real blocks."""
    model = tiny_model(vocab_size=len(tokenizer))
    blocks = token_blocks(tokenizer, "evaluation", 32, 3)
    logits = model(blocks).logits[:, :-1]
    ref = math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item())
    assert perplexity(model, blocks) == pytest.approx(ref, rel=1e-5)


def test_offline_lmeval_task_on_tiny_model(tokenizer):
    from search.lmeval_tasks import evaluate_tasks, shipped_tasks

    assert {"packager_realtext_mc", "packager_realtext_cloze"} <= set(shipped_tasks())
    model = tiny_model(vocab_size=len(tokenizer))
    res = evaluate_tasks(model, tokenizer, ["packager_realtext_mc"], limit=4, batch_size=4)
    m = res["packager_realtext_mc"]
    assert m["n"] == 4
    assert 0.0 <= m["acc"] <= 1.0 and 0.0 <= m["acc_norm"] <= 1.0


def test_lmeval_unknown_task_gives_clear_error(tokenizer):
    from search.lmeval_tasks import LmEvalError, evaluate_tasks

    with pytest.raises(LmEvalError, match="unknown lm-eval task"):
        evaluate_tasks(tiny_model(vocab_size=len(tokenizer)), tokenizer, ["no_such_task_xyz"])


@pytest.mark.integration
def test_smollm2_perplexity_and_mc_accuracy(smollm2):
    from search.lmeval_tasks import evaluate_tasks

    blocks = token_blocks(smollm2.tokenizer, "evaluation", 256, 8)
    ppl = perplexity(smollm2.model, blocks)
    assert 10 < ppl < 100
    res = evaluate_tasks(smollm2.model, smollm2.tokenizer, ["packager_realtext_mc"], limit=100, batch_size=8)
    # chance is 0.25; SmolLM2 measured acc 0.51, acc_norm 0.61 on these 100 items (stderr ~0.05)
    assert res["packager_realtext_mc"]["acc"] > 0.35 and res["packager_realtext_mc"]["acc_norm"] > 0.4
