"""Deterministic synthetic batches for engine tests (the data pipeline has its own tests).

Every optimizer step has one *global* batch, a pure function of (seed, step): caption rows
(image slots, SEP, caption), packed text rows (several documents), and plain text rows. Each
data-parallel rank takes its own contiguous slice, so layouts with different DP sizes train on
exactly the same global batch.
"""

from __future__ import annotations

import numpy as np

from megavlm.data.batch import Sample, collate

PAD, EOD, SEP, IMG = 0, 1, 2, 3


def global_rows(seed: int, step: int, rows: int, seq: int, patches: int, width: int,
                images: bool) -> list[list[Sample]]:
    g = np.random.default_rng([seed, step])
    out = []
    for r in range(rows):
        kind = r % 3 if images else 1 + r % 2
        if kind == 0:  # caption row: [IMG]*P [SEP] caption [EOD]
            n = int(g.integers(3, seq - patches - 2))
            cap = g.integers(4, 100, size=n)
            tok = np.concatenate([np.full(patches, IMG), [SEP], cap, [EOD]])
            tgt = np.concatenate([np.zeros(patches + 1, bool), np.ones(n + 1, bool)])
            img = g.standard_normal((patches, width)).astype(np.float32)
            out.append([Sample(tok, tgt, image=img, image_start=0, source="captions")])
        elif kind == 1:  # packed text: two documents
            a = int(g.integers(2, seq - 2))
            docs = [g.integers(4, 100, size=a), g.integers(4, 100, size=seq - a)]
            out.append([Sample(d, np.ones(len(d), bool)) for d in docs])
        else:
            d = g.integers(4, 100, size=seq)
            out.append([Sample(d, np.ones(seq, bool))])
    return out


class SyntheticLoader:
    """StepLoader over synthetic global batches, sliced for one data-parallel rank."""

    def __init__(self, *, seed: int, seq: int, micro_batch: int, num_microbatches: int,
                 dp_rank: int, dp_size: int, patches: int, width: int, images: bool):
        self.seed, self.seq, self.mb, self.nmb = seed, seq, micro_batch, num_microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.patches, self.width, self.images = patches, width, images
        self.step = 0

    def next_step(self):
        per_rank = self.mb * self.nmb
        rows = global_rows(self.seed, self.step, per_rank * self.dp_size, self.seq, self.patches,
                           self.width, self.images)
        mine = rows[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        self.step += 1
        return [collate(mine[i * self.mb:(i + 1) * self.mb], self.seq, PAD, embed_dtype=None)
                for i in range(self.nmb)]

    @property
    def tokens_per_epoch(self) -> int:
        """A synthetic 'epoch' is four global batches."""
        return 4 * self.mb * self.nmb * self.dp_size * self.seq

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def factory(run):
    def make(stage, parallel, nmb):
        return SyntheticLoader(seed=run.seed, seq=run.stage_seq_length(stage),
                               micro_batch=run.train.micro_batch_size, num_microbatches=nmb,
                               dp_rank=parallel.dp_rank, dp_size=parallel.dp,
                               patches=run.model.vision.num_patches, width=run.model.vision.embed_dim,
                               images=stage.mixture.captions > 0)
    return make


def tiny_run(run_dir: str, tp: int = 1, pp: int = 1, vpp=None, sp: bool = False, steps: int = 3,
             layers: int = 4, **extra) -> dict:
    """A raw config dict for a small two-stage run (text, then image-text continued)."""
    tokens_per_step = 8 * 32
    raw = {
        "run_dir": run_dir, "seed": 7,
        "model": {"num_layers": layers, "hidden_size": 64, "num_attention_heads": 4,
                  "ffn_hidden_size": 96, "vocab_size": 128, "seq_length": 32,
                  "vision": {"embed_dim": 24, "num_patches": 4}},
        "parallel": {"tp": tp, "pp": pp, "vpp": vpp, "sequence_parallel": sp},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "precision": "fp32"},
        "stages": [
            {"name": "text", "tokens": steps * tokens_per_step, "mixture": {"text": 1.0},
             "schedule": {"kind": "cosine", "peak": 1e-3, "final": 1e-5, "warmup_steps": 1},
             "checkpoint_fractions": [0.5, 1.0]},
            {"name": "image", "tokens": steps * tokens_per_step, "init": {"stage": "text", "fraction": 1.0},
             "mixture": {"text": 0.5, "captions": 0.5}, "schedule": {"kind": "continue"},
             "checkpoint_fractions": [1.0]},
        ],
    }
    for k, v in extra.items():
        raw[k] = v
    return raw
