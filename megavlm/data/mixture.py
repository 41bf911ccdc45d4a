"""Exact-ratio, deterministic, resumable mixing and packing of a stage's sources into Batches.

Why a planner over lengths: every data-parallel rank runs the same *planner* over sample lengths
only (no token reads), producing the global stream of rows; each rank then reads and collates
just its own rows. So batches are identical for the same seed whatever the dp layout (rank r of
dp takes rows ``[r*M*B, (r+1)*M*B)`` of every global batch of ``dp*M*B`` rows), ranks are disjoint,
and the loader position is a handful of integers (``state_dict``).

How a row is planned (fractions f_k of token positions; counts C_k so far; error e_k = C_k - f_k*C):
1. *head* samples (captions, instructions — never split) go first: repeatedly add the next sample
   of the source most behind its fraction, if it fits and adding it brings that source closer to
   its target (e + n(1-f)/2 <= 0); without text, an empty row takes the most-behind sample anyway.
2. text fills the rest of the row as a stream cut at row ends; it is limited only so that text
   never runs more than ``seq_length`` positions ahead of its fraction (a bound that also
   guarantees no row is ever empty). How the text of a row attends is the stage's
   ``text_attention`` and is decided when a row is read, not planned: ``document`` = position ids
   and attention restart at every document piece; ``window`` = the row's text pieces are one
   causal window (open_lm / DCLM), see :func:`text_window`.
   Whatever is left is padding (no loss, counted in no source).
The errors stay bounded by about one row, so over 1,000 rows every source's share of the
non-padding positions is within a fraction of a percent of its target.

Each source walks its own seeded permutation, epoch after epoch (new permutation per epoch).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megavlm.config import TEXT_ATTENTION, DataConfig, MixtureConfig, VisionConfig
from megavlm.data.batch import Batch, Sample, collate
from megavlm.data.indexed import DataError
from megavlm.data.sources import CaptionSource, ConversationSource, TextSource
from megavlm.data.tokenizer import Tokenizer, load_tokenizer

KINDS = ("text", "captions", "instructions")
TEXT, CAPTIONS, INSTRUCTIONS = 0, 1, 2
STATE_VERSION = 1

Piece = tuple[int, int, int, int]
"""(kind, sample index, offset, length) — offset/length only matter for text."""


class ConcatSource:
    """Several sources of one kind addressed as one list of samples."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        self.lengths = np.concatenate([p.lengths for p in self.parts]).astype(np.int64)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.truncated = sum(p.truncated for p in self.parts)

    def __len__(self) -> int:
        return len(self.lengths)

    def _locate(self, i: int) -> tuple[Any, int]:
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k], i - int(self._starts[k])

    def sample(self, i: int) -> Sample:
        p, j = self._locate(i)
        return p.sample(j)

    def has_image(self, i: int) -> bool:
        p, j = self._locate(i)
        return p.has_image(j) if hasattr(p, "has_image") else True


def _order(seed: int, stage: str, kind: int, epoch: int, n: int) -> np.ndarray:
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(stage.encode()), kind, epoch])
    return rng.permutation(n).astype(np.int64)


@dataclass
class _Cursor:
    epoch: int = 0
    pos: int = 0


class MixturePlanner:
    """Plans rows (lists of pieces) from sample lengths; its state is a few integers."""

    def __init__(self, lengths: Sequence[Optional[np.ndarray]], fractions: Sequence[float], *,
                 seq_length: int, seed: int, stage: str, max_heads: Optional[int] = None,
                 window: int = 1):
        self.max_heads = max_heads  # 1 = one example per row (batch_unit: examples)
        if window < 1:
            raise ValueError(f"pack window must be >= 1, got {window}")
        self.window = window  # > 1: best fit among the next `window` head samples (see _best_fit)
        self.S = seq_length
        self.f = [float(x) for x in fractions]
        self.lengths = [None if l is None else np.asarray(l, dtype=np.int64) for l in lengths]
        for k, (fk, l) in enumerate(zip(self.f, self.lengths)):
            if fk > 0 and (l is None or len(l) == 0):
                raise DataError(f"mixture wants {fk:.3g} of positions from {KINDS[k]} but that "
                                f"source has no samples")
            if k != TEXT and fk > 0 and l.max() > seq_length:
                raise DataError(f"{KINDS[k]}: a sample of {int(l.max())} positions exceeds the "
                                f"sequence ({seq_length})")
        if self.f[TEXT] > 0 and int(self.lengths[TEXT].sum()) == 0:
            raise DataError("text source holds no tokens")
        self.seed, self.stage = seed, stage
        self.heads = [k for k in (CAPTIONS, INSTRUCTIONS) if self.f[k] > 0]
        self.slack = seq_length  # >= what heads blocked by the threshold can leave: rows never empty
        self.reset()

    # ---- state
    def reset(self) -> None:
        self.row = 0
        self.counts = [0, 0, 0]
        self.cursors = [_Cursor(), _Cursor(), _Cursor()]
        self.taken: list[set[int]] = [set(), set(), set()]
        """Positions ahead of a head cursor already used by a best fit (skipped when reached)."""
        self._cache: dict[int, tuple[int, np.ndarray, Optional[np.ndarray]]] = {}

    def state_dict(self) -> dict:
        d = {"row": self.row, "counts": list(self.counts),
             "cursors": [[c.epoch, c.pos] for c in self.cursors]}
        if self.window > 1:
            d["taken"] = [sorted(t) for t in self.taken]
        return d

    def load_state_dict(self, d: dict) -> None:
        self.row = int(d["row"])
        self.counts = [int(x) for x in d["counts"]]
        self.cursors = [_Cursor(int(e), int(p)) for e, p in d["cursors"]]
        self.taken = [set(int(x) for x in t) for t in d.get("taken", [[], [], []])]

    # ---- per-source order
    def _perm(self, k: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        ep = self.cursors[k].epoch
        hit = self._cache.get(k)
        if hit is None or hit[0] != ep:
            perm = _order(self.seed, self.stage, k, ep, len(self.lengths[k]))
            cum = np.cumsum(self.lengths[k][perm]) if k == TEXT else None
            self._cache[k] = hit = (ep, perm, cum)
        return hit[1], hit[2]

    def _peek(self, k: int) -> tuple[int, int]:
        c = self.cursors[k]
        while c.pos in self.taken[k]:  # used earlier by a best fit
            self.taken[k].discard(c.pos)
            c.pos += 1
        if c.pos >= len(self.lengths[k]):
            c.epoch += 1
            c.pos = 0
        perm, _ = self._perm(k)
        i = int(perm[c.pos])
        return i, int(self.lengths[k][i])

    def _text(self, m: int, out: list[Piece]) -> None:
        c = self.cursors[TEXT]
        lens = self.lengths[TEXT]
        while m > 0:
            perm, cum = self._perm(TEXT)
            total = int(cum[-1])
            if c.pos >= total:
                c.epoch += 1
                c.pos = 0
                continue
            end = min(c.pos + m, total)
            i0 = int(np.searchsorted(cum, c.pos, side="right"))
            i1 = int(np.searchsorted(cum, end - 1, side="right"))
            docs = perm[i0:i1 + 1]
            ends = cum[i0:i1 + 1]
            starts = ends - lens[docs]
            lo = np.maximum(starts, c.pos)
            hi = np.minimum(ends, end)
            for d, s, a, b in zip(docs.tolist(), starts.tolist(), lo.tolist(), hi.tolist()):
                if b > a:
                    out.append((TEXT, d, a - s, b - a))
            m -= end - c.pos
            c.pos = end

    def _best_fit(self, k: int, space: int) -> Optional[tuple[int, int, int]]:
        """(position, sample, length) of the longest of the next ``window - 1`` samples after the
        cursor (same epoch, not yet taken) that fits in ``space``; None if none does. Taking a
        sample a little early keeps every sample exactly once per epoch, and the taken positions
        are part of the state, so resume reproduces the plan."""
        c = self.cursors[k]
        perm, _ = self._perm(k)
        best = None
        for pos in range(c.pos + 1, min(c.pos + self.window, len(perm))):
            if pos in self.taken[k]:
                continue
            i = int(perm[pos])
            n = int(self.lengths[k][i])
            if n <= space and (best is None or n > best[2]):
                best = (pos, i, n)
        return best

    # ---- planning
    def plan_row(self) -> list[Piece]:
        S, f, C = self.S, self.f, self.counts
        space = S
        out: list[Piece] = []
        total = sum(C)
        has_text = f[TEXT] > 0
        while self.heads and (self.max_heads is None or len(out) < self.max_heads):
            best = None
            for k in self.heads:
                i, n = self._peek(k)
                at = None  # None: the sample at the cursor; else a best-fit position ahead
                if n > space:
                    fit = self._best_fit(k, space) if self.window > 1 else None
                    if fit is None:
                        continue
                    at, i, n = fit
                e = C[k] - f[k] * total
                if (out or has_text) and e + n * (1 - f[k]) / 2 > 0:  # without text, an empty
                    continue                                            # row always takes one
                if best is None or e < best[0]:
                    best = (e, k, i, n, at)
            if best is None:
                break
            _, k, i, n, at = best
            out.append((k, i, 0, n))
            if at is None:
                self.cursors[k].pos += 1
            else:
                self.taken[k].add(at)
            C[k] += n
            total += n
            space -= n
        if has_text and space > 0:
            m = space
            if f[TEXT] < 1:
                e = C[TEXT] - f[TEXT] * total
                m = min(space, max(0, math.floor((self.slack - e) / (1 - f[TEXT]))))
            if m > 0:
                self._text(m, out)
                C[TEXT] += m
        self.row += 1
        return out


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a stage's loader is built from, resolved once per stage by
    megavlm.train.plan (``StagePlan.loader``); :func:`megavlm.train.plan.build_loader` is the one
    place a StageLoader is made from it, adding only this rank's place in the data-parallel layout."""

    stage: str
    """Stage name (part of the data order's seed)."""
    data: DataConfig
    """Where the prepared sets are, and what to do with a sample longer than a row."""
    mixture: MixtureConfig
    """Fractions of the stage's positions per kind of source."""
    vision: VisionConfig
    """Embedding width / patch count / encoder the caption stores must have."""
    seq_length: int
    """The stage's row length (its own seq_length, else model.seq_length)."""
    seed: int
    """The run's seed."""
    epochs: Optional[int] = None
    """Passes the stage makes (the loader then counts the positions of one pass up front)."""
    examples_per_row: Optional[int] = None
    """1 when a stage counts its batch in examples (one conversation per row), else None."""
    pack_window: int = 1
    """Best-fit packing window (1 = strictly in order)."""
    text_attention: str = "document"
    """How text rows attend (issue 25): ``document`` restarts attention and positions per document,
    ``window`` is open_lm's one causal window over the concatenated documents."""


class StageLoader:
    """This data-parallel rank's microbatches of one stage, step by step (see module docstring).
    Built by megavlm.train.plan.build_loader from the stage's :class:`LoaderSpec`."""

    def __init__(self, spec: LoaderSpec, *, micro_batch_size: int, num_microbatches: int,
                 dp_rank: int, dp_size: int):
        data, mixture, vision, seq_length = spec.data, spec.mixture, spec.vision, spec.seq_length
        seed, stage, epochs = spec.seed, spec.stage, spec.epochs
        examples_per_row, pack_window = spec.examples_per_row, spec.pack_window
        text_attention = spec.text_attention
        self.spec = spec
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if text_attention not in TEXT_ATTENTION:
            raise ValueError(f"stage {stage}: text_attention {text_attention!r} is not one of "
                             f"{list(TEXT_ATTENTION)}")
        self.text_attention = text_attention
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.num_microbatches = num_microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.stage, self.epochs = seed, stage, epochs
        self.tokenizer: Tokenizer = load_tokenizer(data.resolve(data.tokenizer))
        fr = [mixture.text, mixture.captions, mixture.instructions]
        kw = dict(embed_dim=vision.embed_dim, num_patches=vision.num_patches,
                  seq_length=seq_length, too_long=data.too_long, encoder=vision.encoder)
        self.sources: list[Any] = [None, None, None]
        lists = [data.text, data.captions, data.instructions]
        for k, name in enumerate(KINDS):
            if fr[k] <= 0:
                continue
            if not lists[k]:
                raise DataError(f"stage {stage}: mixture.{name}={fr[k]} but data.{name} lists no dataset")
            paths = [data.resolve(p) for p in lists[k]]
            if k == TEXT:
                self.sources[k] = TextSource(paths)
            else:
                cls = CaptionSource if k == CAPTIONS else ConversationSource
                self.sources[k] = ConcatSource([cls(p, self.tokenizer, **kw) for p in paths])
        dtypes = {s.store.torch_dtype for src in self.sources[1:] if src is not None
                  for s in src.parts if s.store is not None}
        if len(dtypes) > 1:
            raise DataError(f"stage {stage}: embedding stores mix dtypes {sorted(map(str, dtypes))}")
        self.embed_dtype = dtypes.pop() if dtypes else torch.bfloat16
        self.resize = check_resize(self.sources[1:], stage)
        if getattr(vision, "resize", None) and self.resize and self.resize != vision.resize:
            raise DataError(f"stage {stage}: embedding stores were resized {self.resize} but the config says "
                            f"model.vision.resize={vision.resize}")
        self.truncated = {KINDS[k]: s.truncated for k, s in enumerate(self.sources) if s is not None}
        self._fractions = fr
        self.examples_per_row, self.pack_window = examples_per_row, pack_window
        self.planner = MixturePlanner([None if s is None else s.lengths for s in self.sources], fr,
                                      seq_length=seq_length, seed=seed, stage=stage,
                                      max_heads=examples_per_row, window=pack_window)
        self.rows_per_step = dp_size * num_microbatches * micro_batch_size
        self.last_stats: dict[str, int] = {}
        self._tokens_per_epoch: Optional[int] = None
        if epochs is not None:
            _ = self.tokens_per_epoch

    # ---- the trainer's interface
    def next_step(self) -> list[Batch]:
        per_rank = self.num_microbatches * self.micro_batch_size
        lo = self.dp_rank * per_rank
        plans = [self.planner.plan_row() for _ in range(self.rows_per_step)][lo:lo + per_rank]
        stats = dict.fromkeys(("text_positions", "caption_positions", "instruction_positions",
                               "image_sample_positions", "patch_positions", "pad_positions"), 0)
        batches = []
        B = self.micro_batch_size
        for j in range(self.num_microbatches):
            rows = [self._materialize(p, stats) for p in plans[j * B:(j + 1) * B]]
            batches.append(collate(rows, self.seq_length, self.tokenizer.pad, self.embed_dtype))
        stats["pad_positions"] = per_rank * self.seq_length - (
            stats["text_positions"] + stats["caption_positions"] + stats["instruction_positions"])
        self.last_stats = stats
        return batches

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.seed, "stage": self.stage,
                "seq_length": self.seq_length, "fractions": list(self._fractions),
                "sizes": [0 if s is None else len(s) for s in self.sources],
                "rows_per_step": self.rows_per_step, "planner": self.planner.state_dict(),
                **({"pack_window": self.pack_window} if self.pack_window > 1 else {}),
                **({"text_attention": self.text_attention} if self.text_attention != "document" else {})}

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {d.get('version')} is not {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "stage", "seq_length", "fractions", "sizes"):
            if d[key] != mine[key]:
                raise DataError(f"loader state was saved with {key}={d[key]}, this loader has "
                                f"{mine[key]}: resuming would not continue the same data")
        if d.get("pack_window", 1) != self.pack_window:
            raise DataError(f"loader state was saved with pack_window={d.get('pack_window', 1)}, this "
                            f"loader has {self.pack_window}: resuming would not continue the same data")
        if d.get("text_attention", "document") != self.text_attention:
            raise DataError(f"loader state was saved with text_attention={d.get('text_attention', 'document')}, "
                            f"this loader has {self.text_attention}: resuming would change how text rows attend")
        if d["planner"]["row"] % self.rows_per_step:
            raise DataError(f"loader state is at global row {d['planner']['row']}, not a multiple of "
                            f"this layout's {self.rows_per_step} rows per step")
        self.planner.load_state_dict(d["planner"])

    @property
    def tokens_per_epoch(self) -> int:
        """Positions (rows x seq_length, padding included) until every source in the mixture has
        been read once, with this stage's seed — what `epochs` multiplies."""
        if self._tokens_per_epoch is None:
            p = self.fresh_planner()
            active = [k for k in range(3) if self._fractions[k] > 0]
            rows = 0
            while True:
                done = True
                for k in active:
                    c = p.cursors[k]
                    if k == TEXT:
                        finished = c.epoch > 0 or (c.pos >= int(self.planner.lengths[TEXT].sum()))
                    else:
                        finished = c.epoch > 0 or c.pos >= len(p.lengths[k])
                    done &= finished
                if done:
                    break
                p.plan_row()
                rows += 1
            self._tokens_per_epoch = rows * self.seq_length
        return self._tokens_per_epoch

    def fresh_planner(self) -> MixturePlanner:
        """A planner at row 0 of this stage's plan (for sizing the stage without moving this one)."""
        return MixturePlanner(self.planner.lengths, self._fractions, seq_length=self.seq_length,
                              seed=self.seed, stage=self.stage, max_heads=self.examples_per_row,
                              window=self.pack_window)

    @property
    def num_examples(self) -> int:
        """Conversations in the stage's instruction data (what an epoch in examples counts)."""
        src = self.sources[INSTRUCTIONS]
        return 0 if src is None else len(src)

    # ---- reading one row
    def _materialize(self, plan: list[Piece], stats: dict[str, int]) -> list[Sample]:
        out = []
        for kind, i, off, n in plan:
            if kind == TEXT:
                out.append(self.sources[TEXT].sample(i, off, n))
                stats["text_positions"] += n
            else:
                s = self.sources[kind].sample(i)
                out.append(s)
                if kind == CAPTIONS:
                    stats["caption_positions"] += n
                else:
                    stats["instruction_positions"] += n
                if s.image is not None:
                    stats["image_sample_positions"] += n
                    stats["patch_positions"] += s.image.shape[0]
        return text_window(out) if self.text_attention == "window" else out


def text_window(samples: list[Sample]) -> list[Sample]:
    """A row's samples with every run of consecutive text pieces joined into ONE text sample:
    ``collate`` then gives it one causal window (one ``cu_seqlens`` segment), positions 0..n-1
    running through the documents, and the last token of a document (its EOD) predicting the
    first token of the next — open_lm's plain windows over concatenated documents, with which
    DCLM was trained. Caption and instruction samples pass through unchanged (per document).
    One difference stays: open_lm reads S + 1 tokens for S positions, so its last position also
    has a label; here the stream continues in the next row and a row's last text position
    predicts nothing (one loss token in S fewer)."""
    out: list[Sample] = []
    run: list[Sample] = []
    for s in samples + [None]:  # type: ignore[list-item]
        if s is not None and s.source == "text":
            run.append(s)
            continue
        if len(run) == 1:
            out.append(run[0])
        elif run:
            out.append(Sample(tokens=np.concatenate([r.tokens for r in run]),
                              target=np.concatenate([r.target for r in run]), source="text"))
        run = []
        if s is not None:
            out.append(s)
    return out


@dataclass(frozen=True)
class RealTokenSteps:
    """How many steps deliver a stage's budget of real (non-padding) positions."""

    steps: int
    real_tokens: int
    """Non-padding positions of those steps (>= the budget unless extrapolated)."""
    rows: int
    padding_fraction: float
    """Padding share of the walked rows' positions."""
    extrapolated: bool
    """True when the walk stopped at ``max_rows`` and the rest was extrapolated at its density."""


def steps_for_real_tokens(planner: MixturePlanner, budget: int, rows_per_step: int,
                          max_rows: int = 2_000_000) -> RealTokenSteps:
    """Walk the global row plan from ``planner``'s position (it is advanced) step by step until
    the non-padding positions reach ``budget``; the step count is then fixed before training, and
    a run of that many steps sees exactly the walked rows (same seed, same lengths). Past
    ``max_rows`` rows the remaining steps are extrapolated from the density so far."""
    if budget <= 0 or rows_per_step <= 0:
        raise ValueError(f"budget ({budget}) and rows_per_step ({rows_per_step}) must be > 0")
    S = planner.S
    real = rows = steps = 0
    while real < budget:
        if rows >= max_rows:
            per_step = real / steps
            more = math.ceil((budget - real) / per_step)
            pad = 1.0 - real / (rows * S)
            return RealTokenSteps(steps + more, int(real + more * per_step), rows, pad, True)
        for _ in range(rows_per_step):
            real += sum(piece[3] for piece in planner.plan_row())
        rows += rows_per_step
        steps += 1
    return RealTokenSteps(steps, real, rows, 1.0 - real / (rows * S), False)


def check_resize(sources: Sequence[Any], stage: str) -> Optional[str]:
    """The one image-resize setting (letterbox / square) of a stage's embedding stores; stores
    written before the setting was recorded count as square. Mixing settings is an error: the
    projector would see two different image geometries."""
    seen: dict[str, str] = {}
    for src in sources:
        if src is None:
            continue
        for part in getattr(src, "parts", [src]):
            store = getattr(part, "store", None)
            if store is None:
                continue
            setting = getattr(getattr(store, "meta", None), "resize", "square") or "square"
            seen.setdefault(str(setting), str(getattr(store, "prefix", part)))
    if len(seen) > 1:
        raise DataError(f"stage {stage}: embedding stores were resized differently "
                        + ", ".join(f"{k} ({v})" for k, v in sorted(seen.items()))
                        + "; re-encode them with one tools/encode_images.py --resize setting")
    return next(iter(seen), None)
