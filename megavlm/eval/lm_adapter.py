"""megavlm checkpoints as an lm-eval model, so the paper's text suite runs through the real harness.

Importing this module registers the model name ``megavlm`` with lm-eval; afterwards
``lm_eval.simple_evaluate(model="megavlm", model_args="checkpoint=<dir>", ...)`` scores any
checkpoint of any stage. The three request types map onto :class:`CheckpointModel`:

* ``loglikelihood``: context and continuation are tokenized the way lm-eval's own HF model does
  (encode the concatenation, the continuation is what follows the context's tokens, trailing
  context whitespace moves to the continuation); all requests go through ``score`` in batches —
  one forward per ``batch_size`` requests.
* ``loglikelihood_rolling``: the document is cut into disjoint windows of the model's sequence
  length (lm-eval's rolling-window helpers, EOD as the prefix token); every window of every
  document is one scoring request, batched the same way.
* ``generate_until``: greedy decoding (the only mode evaluated here) up to ``max_gen_toks``,
  stopped at the ``until`` strings.
"""

from __future__ import annotations

from typing import Any, Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval import utils as lm_utils

from megavlm.eval.runner import CheckpointModel, ScoreRequest


@register_model("megavlm")
class MegavlmLM(LM):
    """lm-eval model over one megavlm checkpoint directory (``checkpoint=`` in model_args)."""

    def __init__(self, checkpoint: Optional[str] = None, batch_size: Any = 16, max_gen_toks: int = 128,
                 model: Optional[CheckpointModel] = None, **_ignored):
        super().__init__()
        if model is None:
            if not checkpoint:
                raise ValueError("the megavlm lm-eval model needs model_args 'checkpoint=<dir>'")
            model = CheckpointModel.load(checkpoint)
        bs = str(batch_size)
        model.batch_size = 16 if bs.startswith("auto") else max(1, int(bs))
        self.m = model
        self.max_gen_toks = int(max_gen_toks)

    @property
    def tokenizer_name(self) -> str:
        return self.m.tok.name

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.m.encode(context + continuation)
        ctx = self.m.encode(context)
        cont = whole[len(ctx):]
        if not cont or whole[:len(ctx)] != ctx:  # tokenization merged across the boundary
            cont = self.m.encode(continuation)
        return ctx, cont

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        reqs = []
        for r in requests:
            context, continuation = r.args
            ctx, cont = self._encode_pair(context, continuation)
            reqs.append(ScoreRequest(ctx, cont))
        out = []
        for r, s in zip(requests, self.m.score(reqs)):
            res = (s.logprob, s.greedy)
            self.cache_hook.add_partial("loglikelihood", r.args, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[int, ScoreRequest]] = []
        for n, r in enumerate(requests):
            (text,) = r.args[:1]
            ids = self.m.encode(text)
            for pair in lm_utils.get_rolling_token_windows(ids, self.m.tok.eod, self.m.max_length, 1):
                ctx, cont = lm_utils.make_disjoint_window(pair)
                windows.append((n, ScoreRequest(ctx, cont)))
        totals = [0.0] * len(requests)
        for (n, _), s in zip(windows, self.m.score([w for _, w in windows])):
            totals[n] += s.logprob
        for r, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, t)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            _, kwargs = r.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0:
                raise ValueError("the megavlm model evaluates with greedy decoding only (do_sample=False)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            key = (tuple(until), int(kwargs.get("max_gen_toks", self.max_gen_toks)))
            groups.setdefault(key, []).append(i)
        out = [""] * len(requests)
        for (until, max_new), idx in groups.items():
            prompts = [self.m.encode(requests[i].args[0]) for i in idx]
            texts = self.m.generate(prompts, max_new_tokens=max_new, stop_strings=until)
            for i, t in zip(idx, texts):
                out[i] = t
                self.cache_hook.add_partial("generate_until", requests[i].args, t)
        return out
