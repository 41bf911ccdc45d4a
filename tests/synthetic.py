"""Deterministic synthetic batches for engine tests (the data pipeline has its own tests).

Every optimizer step has one *global* batch, a pure function of (seed, step): caption rows
(image slots, SEP, caption), packed text rows (two documents), and plain text rows. Each
data-parallel rank takes its own contiguous slice, so layouts with different DP sizes train on
exactly the same global batch. The rows come from the one synthetic loader, megavlm.bench.synthetic.
"""

from __future__ import annotations

from megavlm.bench.synthetic import IDS, SyntheticSteps
from megavlm.data.batch import Sample

PAD = IDS.pad
VOCAB = 100
"""Token ids stay below this, so every test model (vocab >= 100) can embed them."""


def _rows(images: bool) -> tuple[str, ...]:
    return ("caption", "packed", "text") if images else ("packed", "text")


def global_rows(seed: int, step: int, rows: int, seq: int, patches: int, width: int,
                images: bool) -> list[list[Sample]]:
    """The first ``rows`` rows of step ``step``'s global batch: caption, packed and plain text rows."""
    src = SyntheticSteps(seed=seed, seq=seq, vocab=VOCAB, micro_batch=1, num_microbatches=1,
                         rows=_rows(images), patches=patches, width=width)
    return [src.row(step, r) for r in range(rows)]


class SyntheticLoader(SyntheticSteps):
    """StepLoader over synthetic global batches, sliced for one data-parallel rank."""

    def __init__(self, *, seed: int, seq: int, micro_batch: int, num_microbatches: int,
                 dp_rank: int, dp_size: int, patches: int, width: int, images: bool):
        super().__init__(seed=seed, seq=seq, vocab=VOCAB, micro_batch=micro_batch,
                         num_microbatches=num_microbatches, dp_rank=dp_rank, dp_size=dp_size,
                         rows=_rows(images), patches=patches, width=width)


def factory(run):
    def make(spec, parallel, nmb):
        return SyntheticLoader(seed=spec.seed, seq=spec.seq_length,
                               micro_batch=run.train.micro_batch_size, num_microbatches=nmb,
                               dp_rank=parallel.dp_rank, dp_size=parallel.dp,
                               patches=run.model.vision.num_patches, width=run.model.vision.embed_dim,
                               images=spec.mixture.captions > 0)
    return make


def tiny_run(run_dir: str, tp: int = 1, pp: int = 1, vpp=None, sp: bool = False, steps: int = 3,
             layers: int = 4, **extra) -> dict:
    """A raw config dict for a small two-stage run (text, then image-text from its final checkpoint)."""
    tokens_per_step = 8 * 32
    raw = {
        "run_dir": run_dir, "seed": 7,
        "model": {"num_layers": layers, "hidden_size": 64, "num_attention_heads": 4,
                  "ffn_hidden_size": 96, "vocab_size": 128, "seq_length": 32,
                  "vision": {"embed_dim": 24, "num_patches": 4}},
        "parallel": {"tp": tp, "pp": pp, "vpp": vpp, "sequence_parallel": sp},
        "train": {"micro_batch_size": 2, "global_batch_size": 8}, "precision": {"dtype": "fp32"},
        "stages": [
            {"name": "text", "tokens": steps * tokens_per_step, "mixture": {"text": 1.0},
             "schedule": {"kind": "cosine", "peak": 1e-3, "final": 1e-5, "warmup_steps": 1},
             "checkpoint_fractions": [0.5, 1.0]},
            {"name": "image", "tokens": steps * tokens_per_step, "init": {"stage": "text", "fraction": 1.0},
             # the final LR held (what `continue` from 1.0 gave before the paper's rule refused it):
             # a small LR keeps Adam's sign-sensitive updates of near-zero gradients comparable
             "mixture": {"text": 0.5, "captions": 0.5},
             "schedule": {"kind": "rewarm", "peak": 1e-5, "final": 1e-5, "warmup_fraction": 0.0},
             "checkpoint_fractions": [1.0]},
        ],
    }
    for k, v in extra.items():
        raw[k] = v
    return raw
