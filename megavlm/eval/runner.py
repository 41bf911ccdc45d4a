"""A loaded checkpoint that scores and generates in batches: the one place evaluation touches the model.

Every evaluator (the lm-eval adapter, the vision tasks, the suites) needs the same two
operations — the log-probability of a continuation after a context, and greedy continuation —
optionally with an image in front. They live here so that padding, truncation, the image layout
and batching are decided once.

Batching without an attention mask: rows are *right*-padded and the model's causal mask stays in
place (``attention_mask=None``). Under a causal mask a position never sees later positions, so
the padding after a row's last real token cannot change any of that row's logits. Greedy
generation uses the same trick: each step runs the whole batch once and reads every row's logits
at its own last position (no KV cache: evaluation prompts are short and the model is one process).

Image rows follow the training layout ``[P image placeholder ids][SEP][text …]``: the image is
first, its embeddings are spliced in by the model at slot (row, 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from megavlm.data.tokenizer import Tokenizer, load_tokenizer


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
    or the default for checkpoints older than that field."""
    from megavlm.config import DEFAULT_PROMPT_TEMPLATE

    recorded = True
    if path is not None and (path / "config.yaml").is_file():
        import yaml

        raw = yaml.safe_load((path / "config.yaml").read_text()) or {}
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
        self.prompt_template, self.prompt_source = recorded_prompt(run, Path(path))
        """The question template of instruction tuning (data.prompt_template of the checkpoint's
        config); ``--prompt`` replaces it (prompt_source says which)."""
        """The process groups the model was loaded under (megavlm.parallel.state.Parallel); under
        torchrun its data-parallel group shards the evaluation (megavlm.eval.distributed)."""
        if tokenizer.vocab_size > run.model.vocab_size:
            raise EvalError(f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model's "
                            f"vocabulary is {run.model.vocab_size}")

    @classmethod
    def load(cls, checkpoint: str | Path, batch_size: int = 16) -> "CheckpointModel":
        """Load a checkpoint directory (``<run>/<stage>/checkpoints/step_…``). The tokenizer is
        checked first so that a checkpoint without one fails before the model is built. Under
        torchrun every rank loads the whole model (tp = pp = 1): the world is data parallel."""
        from megavlm.checkpoint_format import resolve_checkpoint, tokenizer_file
        from megavlm.config import ParallelConfig
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
        from megavlm.data.batch import image_head

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

    def _forward(self, rows: list[list[int]], images: list[Optional[Tensor]]) -> Tensor:
        """Final hidden states [B, S, d] of right-padded rows (one forward for the whole batch)."""
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
            return self.model(tokens.to(self.device), pos.to(self.device), None, embeds, slots).transpose(0, 1)

    def _logprobs(self, hidden: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Log-softmax [N, V] at the N (row, position) pairs only: the vocabulary projection is
        the costliest part of a small model's forward, and only these positions are read."""
        picked = hidden[rows, cols]  # [N, d]
        with torch.no_grad():
            logits = self.model.logits(picked.unsqueeze(1))[0].float()  # as [S=N, B=1, d]
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
                 stop_strings: Sequence[str] = ()) -> list[str]:
        """Greedy continuation of each prompt (token ids, after the image prefix when an image is
        given), stopped at a stop id, a stop string or ``max_new_tokens``; decoded text without
        the stop."""
        images = list(images) if images is not None else [None] * len(prompts)
        stop = set(stop_ids) | {self.tok.eod}
        rows = []
        for p, im in zip(prompts, images):
            ids = (self.image_prefix() if im is not None else []) + (list(p) or [self.tok.eod])
            ids, _ = self._fit(ids, len(ids), im is not None, limit=self.max_length - 1)
            rows.append(ids)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out = [""] * len(rows)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            seqs = [list(rows[i]) for i in idx]
            start = [len(s) for s in seqs]
            done = [False] * len(idx)
            for _ in range(max_new_tokens):
                live = [k for k in range(len(idx)) if not done[k] and len(seqs[k]) < self.max_length]
                if not live:
                    break
                hidden = self._forward([seqs[k] for k in live], [images[idx[k]] for k in live])
                last = torch.tensor([len(seqs[k]) - 1 for k in live], device=self.device)
                logp = self._logprobs(hidden, torch.arange(len(live), device=self.device), last)
                for row, k in enumerate(live):
                    nxt = int(logp[row].argmax())
                    if nxt in stop:
                        done[k] = True
                        continue
                    seqs[k].append(nxt)
                    if stop_strings and any(s in self.tok.decode(seqs[k][start[k]:]) for s in stop_strings):
                        done[k] = True
            for k, i in enumerate(idx):
                text = self.tok.decode(seqs[k][start[k]:])
                for s in stop_strings:
                    if s and s in text:
                        text = text.split(s, 1)[0]
                out[i] = text
        return out

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)
