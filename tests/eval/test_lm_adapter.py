"""The lm-eval adapter against a direct, one-request-at-a-time computation on the real checkpoint."""
from __future__ import annotations

import math

import pytest
import torch
from lm_eval.api.instance import Instance

from megavlm.eval.lm_adapter import MegavlmLM


def direct_logprob(model, ids: list[int], start: int) -> tuple[float, bool]:
    """Sum of log P(ids[t] | ids[:t]) for t >= start, one unpadded row, plain forward."""
    core = model.model
    tok = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    with torch.no_grad():
        logits = core.logits(core(tok, pos, None)).float()[0]
    logp = torch.log_softmax(logits, -1)
    total, greedy = 0.0, True
    for t in range(start, len(ids)):
        total += float(logp[t - 1, ids[t]])
        greedy &= int(logp[t - 1].argmax()) == ids[t]
    return total, greedy


def requests(kind: str, args_list):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


PAIRS = [("The cat runs near the", " house."), ("Red", " blue green small large runs"),
         ("", "The dog sleeps."), ("One two three four five six seven eight nine", " ten"),
         ("A bird eats ", "fish"), ("What is shown in the image?", " Yes."),
         ("Happy sad old new one two three", " four five")]


@pytest.fixture
def counted(loaded, monkeypatch):
    """The loaded model with its forward passes counted."""
    calls = []
    original = loaded._forward

    def forward(rows, images):
        calls.append(len(rows))
        return original(rows, images)

    monkeypatch.setattr(loaded, "_forward", forward)
    return loaded, calls


def test_loglikelihood_matches_direct_and_is_batched(counted):
    model, calls = counted
    lm = MegavlmLM(model=model, batch_size=3)
    got = lm.loglikelihood(requests("loglikelihood", PAIRS))
    assert calls == [3, 3, 1]  # 7 requests, batch size 3: one forward per batch
    for (ctx, cont), (lp, greedy) in zip(PAIRS, got):
        c_ids, k_ids = lm._encode_pair(ctx, cont)
        c_ids = c_ids or [model.tok.eod]
        ref, ref_greedy = direct_logprob(model, c_ids + k_ids, len(c_ids))
        assert lp == pytest.approx(ref, abs=1e-4), (ctx, cont)
        assert greedy == ref_greedy
        assert lp < 0


def test_tokenization_of_pairs(loaded):
    lm = MegavlmLM(model=loaded)
    ctx, cont = lm._encode_pair("A bird eats ", "fish")
    # trailing context whitespace belongs to the continuation, as in lm-eval's HF model
    assert ctx == loaded.encode("A bird eats") and ctx + cont == loaded.encode("A bird eats fish")


def test_loglikelihood_rolling(counted):
    model, calls = counted
    lm = MegavlmLM(model=model, batch_size=4)
    docs = ["The cat runs near the house.", "Old new one two three four five."]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in docs]))
    assert calls == [2]
    for d, lp in zip(docs, got):
        ids = model.encode(d)
        ref, _ = direct_logprob(model, [model.tok.eod] + ids, 1)
        assert lp == pytest.approx(ref, abs=1e-4)
    # a document longer than the sequence is split into windows that still cover every token
    long = " ".join(["The quick dog jumps over the river stone."] * 20)
    n = len(model.encode(long))
    assert n > model.max_length
    scored = []
    original = model.score
    model.score = lambda reqs: (scored.extend(len(r.continuation) for r in reqs), original(reqs))[1]
    try:
        (lp,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(long,)]))
    finally:
        del model.score
    assert sum(scored) == n and len(scored) >= 2 and math.isfinite(lp)


def test_generate_until_is_greedy(loaded):
    lm = MegavlmLM(model=loaded, batch_size=2)
    prompts = ["The cat", "One two three", "Red blue"]
    got = lm.generate_until(requests("generate_until", [(p, {"until": ["."], "max_gen_toks": 6})
                                                         for p in prompts]))
    for p, text in zip(prompts, got):
        ids = loaded.encode(p)
        start = len(ids)
        for _ in range(6):  # plain greedy loop, one token at a time
            with torch.no_grad():
                logits = loaded.model.logits(loaded.model(torch.tensor([ids]), torch.arange(len(ids))[None], None))
            nxt = int(logits[0, -1].argmax())
            if nxt == loaded.tok.eod:
                break
            ids.append(nxt)
            if "." in loaded.tok.decode(ids[start:]):
                break
        assert text == loaded.tok.decode(ids[start:]).split(".", 1)[0]
    with pytest.raises(ValueError, match="greedy"):
        lm.generate_until(requests("generate_until", [("x", {"do_sample": True, "temperature": 1.0})]))
