"""Synthetic step loaders: rows that need no corpus, for the benchmarks and the engine tests.

Why one module: benchmarks (``bench train``, ``bench throughput``) and the engine tests
(tests/synthetic.py) each need a StepLoader whose batches are a pure function of (seed, step),
in the layouts the real pipeline produces. Row ``r`` of step ``k``'s *global* batch is drawn from
``numpy.random.default_rng([seed, k, r])`` and each data-parallel rank takes its own contiguous
rows, so any DP layout trains on exactly the same global batch while a rank draws only its rows.
Ids come from the tokenizer module (``SENTENCEPIECE_IDS``, ordinary ids from
``FIRST_ORDINARY_ID``) and image rows start with the one sample head (``image_head``).

Row kinds:

* ``text`` — one document filling the row;
* ``packed`` — two documents filling the row (document masking applies);
* ``caption`` — ``[P x IMAGE][SEP]`` caption ``[EOD]`` of random length, as the caption source;
* ``full-caption`` — ``[P x IMAGE][SEP]`` then text to the end of the row (what FLOP models assume).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from megavlm.data.batch import Batch, Sample, collate, image_head
from megavlm.data.tokenizer import FIRST_ORDINARY_ID, SENTENCEPIECE_IDS

IDS = SENTENCEPIECE_IDS
KINDS = ("text", "packed", "caption", "full-caption")


class SyntheticSteps:
    """A StepLoader of synthetic rows; ``rows`` is the cycle of row kinds over the global batch."""

    last_stats: dict[str, int] = {}
    """Mixture position counts of the last step: a synthetic loader does not count them."""

    def __init__(self, *, seed: int, seq: int, vocab: int, micro_batch: int, num_microbatches: int,
                 dp_rank: int = 0, dp_size: int = 1, rows: Sequence[str] = ("packed", "text"),
                 patches: int = 0, width: int = 0, image_bank: Optional[int] = None,
                 embed_dtype=None, epoch_steps: int = 4):
        bad = [k for k in rows if k not in KINDS]
        if not rows or bad:
            raise ValueError(f"row kinds must be among {KINDS}, got {list(rows)}")
        images = any("caption" in k for k in rows)
        if images and (patches < 1 or width < 1 or seq < patches + 4):
            raise ValueError(f"caption rows need patches >= 1, width >= 1 and seq >= patches + 4 "
                             f"(patches={patches}, width={width}, seq={seq})")
        if vocab <= FIRST_ORDINARY_ID:
            raise ValueError(f"vocab={vocab} leaves no ordinary ids above the specials")
        self.seed, self.seq, self.vocab = seed, seq, vocab
        self.mb, self.nmb, self.dp_rank, self.dp_size = micro_batch, num_microbatches, dp_rank, dp_size
        self.rows, self.P, self.W = tuple(rows), patches, width
        self.embed_dtype, self.epoch_steps = embed_dtype, epoch_steps
        self.step = 0
        self._head = image_head(IDS, patches) if images else None
        # a bank of images drawn once: a 729 x 1152 draw per row would cost milliseconds each and
        # show up as data waiting that no real loader has (it reads stored embeddings)
        self.bank = [np.random.default_rng([seed, i]).standard_normal((patches, width), dtype=np.float32)
                     .astype(np.float16).view(np.uint16) for i in range(image_bank or 0)] if images else []

    def _words(self, g: np.random.Generator, n: int) -> np.ndarray:
        return g.integers(FIRST_ORDINARY_ID, self.vocab, size=n)

    def _image(self, g: np.random.Generator) -> np.ndarray:
        if self.bank:
            return self.bank[int(g.integers(len(self.bank)))]
        return g.standard_normal((self.P, self.W)).astype(np.float32)

    def row(self, step: int, r: int) -> list[Sample]:
        """Row ``r`` of step ``step``'s global batch (a pure function of seed, step, r)."""
        g = np.random.default_rng([self.seed, step, r])
        kind, S, P = self.rows[r % len(self.rows)], self.seq, self.P
        if kind == "text":
            return [Sample(self._words(g, S), np.ones(S, bool))]
        if kind == "packed":
            a = int(g.integers(2, S - 2))
            return [Sample(d, np.ones(len(d), bool)) for d in (self._words(g, a), self._words(g, S - a))]
        if kind == "caption":
            n = int(g.integers(3, S - P - 2))
            tok = np.concatenate([self._head, self._words(g, n), [IDS.eod]])
            tgt = np.concatenate([np.zeros(P + 1, bool), np.ones(n + 1, bool)])
        else:  # full-caption
            tok = np.concatenate([self._head, self._words(g, S - P - 1)])
            tgt = np.concatenate([np.zeros(P + 1, bool), np.ones(S - P - 1, bool)])
        return [Sample(tok, tgt, image=self._image(g), image_start=0, source="captions")]

    def next_step(self) -> list[Batch]:
        per_rank = self.mb * self.nmb
        first = self.dp_rank * per_rank
        rows = [self.row(self.step, first + i) for i in range(per_rank)]
        self.step += 1
        return [collate(rows[i * self.mb:(i + 1) * self.mb], self.seq, IDS.pad, embed_dtype=self.embed_dtype)
                for i in range(self.nmb)]

    @property
    def tokens_per_epoch(self) -> int:
        """A synthetic 'epoch' is ``epoch_steps`` global batches."""
        return self.epoch_steps * self.mb * self.nmb * self.dp_size * self.seq

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
