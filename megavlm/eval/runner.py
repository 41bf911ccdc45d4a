"""A loaded checkpoint that scores and generates in batches: the one place evaluation touches the model.

Every evaluator (the lm-eval adapter, the vision tasks, the suites) needs the same two
operations — the log-probability of a continuation after a context, and greedy continuation —
optionally with an image in front. They live here so that padding, truncation, the image layout
and batching are decided once.

Batching without an attention mask: rows are *right*-padded and the model's causal mask stays in
place (``attention_mask=None``). Under a causal mask a position never sees later positions, so
the padding after a row's last real token cannot change any of that row's logits.

Greedy generation keeps a KV cache (megavlm.model.attention.KVCache): the right-padded prompts run
once (logits read at each row's last real position), then each step feeds one token per live row
at its own position — row b writes its key/value at cache slot ``len_b`` and attends over slots
``0..len_b`` through a key mask, so padding is never seen and rows of different lengths stay
exact. ``generate(cache=False)`` is the reference: every step re-runs each row's whole sequence.
Models whose attention seat cannot hold the cache (the Transformer Engine spec) generate without
it and log why. Under tensor parallelism each rank caches its own heads and the logits of the
vocabulary shards are gathered.

Image rows follow the training layout ``[P image placeholder ids][SEP][text …]``: the image is
first, its embeddings are spliced in by the model at slot (row, 0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from torch import Tensor

from megavlm.checkpoint_format import resolve_checkpoint, tokenizer_file
from megavlm.config import DEFAULT_PROMPT_TEMPLATE, ParallelConfig
from megavlm.data.batch import image_head
from megavlm.data.tokenizer import Tokenizer, load_tokenizer
from megavlm.run_folder import CONFIG

log = logging.getLogger(__name__)


class EvalError(ValueError):
    """Bad evaluation input: the message names the file, task or record that is wrong."""


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``continuation`` after ``context`` (token ids), optionally after an image [P, D_v]."""

    context: Sequence[int]
    continuation: Sequence[int]
    image: Optional[Tensor] = None


@dataclass(frozen=True)
class Score:
    logprob: float
    """Sum of log P(continuation token | everything before it)."""
    greedy: bool
    """Whether every continuation token is the argmax at its position."""
    tokens: int


def recorded_prompt(run, path: Optional[Path] = None) -> tuple[str, str]:
    """(template, where it comes from): ``data.prompt_template`` of the checkpoint's config.yaml,
    or the default for checkpoints older than that field. The model object never carries a
    template: evaluation passes it explicitly (megavlm.eval.api.resolve_prompt)."""
    recorded = True
    if path is not None and (path / CONFIG).is_file():
        raw = yaml.safe_load((path / CONFIG).read_text()) or {}
        recorded = "prompt_template" in (raw.get("data") or {})
    t = getattr(getattr(run, "data", None), "prompt_template", None)
    if t and recorded:
        return t, "checkpoint (data.prompt_template)"
    return DEFAULT_PROMPT_TEMPLATE, "default (the checkpoint records no data.prompt_template)"


class CheckpointModel:
    """Model chunks + tokenizer + config of one checkpoint directory, for one process."""

    def __init__(self, chunks: list, run, tokenizer: Tokenizer, path: Path, batch_size: int = 16,
                 parallel=None):
        if len(chunks) != 1:
            raise EvalError(f"{path}: evaluation runs the model as one chunk, got {len(chunks)}")
        self.model = chunks[0]
        self.run = run
        self.tok = tokenizer
        self.path = Path(path)
        self.batch_size = max(1, int(batch_size))
        self.max_length = run.model.seq_length
        self.num_patches = run.model.vision.num_patches
        self.device = next(self.model.parameters()).device
        self.parallel = parallel
        """The process groups the model was loaded under (megavlm.parallel.state.Parallel); under
        torchrun its data-parallel group shards the evaluation (megavlm.eval.distributed)."""
        self._cache_ok: Optional[bool] = None  # whether generation can use a KV cache (_cache_usable)
        if tokenizer.vocab_size > run.model.vocab_size:
            raise EvalError(f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model's "
                            f"vocabulary is {run.model.vocab_size}")

    @classmethod
    def load(cls, checkpoint: str | Path, batch_size: int = 16) -> "CheckpointModel":
        """Load a checkpoint directory (``<run>/<stage>/checkpoints/step_…``). The tokenizer is
        checked first so that a checkpoint without one fails before the model is built. Under
        torchrun every rank loads the whole model (tp = pp = 1): the world is data parallel."""
        # megatron-core (model building, process groups): imported when a model is loaded, not
        # when the scorers and readers of this package are
        from megavlm.model.build import load_for_inference
        from megavlm.parallel.state import Parallel

        path = resolve_checkpoint(checkpoint)  # a run or stage folder: its newest complete checkpoint
        tok = load_tokenizer(tokenizer_file(path))
        parallel = Parallel.initialize(ParallelConfig(), seed=0)
        chunks, run = load_for_inference(path, parallel)
        return cls(chunks, run, tok, path, batch_size, parallel)

    # -- layout ---------------------------------------------------------------------------------

    def image_prefix(self) -> list[int]:
        """Token ids in front of the text of an image row: P placeholders, then SEP."""
        return image_head(self.tok, self.num_patches).tolist()

    def _fit(self, ids: list[int], keep_from: int, has_image: bool,
             limit: Optional[int] = None) -> tuple[list[int], int]:
        """Cut ``ids`` to ``limit`` (the model's sequence length) by dropping text from the left
        (never the image prefix, never a scored token); returns the ids and the shifted ``keep_from``."""
        over = len(ids) - (limit or self.max_length)
        if over <= 0:
            return ids, keep_from
        head = self.num_patches + 1 if has_image else 0
        if keep_from - over < head + 1:
            raise EvalError(f"a request of {len(ids)} tokens cannot fit the model's sequence length "
                            f"{self.max_length} without dropping scored tokens")
        return ids[:head] + ids[head + over:], keep_from - over

    def _forward(self, rows: list[list[int]], images: list[Optional[Tensor]], kv_cache=None) -> Tensor:
        """Final hidden states [B, S, d] of right-padded rows (one forward for the whole batch;
        with ``kv_cache`` the prompt forward that fills it)."""
        B, S = len(rows), max(len(r) for r in rows)
        tokens = torch.full((B, S), self.tok.pad, dtype=torch.int64)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.as_tensor(r, dtype=torch.int64)
        pos = torch.arange(S, dtype=torch.int64).expand(B, S).contiguous()
        have = [i for i, im in enumerate(images) if im is not None]
        embeds = slots = None
        if have:
            embeds = torch.stack([images[i] for i in have]).to(self.device)
            slots = torch.tensor([[i, 0] for i in have], dtype=torch.int64, device=self.device)
        with torch.no_grad():
            return self.model(tokens.to(self.device), pos.to(self.device), None, embeds, slots,
                              kv_cache=kv_cache).transpose(0, 1)

    def _logprobs(self, hidden: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Log-softmax [N, V] at the N (row, position) pairs only: the vocabulary projection is
        the costliest part of a small model's forward, and only these positions are read."""
        picked = hidden[rows, cols]  # [N, d]
        with torch.no_grad():
            logits = self.model.logits(picked.unsqueeze(1))[0].float()  # as [S=N, B=1, d]
            tp = getattr(self.parallel, "tp", 1)
            if tp > 1:  # each rank projects onto its vocabulary shard: gather them in rank order
                parts = [torch.empty_like(logits) for _ in range(tp)]
                torch.distributed.all_gather(parts, logits.contiguous(), group=self.parallel.tp_group)
                logits = torch.cat(parts, dim=-1)
        return torch.log_softmax(logits, dim=-1)

    # -- scoring --------------------------------------------------------------------------------

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Log-likelihood of each request's continuation, in request order, ``batch_size`` requests
        per forward (longest first, so rows of a batch have similar lengths)."""
        prepared = []
        for r in requests:
            if not r.continuation:
                raise EvalError("a scoring request has an empty continuation")
            prefix = self.image_prefix() if r.image is not None else []
            ctx = list(r.context) if (r.context or prefix) else [self.tok.eod]
            ids = prefix + ctx + list(r.continuation)
            # the last token is only predicted, never an input: up to max_length + 1 ids fit
            ids, start = self._fit(ids, len(ids) - len(r.continuation), r.image is not None,
                                   limit=self.max_length + 1)
            prepared.append((ids, start, r.image))
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        out: list[Optional[Score]] = [None] * len(prepared)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            hidden = self._forward([prepared[i][0][:-1] for i in idx], [prepared[i][2] for i in idx])
            spans = [(prepared[i][1] - 1, len(prepared[i][0]) - 1) for i in idx]  # t predicts t+1
            rows = torch.cat([torch.full((hi - lo,), r) for r, (lo, hi) in enumerate(spans)])
            cols = torch.cat([torch.arange(lo, hi) for lo, hi in spans])
            logp = self._logprobs(hidden, rows.to(self.device), cols.to(self.device))
            at = 0
            for (lo, hi), i in zip(spans, idx):
                ids, start, _ = prepared[i]
                target = torch.as_tensor(ids[start:], device=logp.device)
                lp = logp[at:at + hi - lo]
                at += hi - lo
                picked = lp.gather(-1, target[:, None]).squeeze(-1)
                out[i] = Score(float(picked.sum()), bool((lp.argmax(-1) == target).all()), len(target))
        return out  # type: ignore[return-value]

    # -- generation -----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], images: Optional[Sequence[Optional[Tensor]]] = None,
                 max_new_tokens: int = 128, stop_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), cache: bool = True) -> list[str]:
        """Greedy continuation of each prompt (token ids, after the image prefix when an image is
        given), stopped at a stop id, a stop string or ``max_new_tokens``; decoded text without
        the stop. ``cache=False`` re-runs the whole prefix per token (the reference the cached
        path is tested against)."""
        ids = self.generate_ids(prompts, images, max_new_tokens, stop_ids, stop_strings, cache)
        out = []
        for new in ids:
            text = self.tok.decode(new)
            for s in stop_strings:
                if s and s in text:
                    text = text.split(s, 1)[0]
            out.append(text)
        return out

    def generate_ids(self, prompts: Sequence[Sequence[int]], images: Optional[Sequence[Optional[Tensor]]] = None,
                     max_new_tokens: int = 128, stop_ids: Sequence[int] = (),
                     stop_strings: Sequence[str] = (), cache: bool = True) -> list[list[int]]:
        """The new token ids of :meth:`generate` (a stop id excluded; a stop string's tokens kept)."""
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise EvalError(f"generate: {len(prompts)} prompts but {len(images)} images")
        stop = set(stop_ids) | {self.tok.eod}
        rows = []
        for p, im in zip(prompts, images):
            ids = (self.image_prefix() if im is not None else []) + (list(p) or [self.tok.eod])
            ids, _ = self._fit(ids, len(ids), im is not None, limit=self.max_length - 1)
            rows.append(ids)
        if cache and not self._cache_usable():
            cache = False
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[list[int]] = [[] for _ in rows]
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            run = self._greedy_cached if cache else self._greedy
            new = run([rows[i] for i in idx], [images[i] for i in idx], max_new_tokens, stop, stop_strings)
            for i, n in zip(idx, new):
                out[i] = n
        return out

    def _cache_usable(self) -> bool:
        """Whether this model's attention can hold a KV cache (megavlm's SDPAttention seat); logs
        why not once (e.g. the Transformer Engine layer spec) — generation then re-runs prefixes."""
        if self._cache_ok is None:
            from megavlm.model.attention import KVCacheError, cache_seats

            try:
                cache_seats(self.model.decoder)
                if self.model.config.sequence_parallel:
                    raise KVCacheError("sequence parallelism splits a one-token step")
                self._cache_ok = True
            except KVCacheError as e:
                log.warning("%s: generation without a KV cache (%s)", self.path, e)
                self._cache_ok = False
        return self._cache_ok

    def _accept(self, new: list[int], nxt: int, stop: set[int], stop_strings: Sequence[str]) -> bool:
        """Take the greedy token ``nxt`` into ``new``; whether the row is finished by it (a stop id
        is not kept; a stop string is decoded from the new tokens, kept, and cut by generate)."""
        if nxt in stop:
            return True
        new.append(nxt)
        return bool(stop_strings) and any(s in self.tok.decode(new) for s in stop_strings)

    def _greedy(self, prompts: list[list[int]], images: list[Optional[Tensor]], max_new_tokens: int,
                stop: set[int], stop_strings: Sequence[str]) -> list[list[int]]:
        """One batch without a cache: each step runs every live row's whole sequence again."""
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(max_new_tokens):
            live = [k for k in range(len(prompts))
                    if not done[k] and len(prompts[k]) + len(new[k]) < self.max_length]
            if not live:
                break
            seqs = [prompts[k] + new[k] for k in live]
            hidden = self._forward(seqs, [images[k] for k in live])
            last = torch.tensor([len(q) - 1 for q in seqs], device=self.device)
            logp = self._logprobs(hidden, torch.arange(len(live), device=self.device), last)
            for row, k in enumerate(live):
                done[k] = self._accept(new[k], int(logp[row].argmax()), stop, stop_strings)
        return new

    def _greedy_cached(self, prompts: list[list[int]], images: list[Optional[Tensor]], max_new_tokens: int,
                       stop: set[int], stop_strings: Sequence[str]) -> list[list[int]]:
        """One batch with a KV cache (megavlm.model.attention.KVCache): the right-padded prompts
        run once, then each step runs one token per live row at its own position and attends over
        the cache. Finished rows leave the cache; the rules are :meth:`_greedy`'s."""
        from megavlm.model.attention import KVCache

        new: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens <= 0:
            return new
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        # the last token a row may take is never an input: inputs end at max_length - 1 positions
        kv = KVCache(max(longest, min(self.max_length - 1, longest + max_new_tokens - 1)))
        kv.prefill(lengths, self.device)
        hidden = self._forward(prompts, images, kv_cache=kv)
        live = list(range(len(prompts)))  # batch row r of the cache is prompt live[r]
        done = [False] * len(prompts)
        logp = self._logprobs(hidden, torch.arange(len(live), device=self.device),
                              torch.tensor([n - 1 for n in lengths], device=self.device))
        for step in range(max_new_tokens):
            if step:
                keep = [r for r, k in enumerate(live)
                        if not done[k] and lengths[k] + len(new[k]) < self.max_length]
                if not keep:
                    break
                if len(keep) < len(live):
                    kv.keep(keep)
                    live = [live[r] for r in keep]
                pos = kv.decode()
                tokens = torch.tensor([[new[k][-1]] for k in live], dtype=torch.int64, device=self.device)
                with torch.no_grad():
                    hidden = self.model(tokens, pos, None, None, None, kv_cache=kv).transpose(0, 1)
                zero = torch.zeros(len(live), dtype=torch.int64, device=self.device)
                logp = self._logprobs(hidden, torch.arange(len(live), device=self.device), zero)
            for row, k in enumerate(live):
                done[k] = self._accept(new[k], int(logp[row].argmax()), stop, stop_strings)
        return new

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)
