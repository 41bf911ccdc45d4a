"""fp8 (e4m3 + per-patch scale) embedding stores: half the bytes of bf16, upcast to bf16 on load,
error against bf16 within a stated bound, loud on corruption, merged like any store."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megavlm.data.indexed import FP8, DataError, EmbeddingStore, EmbeddingWriter, bin_path

P, D = 16, 64


def write(prefix, embs, dtype):
    with EmbeddingWriter(prefix, encoder="e", num_patches=P, embed_dim=D, dtype=dtype) as w:
        for i, e in enumerate(embs):
            w.add(e, f"k{i}")


def test_fp8_store_error_against_bf16_and_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    # realistic encoder outputs: per-patch magnitudes spanning 3 orders, some outlier channels
    embs = [torch.randn(P, D, generator=g) * torch.logspace(-2, 1, P).view(P, 1) for _ in range(8)]
    embs[0][:, 3] *= 30
    embs[1][5] = 0  # an all-zero patch
    write(tmp_path / "b", embs, "bfloat16")
    write(tmp_path / "f", embs, FP8)
    sb, sf = EmbeddingStore(tmp_path / "b"), EmbeddingStore(tmp_path / "f")
    assert sf.torch_dtype == torch.bfloat16 and sf.get(0).dtype == np.uint16
    # per image: P*D bytes + P float32 scales, vs 2*P*D
    assert bin_path(tmp_path / "f").stat().st_size == 8 * P * (D + 4)
    assert bin_path(tmp_path / "f").stat().st_size / bin_path(tmp_path / "b").stat().st_size < 0.54
    worst = 0.0
    for i, e in enumerate(embs):
        b, f = sb.get_tensor(i).float(), sf.get_tensor(i).float()
        assert f.dtype == torch.float32 and sf.get_tensor(i).dtype == torch.bfloat16
        rel = ((f - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12))
        worst = max(worst, float(rel.max()))
        # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 per value, ~3 % rms per row
        assert float(rel.max()) < 0.05, (i, float(rel.max()))
        assert torch.all((f - b).abs() <= b.abs().amax(dim=1, keepdim=True) / 448 * 2 + b.abs() * 0.07)
    assert torch.equal(sf.get_tensor(1)[5].float(), torch.zeros(D))
    print(f"worst per-patch relative L2 error fp8 vs bf16: {worst:.4f}")


def test_fp8_store_rejects_bits_and_detects_corruption_and_merges(tmp_path):
    e = torch.randn(P, D)
    with pytest.raises(DataError, match="fp8 store takes float embeddings"):
        with EmbeddingWriter(tmp_path / "x", encoder="e", num_patches=P, embed_dim=D, dtype=FP8) as w:
            w.add(np.zeros((P, D), np.uint16), "k")
    assert not (tmp_path / "x.json").exists()
    write(tmp_path / "a", [e, 2 * e], FP8)
    with EmbeddingWriter(tmp_path / "m", encoder="e", num_patches=P, embed_dim=D, dtype=FP8) as w:
        w.add_store(tmp_path / "a")
        w.add_store(tmp_path / "a")
    m = EmbeddingStore(tmp_path / "m")
    assert len(m) == 4 and torch.equal(m.get_tensor(3), EmbeddingStore(tmp_path / "a").get_tensor(1))
    raw = bytearray(bin_path(tmp_path / "a").read_bytes())
    raw[P * (D + 4) + 4 * 2:P * (D + 4) + 4 * 3] = np.float32(np.inf).tobytes()  # record 1's third scale
    bin_path(tmp_path / "a").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"a\.bin: record 1 has NaN/Inf"):
        EmbeddingStore(tmp_path / "a").get(1)
    with pytest.raises(DataError, match="must be one of"):
        EmbeddingWriter(tmp_path / "z", encoder="e", num_patches=P, embed_dim=D, dtype="int8")
